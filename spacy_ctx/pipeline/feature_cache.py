"""Per-Doc encoder outputs kept across epochs for frozen encoders."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from spacy.attrs import ORTH, SENT_START
from spacy.tokens import Doc

from ..backends import CtxOutput


def doc_key(doc: Doc, keep_layers: Optional[Sequence[int]]) -> bytes:
    """Identity of a Doc's encoder input: its tokens, spaces and sentence starts."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(doc.to_array([ORTH, SENT_START]).tobytes())
    digest.update(bytes(int(t.whitespace_ != "") for t in doc))
    digest.update(repr(None if keep_layers is None else tuple(keep_layers)).encode())
    return digest.digest()


class FeatureCache:
    """LRU map from :func:`doc_key` to a CPU copy of a Doc's outputs, bounded in bytes.

    Outputs come back bit-identical (float32 kept as is). ``max_mb=0`` disables it.
    """

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 1024 * 1024)
        # Per key: CPU layers, piece counts, piece index (None: identity).
        self._entries: "OrderedDict[bytes, Tuple[torch.Tensor, np.ndarray, Optional[np.ndarray]]]" = (
            OrderedDict()
        )
        self.n_bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, device: torch.device) -> Optional[CtxOutput]:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        layers, piece_counts, piece_index = entry
        return CtxOutput(layers.to(device), piece_counts, piece_index)

    def put(self, key: bytes, output: CtxOutput) -> None:
        if not self.enabled or key in self._entries:
            return
        layers = output.layers.detach().to("cpu", copy=True)
        size = layers.numel() * layers.element_size()
        if size > self.max_bytes:
            return
        self._entries[key] = (layers, output.piece_counts, output.piece_index)
        self.n_bytes += size
        while self.n_bytes > self.max_bytes:
            _, (old, _, _) = self._entries.popitem(last=False)
            self.n_bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self.n_bytes = 0
