"""``CtxData``: the token-aligned contextual layers stored on a Doc, and its msgpack codec.

This module imports numpy only (not spaCy or torch): srsly loads the codec through
entry points while spaCy itself is being imported.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

VECTOR_MODES = ("last", "mean")
STORE_DTYPES = ("float32", "float16", "int8")
_MSGPACK_KEY = "__spacy_ctx_data__"
INT8_MAX = 127  # int8 values lie in [-INT8_MAX, INT8_MAX] (symmetric)
_INT8_MAX = INT8_MAX
_UNSET: Any = object()


def quantize_rows(layers: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 quantization of every row (last axis) of ``layers``.

    Returns ``(values, scales)``: int8 values in ``[-127, 127]`` shaped like ``layers``
    and one float32 scale per row (``absmax / 127``, shape ``layers.shape[:-1]``), so
    that ``values * scales[..., None]`` is within half a step (``scale / 2``) of each
    value. An all-zero row gets scale 0 and stays exactly zero.
    """
    x = np.asarray(layers, dtype=np.float32)
    scales = (np.abs(x).max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1])).astype(np.float32)
    scales /= np.float32(_INT8_MAX)
    scaled = np.zeros_like(x)
    np.divide(x, scales[..., None], out=scaled, where=scales[..., None] > 0)
    values = np.clip(np.rint(scaled), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return values, scales


def dequantize_rows(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 rows of :func:`quantize_rows`' output."""
    return values.astype(np.float32) * np.asarray(scales, dtype=np.float32)[..., None]


class CtxData:
    """Token-aligned contextual layers of one Doc.

    layers: (n_stored_layers, len(doc), width) float32 or float16 array; or, with
        ``scales``, the int8 values of :func:`quantize_rows` (``store_dtype = "int8"``).
        The :attr:`layers` attribute is always a float array: int8 payloads are
        dequantized to float32 on first access and cached (4 bytes per value in memory
        for as long as the object lives; :attr:`vectors` alone does not need it).
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
    scales: (n_stored_layers, len(doc)) float32 per-row scales of int8 ``layers``;
        ``None`` for float payloads.
    """

    def __init__(
        self,
        layers: np.ndarray,
        layer_names: List[str],
        model_name: str,
        piece_counts: np.ndarray,
        vector_mode: str = "last",
        token_spans: Optional[np.ndarray] = None,
        text_hash: Optional[int] = None,
        scales: Optional[np.ndarray] = None,
    ) -> None:
        stored = np.asarray(layers)
        if stored.ndim != 3:
            raise ValueError(f"CtxData.layers must be 3-d, got shape {stored.shape}")
        if scales is None:
            if stored.dtype.kind != "f":
                raise ValueError(
                    f"CtxData.layers must be float32 or float16, got {stored.dtype} "
                    "(int8 values need their scales: CtxData.from_float(..., dtype='int8'))"
                )
        else:
            if stored.dtype != np.int8:
                raise ValueError(f"CtxData.layers with scales must be int8, got {stored.dtype}")
            scales = np.asarray(scales, dtype=np.float32)
            if scales.shape != stored.shape[:2]:
                raise ValueError(
                    f"CtxData.scales must have shape {stored.shape[:2]} (layers, rows), "
                    f"got {scales.shape}"
                )
        self._stored = stored
        self.scales: Optional[np.ndarray] = scales
        self.layer_names = list(layer_names)
        self.model_name = model_name
        self.piece_counts = np.asarray(piece_counts)
        self.vector_mode = vector_mode
        self.token_spans = token_spans
        self.text_hash = text_hash
        self._layers: Optional[np.ndarray] = None  # dequantized int8 layers, cached
        self._vectors: Optional[np.ndarray] = None
        if len(self.layer_names) != stored.shape[0]:
            raise ValueError(f"{len(self.layer_names)} layer names for {stored.shape[0]} layers")
        if len(self.piece_counts) != stored.shape[1]:
            raise ValueError(
                f"{len(self.piece_counts)} piece counts for {stored.shape[1]} tokens"
            )
        if self.vector_mode not in VECTOR_MODES:
            raise ValueError(f"vector_mode must be one of {VECTOR_MODES}")
        if self.token_spans is not None:
            spans = np.asarray(self.token_spans)
            if spans.shape != (stored.shape[1], 2):
                raise ValueError(
                    f"CtxData.token_spans must have shape ({stored.shape[1]}, 2), "
                    f"got {spans.shape}"
                )
            if spans.size and not np.issubdtype(spans.dtype, np.integer):
                raise ValueError(f"CtxData.token_spans must be integers, got {spans.dtype}")
            self.token_spans = spans.astype(np.int64, copy=False)
            if (self.token_spans[:, 1] < self.token_spans[:, 0]).any():
                raise ValueError("CtxData.token_spans has a span that ends before it starts")
        if self.text_hash is not None:
            self.text_hash = int(self.text_hash)

    @classmethod
    def from_float(
        cls, layers: np.ndarray, *args: Any, dtype: str = "float32", **kwargs: Any
    ) -> "CtxData":
        """A CtxData storing float ``layers`` as ``dtype`` (one of :data:`STORE_DTYPES`);
        the other arguments are those of the constructor."""
        if dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        if dtype == "int8":
            values, scales = quantize_rows(layers)
            return cls(values, *args, scales=scales, **kwargs)
        return cls(np.asarray(layers).astype(dtype, copy=False), *args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"CtxData(layers={self._stored.shape} {self.store_dtype}, "
            f"layer_names={self.layer_names!r}, model_name={self.model_name!r}, "
            f"vector_mode={self.vector_mode!r})"
        )

    @property
    def layers(self) -> np.ndarray:
        """(n_stored_layers, n_rows, width) float array: as stored for float32/float16,
        dequantized to float32 (once, then cached) for int8."""
        if self.scales is None:
            return self._stored
        if self._layers is None:
            self._layers = dequantize_rows(self._stored, self.scales)
        return self._layers

    @property
    def stored(self) -> np.ndarray:
        """The array as stored and serialized (int8 values for ``store_dtype = "int8"``)."""
        return self._stored

    @property
    def store_dtype(self) -> str:
        """``"float32"``, ``"float16"`` or ``"int8"``."""
        return "int8" if self.scales is not None else self._stored.dtype.name

    @property
    def n_rows(self) -> int:
        """Number of token rows (``len(doc)`` of the tokenization they belong to)."""
        return int(self._stored.shape[1])

    @property
    def width(self) -> int:
        return int(self._stored.shape[2])

    def _layer(self, index: int) -> np.ndarray:
        """One stored layer as float32 (int8: without dequantizing the others)."""
        if self.scales is None or self._layers is not None:
            return self.layers[index].astype(np.float32)
        return dequantize_rows(self._stored[index], self.scales[index])

    @property
    def vectors(self) -> np.ndarray:
        """(len(doc), width) float32 token vectors, per :attr:`vector_mode`."""
        if self._vectors is None:
            if self.vector_mode == "last" or self._stored.shape[0] == 1:
                vectors = self._layer(-1)
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
        """Bytes of the stored arrays (as serialized; not the int8 dequantization cache)."""
        spans = 0 if self.token_spans is None else self.token_spans.nbytes
        scales = 0 if self.scales is None else self.scales.nbytes
        return int(self._stored.nbytes + scales + self.piece_counts.nbytes + spans)

    def replace(
        self, *, token_spans: Any = _UNSET, text_hash: Any = _UNSET
    ) -> "CtxData":
        """A new CtxData sharing the arrays, with other ``token_spans``/``text_hash``."""
        return CtxData(
            self._stored,
            self.layer_names,
            self.model_name,
            self.piece_counts,
            vector_mode=self.vector_mode,
            token_spans=self.token_spans if token_spans is _UNSET else token_spans,
            text_hash=self.text_hash if text_hash is _UNSET else text_hash,
            scales=self.scales,
        )

    def realign(self, token_spans: np.ndarray) -> "CtxData":
        """The rows re-aligned to new tokens given by their character spans.

        ``token_spans`` is an (n, 2) array of ``[start, end)`` character offsets of the
        new tokens (of the same text). Each new token gets the stored rows whose spans
        overlap its own:

        - exactly one (an unchanged token, or one part of a split token): that row,
          copied exactly (int8: values and scale), and its piece count (every part of a
          split token gets the full count of the token it came from, so ``has_vector``
          stays as it was);
        - several (a merged token): per layer, the mean of those rows that have
          pieces (an all-zero row if none has), in float32 then cast to the stored
          dtype (int8: quantized again with its own scale); its piece count is their sum;
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
        stored = self._stored
        n_layers, _, width = stored.shape
        # Stored rows overlapping [s, e): old_end > s and old_start < e. Old spans are
        # sorted and disjoint, so both ends are non-decreasing and this is a range.
        lo = np.searchsorted(old[:, 1], new[:, 0], side="right")
        hi = np.maximum(np.searchsorted(old[:, 0], new[:, 1], side="left"), lo)
        counts = hi - lo
        layers = np.zeros((n_layers, len(new), width), dtype=stored.dtype)
        scales = None if self.scales is None else np.zeros((n_layers, len(new)), np.float32)
        piece_counts = np.zeros((len(new),), dtype=np.int32)

        one = np.flatnonzero(counts == 1)
        layers[:, one] = stored[:, lo[one]]
        if scales is not None:
            scales[:, one] = self.scales[:, lo[one]]
        piece_counts[one] = self.piece_counts[lo[one]]

        many = np.flatnonzero(counts > 1)
        if many.size:
            sizes = counts[many]
            offsets = np.cumsum(sizes) - sizes
            rows = np.repeat(lo[many] - offsets, sizes) + np.arange(int(sizes.sum()))
            row_pieces = self.piece_counts[rows].astype(np.int64)
            keep = (row_pieces > 0).astype(np.float32)
            if scales is None:
                values = stored[:, rows].astype(np.float32)
            else:
                values = dequantize_rows(stored[:, rows], self.scales[:, rows])
            sums = np.add.reduceat(values * keep[None, :, None], offsets, axis=1)
            n_keep = np.add.reduceat(keep, offsets)
            means = sums / np.maximum(n_keep, 1.0)[None, :, None]
            if scales is None:
                layers[:, many] = means.astype(stored.dtype)
            else:
                layers[:, many], scales[:, many] = quantize_rows(means)
            piece_counts[many] = np.add.reduceat(row_pieces, offsets)

        return CtxData(
            layers,
            list(self.layer_names),
            self.model_name,
            piece_counts,
            vector_mode=self.vector_mode,
            token_spans=new,
            text_hash=self.text_hash,
            scales=scales,
        )

    def to_dict(self) -> Dict[str, Any]:
        """The payload as msgpack-able values (numpy arrays as stored)."""
        data = {
            "layers": self._stored,
            "layer_names": list(self.layer_names),
            "model_name": self.model_name,
            "piece_counts": self.piece_counts,
            "vector_mode": self.vector_mode,
        }
        if self.scales is not None:
            data["scales"] = self.scales
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
        scales = data.get("scales")
        return cls(
            np.asarray(data["layers"]),
            list(data["layer_names"]),
            str(data["model_name"]),
            np.asarray(data["piece_counts"], dtype=np.int32),
            vector_mode=str(data.get("vector_mode", "last")),
            token_spans=None if spans is None else np.asarray(spans, dtype=np.int64).reshape(-1, 2),
            text_hash=None if text_hash is None else int(text_hash),
            scales=None if scales is None else np.asarray(scales, dtype=np.float32),
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
