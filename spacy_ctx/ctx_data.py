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
    """

    layers: np.ndarray
    layer_names: List[str]
    model_name: str
    piece_counts: np.ndarray
    vector_mode: str = "last"
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
        return int(self.layers.nbytes + self.piece_counts.nbytes)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "layers": self.layers,
            "layer_names": list(self.layer_names),
            "model_name": self.model_name,
            "piece_counts": self.piece_counts,
            "vector_mode": self.vector_mode,
        }

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CtxData":
        return cls(
            layers=np.asarray(data["layers"]),
            layer_names=list(data["layer_names"]),
            model_name=str(data["model_name"]),
            piece_counts=np.asarray(data["piece_counts"], dtype=np.int32),
            vector_mode=str(data.get("vector_mode", "last")),
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
