"""``CtxData``: the token-aligned contextual layers stored on a Doc, and its msgpack codec.

This module imports numpy only (not spaCy or torch): srsly loads the codec through
entry points while spaCy itself is being imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

VECTOR_MODES = ("last", "mean")
_MSGPACK_KEY = "__spacy_ctx_data__"


@dataclass
class CtxData:
    """Token-aligned contextual layers of one Doc.

    layers: (n_stored_layers, len(doc), width), float32 or float16.
    layer_names: names of the stored layers, e.g. ``["layer_6"]``.
    model_name: the encoder the vectors came from.
    piece_counts: pieces (or characters-tokens) each spaCy token was encoded as;
        a token with 0 pieces (whitespace) has an all-zero row.
    vector_mode: how :attr:`vectors` combine stored layers: ``"last"`` layer or ``"mean"``.
    token_spans: optional (n_rows, 2) int64 character spans ``[start, end)`` of the
        tokens the rows belong to (``token.idx``, ``token.idx + len(token)``), in order
        and disjoint. ``doc._.ctx`` fills it in when it is set, so the rows can follow
        retokenization (:meth:`realign`). ``None`` in payloads written before spans existed.
    text_hash: optional CRC-32 of the Doc's UTF-8 text the rows were computed for;
        retokenization keeps the text, so a different hash means a different Doc.
    """

    layers: np.ndarray
    layer_names: List[str]
    model_name: str
    piece_counts: np.ndarray
    vector_mode: str = "last"
    token_spans: Optional[np.ndarray] = field(default=None, repr=False)
    text_hash: Optional[int] = None
    _vectors: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.layers.ndim != 3:
            raise ValueError(f"CtxData.layers must be 3-d, got shape {self.layers.shape}")
        if len(self.layer_names) != self.layers.shape[0]:
            raise ValueError(
                f"{len(self.layer_names)} layer names for {self.layers.shape[0]} layers"
            )
        if len(self.piece_counts) != self.layers.shape[1]:
            raise ValueError(
                f"{len(self.piece_counts)} piece counts for {self.layers.shape[1]} tokens"
            )
        if self.vector_mode not in VECTOR_MODES:
            raise ValueError(f"vector_mode must be one of {VECTOR_MODES}")
        if self.token_spans is not None:
            spans = np.asarray(self.token_spans)
            if spans.shape != (self.layers.shape[1], 2):
                raise ValueError(
                    f"CtxData.token_spans must have shape ({self.layers.shape[1]}, 2), "
                    f"got {spans.shape}"
                )
            if spans.size and not np.issubdtype(spans.dtype, np.integer):
                raise ValueError(f"CtxData.token_spans must be integers, got {spans.dtype}")
            self.token_spans = spans.astype(np.int64, copy=False)
            if (self.token_spans[:, 1] < self.token_spans[:, 0]).any():
                raise ValueError("CtxData.token_spans has a span that ends before it starts")
        if self.text_hash is not None:
            self.text_hash = int(self.text_hash)

    @property
    def n_rows(self) -> int:
        """Number of token rows (``len(doc)`` of the tokenization they belong to)."""
        return int(self.layers.shape[1])

    @property
    def width(self) -> int:
        return int(self.layers.shape[2])

    @property
    def vectors(self) -> np.ndarray:
        """(len(doc), width) float32 token vectors, per :attr:`vector_mode`."""
        if self._vectors is None:
            if self.vector_mode == "last" or self.layers.shape[0] == 1:
                vectors = self.layers[-1].astype(np.float32)
            else:
                vectors = self.layers.astype(np.float32).mean(axis=0)
            self._vectors = vectors
        return self._vectors

    def has_vector(self, i: int) -> bool:
        return bool(self.piece_counts[i] > 0)

    def mean_vector(self, start: int = 0, end: Optional[int] = None) -> np.ndarray:
        """Average of the token vectors in ``[start, end)`` that have pieces."""
        rows = self.vectors[start:end]
        keep = self.piece_counts[start:end] > 0
        if not keep.any():
            return np.zeros((self.width,), dtype=np.float32)
        return rows[keep].mean(axis=0)

    @property
    def nbytes(self) -> int:
        spans = 0 if self.token_spans is None else self.token_spans.nbytes
        return int(self.layers.nbytes + self.piece_counts.nbytes + spans)

    def realign(self, token_spans: np.ndarray) -> "CtxData":
        """The rows re-aligned to new tokens given by their character spans.

        ``token_spans`` is an (n, 2) array of ``[start, end)`` character offsets of the
        new tokens (of the same text). Each new token gets the stored rows whose spans
        overlap its own:

        - exactly one (an unchanged token, or one part of a split token): that row,
          copied exactly, and its piece count (every part of a split token gets the
          full count of the token it came from, so ``has_vector`` stays as it was);
        - several (a merged token): per layer, the mean of those rows that have
          pieces (an all-zero row if none has), in float32 then cast to the stored
          dtype; its piece count is their sum;
        - none (only possible for an empty token between stored ones): a zero row
          and 0 pieces.

        Requires :attr:`token_spans`; the stored spans must be in order and disjoint,
        the new ones need not be.
        """
        if self.token_spans is None:
            raise ValueError("CtxData has no token_spans, so its rows cannot be re-aligned")
        old = self.token_spans
        if len(old) > 1 and (old[1:, 0] < old[:-1, 1]).any():
            raise ValueError("CtxData.token_spans must be in order and must not overlap")
        new = np.asarray(token_spans, dtype=np.int64).reshape(-1, 2)
        n_layers, _, width = self.layers.shape
        # Stored rows overlapping [s, e): old_end > s and old_start < e. Old spans are
        # sorted and disjoint, so both ends are non-decreasing and this is a range.
        lo = np.searchsorted(old[:, 1], new[:, 0], side="right")
        hi = np.maximum(np.searchsorted(old[:, 0], new[:, 1], side="left"), lo)
        counts = hi - lo
        layers = np.zeros((n_layers, len(new), width), dtype=self.layers.dtype)
        piece_counts = np.zeros((len(new),), dtype=np.int32)

        one = np.flatnonzero(counts == 1)
        layers[:, one] = self.layers[:, lo[one]]
        piece_counts[one] = self.piece_counts[lo[one]]

        many = np.flatnonzero(counts > 1)
        if many.size:
            sizes = counts[many]
            offsets = np.cumsum(sizes) - sizes
            rows = np.repeat(lo[many] - offsets, sizes) + np.arange(int(sizes.sum()))
            row_pieces = self.piece_counts[rows].astype(np.int64)
            keep = (row_pieces > 0).astype(np.float32)
            sums = np.add.reduceat(
                self.layers[:, rows].astype(np.float32) * keep[None, :, None], offsets, axis=1
            )
            n_keep = np.add.reduceat(keep, offsets)
            means = sums / np.maximum(n_keep, 1.0)[None, :, None]
            layers[:, many] = means.astype(self.layers.dtype)
            piece_counts[many] = np.add.reduceat(row_pieces, offsets)

        return CtxData(
            layers=layers,
            layer_names=list(self.layer_names),
            model_name=self.model_name,
            piece_counts=piece_counts,
            vector_mode=self.vector_mode,
            token_spans=new,
            text_hash=self.text_hash,
        )

    def to_dict(self) -> Dict[str, Any]:
        data = {
            "layers": self.layers,
            "layer_names": list(self.layer_names),
            "model_name": self.model_name,
            "piece_counts": self.piece_counts,
            "vector_mode": self.vector_mode,
        }
        if self.token_spans is not None:
            data["token_spans"] = self.token_spans
        if self.text_hash is not None:
            data["text_hash"] = self.text_hash
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CtxData":
        """Inverse of :meth:`to_dict`; payloads without ``token_spans`` (older
        versions) load with ``token_spans=None``."""
        spans = data.get("token_spans")
        text_hash = data.get("text_hash")
        return cls(
            layers=np.asarray(data["layers"]),
            layer_names=list(data["layer_names"]),
            model_name=str(data["model_name"]),
            piece_counts=np.asarray(data["piece_counts"], dtype=np.int32),
            vector_mode=str(data.get("vector_mode", "last")),
            token_spans=None if spans is None else np.asarray(spans, dtype=np.int64).reshape(-1, 2),
            text_hash=None if text_hash is None else int(text_hash),
        )


# -- msgpack (registered as entry points in setup.cfg) --
def serialize_ctx_data(obj: Any, chain=None) -> Any:
    """srsly msgpack encoder for :class:`CtxData`."""
    if isinstance(obj, CtxData):
        return {_MSGPACK_KEY: obj.to_dict()}
    return obj if chain is None else chain(obj)


def deserialize_ctx_data(obj: Any, chain=None) -> Any:
    """srsly msgpack decoder for :class:`CtxData`."""
    if isinstance(obj, dict) and _MSGPACK_KEY in obj:
        return CtxData.from_dict(obj[_MSGPACK_KEY])
    return obj if chain is None else chain(obj)
