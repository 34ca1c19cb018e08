"""Turning spaCy tokens into encoder inputs (word pieces, characters) with the alignment."""
