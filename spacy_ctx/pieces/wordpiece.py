"""Compatibility module: the tokenizer now lives in :mod:`spacy_ctx.pieces.tokenizer`."""

from .tokenizer import SETTINGS_FILE, TOKENIZER_FILE, PieceTokenizer, WordPieceTokenizer

__all__ = ["PieceTokenizer", "WordPieceTokenizer", "SETTINGS_FILE", "TOKENIZER_FILE"]
