"""How word pieces map to spaCy tokens: one rule for every tokenizer family.

The rule
--------
1. **The model reads running text.** Each Doc's ``doc.text`` is encoded as one
   string, exactly as the checkpoint's tokenizer encodes text in pretraining
   (``tokenizer(doc.text, add_special_tokens=False)`` in ``transformers``). The
   spaCy tokens are *not* fed as pre-split words, so the leading-space conventions
   of byte-level BPE (``Ġworld``) and SentencePiece/Metaspace (``▁world``) hold:
   "world" after a space is the same piece as in pretraining. (HF's
   ``is_split_into_words=True`` instead encodes every word alone, as if it started
   a text or followed a space, whatever the text had; for WordPiece the two
   usually agree, for BPE and Unigram they do not.)
2. **Pieces map to tokens by character offsets.** A piece's character span
   (``Encoding.offsets``) is first trimmed of whitespace at both ends, so
   ``Ġworld``/``▁world`` cover "world"; a piece that covers only whitespace (or
   nothing, such as a lone ``▁``) aligns to no token.
3. **Overlaps count for every token.** A piece overlapping several spaCy tokens
   belongs to each of them (spaCy "do" + "n't" vs a piece "don": both tokens use
   it).
4. **Tokens without pieces get zero rows.** A whitespace token
   (``token.is_space``) never gets a piece; a token no piece overlaps (e.g. a
   control character the normalizer removes) gets piece count 0, a zero vector and
   ``has_vector`` False downstream.
5. **Every piece is encoded.** Pieces aligned to no token still go through the
   model as context; they are just not pooled into any token.

Output per Doc
--------------
``ids`` (int64, every piece of ``doc.text``, no specials), ``piece_counts``
(int32, pieces per token) and ``piece_index`` (int64, the concatenation over
tokens of the piece positions each token uses, in order; its length is
``piece_counts.sum()``). Pooling gathers rows by ``piece_index`` and reduces them
by ``piece_counts`` (see :func:`spacy_ctx.backends.base.pool_pieces`). When the
index is ``0, 1, ..., n_pieces - 1`` (pieces partition the tokens in order), it
is represented as ``None`` and no gather is needed.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["align_offsets", "doc_token_spans", "identity_or_none", "trim_offsets"]


def doc_token_spans(doc) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Character ``starts``, ``ends`` (int64) and ``is_space`` (bool) of every token."""
    if len(doc) == 0:
        empty = np.zeros((0,), dtype=np.int64)
        return empty, empty, np.zeros((0,), dtype=bool)
    # Attribute names as strings: pieces/ does not import spaCy (tests/test_layout.py).
    array = doc.to_array(["IDX", "LENGTH", "IS_SPACE"]).astype(np.int64)
    starts = array[:, 0]
    return starts, starts + array[:, 1], array[:, 2].astype(bool)


def trim_offsets(text: str, offsets: Sequence[Tuple[int, int]]) -> np.ndarray:
    """``(n, 2)`` int64 piece spans with whitespace trimmed at both ends.

    A span that holds only whitespace (or is empty) becomes empty (start == end).
    """
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).copy()
    n_chars = len(text)
    np.clip(spans, 0, n_chars, out=spans)
    for row in range(len(spans)):
        start, end = int(spans[row, 0]), int(spans[row, 1])
        # Most pieces need no trimming; check both ends before looping.
        if start < end and not text[start].isspace() and not text[end - 1].isspace():
            continue
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        spans[row] = (start, end)
    return spans


def align_offsets(
    spans: np.ndarray,
    token_starts: np.ndarray,
    token_ends: np.ndarray,
    token_is_space: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Align trimmed piece spans to tokens; returns ``(piece_counts, piece_index)``.

    ``spans``: (n_pieces, 2) character spans (already trimmed, see
    :func:`trim_offsets`). ``token_starts``/``token_ends``: the tokens' character
    spans, sorted and non-overlapping as in a Doc. Tokens flagged in
    ``token_is_space`` never receive pieces.
    """
    n_tokens = len(token_starts)
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if n_tokens == 0 or len(spans) == 0:
        return np.zeros((n_tokens,), dtype=np.int32), np.zeros((0,), dtype=np.int64)
    starts, ends = spans[:, 0], spans[:, 1]
    # Tokens overlapping [start, end): the first token ending after start up to
    # (excluded) the first token starting at or after end. Empty spans give none.
    first = np.searchsorted(token_ends, starts, side="right")
    last = np.searchsorted(token_starts, ends, side="left")
    n_per_piece = np.where(ends > starts, np.maximum(last - first, 0), 0)
    piece = np.repeat(np.arange(len(spans), dtype=np.int64), n_per_piece)
    offsets_in_piece = np.arange(len(piece), dtype=np.int64) - np.repeat(
        np.cumsum(n_per_piece) - n_per_piece, n_per_piece
    )
    token = np.repeat(first, n_per_piece) + offsets_in_piece
    if token_is_space is not None and len(token):
        keep = ~np.asarray(token_is_space, dtype=bool)[token]
        piece, token = piece[keep], token[keep]
    # Pieces come in order, so a stable sort by token keeps each token's pieces in order.
    order = np.argsort(token, kind="stable")
    piece_counts = np.bincount(token, minlength=n_tokens).astype(np.int32)
    return piece_counts, piece[order]


def identity_or_none(piece_index: Optional[np.ndarray], n_pieces: int) -> Optional[np.ndarray]:
    """``None`` when ``piece_index`` is ``0..n_pieces-1`` (the pooling fast path)."""
    if piece_index is None:
        return None
    if len(piece_index) == n_pieces and (
        n_pieces == 0 or np.array_equal(piece_index, np.arange(n_pieces))
    ):
        return None
    return piece_index
