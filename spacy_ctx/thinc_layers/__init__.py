"""Thinc layers around the encoder backends."""
