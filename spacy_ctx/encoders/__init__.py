"""Pure PyTorch encoders. This package imports neither spaCy nor Thinc."""
