"""Per-Doc encoder outputs kept across epochs for frozen encoders."""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from spacy.attrs import ORTH, SENT_START
from spacy.tokens import Doc

from ..backends import CtxOutput

# Cached layers are stored in half precision: it halves the memory a full epoch
# needs and the rounding (~5e-4 relative) is far below what a frozen encoder's
# downstream layers can resolve.
CACHE_DTYPE = torch.float16
# Share of the currently available RAM the cache may use at most.
MEMORY_FRACTION = 0.5


def available_memory_bytes() -> Optional[int]:
    """RAM available to new allocations (psutil, else /proc/meminfo), or None if unknown."""
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unusable: fall back
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def doc_key(doc: Doc, keep_layers: Optional[Sequence[int]]) -> bytes:
    """Identity of a Doc's encoder input: its tokens, spaces and sentence starts."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(doc.to_array([ORTH, SENT_START]).tobytes())
    digest.update(bytes(int(t.whitespace_ != "") for t in doc))
    digest.update(repr(None if keep_layers is None else tuple(keep_layers)).encode())
    return digest.digest()


def _array_bytes(array: Optional[np.ndarray]) -> int:
    return 0 if array is None else int(np.asarray(array).nbytes)


def round_output(output: CtxOutput) -> CtxOutput:
    """``output`` with its layers rounded through the cache dtype (same dtype as before).

    Applied to cache misses too, so a Doc's features never depend on whether they
    came from the cache.
    """
    layers = output.layers
    if layers.dtype == CACHE_DTYPE:
        return output
    rounded = layers.detach().to(CACHE_DTYPE).to(layers.dtype)
    return CtxOutput(rounded, output.piece_counts, output.piece_index)


class FeatureCache:
    """LRU map from :func:`doc_key` to a CPU float16 copy of a Doc's outputs, bounded in bytes.

    The bound is ``max_mb`` (``feature_cache_mb``), capped at run time to
    :data:`MEMORY_FRACTION` of the available RAM. Every cached array counts
    (layers, piece counts, piece index). ``max_mb=0`` disables it.
    """

    def __init__(self, max_mb: float, setting: str = "feature_cache_mb") -> None:
        self.requested_bytes = int(max_mb * 1024 * 1024)
        self.setting = setting
        self._max_bytes: Optional[int] = None  # resolved on first put
        self._entries: "OrderedDict[bytes, Tuple[torch.Tensor, np.ndarray, Optional[np.ndarray], int, torch.dtype]]" = (
            OrderedDict()
        )
        self.n_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._warned_evict = False

    @property
    def enabled(self) -> bool:
        return self.requested_bytes > 0

    @property
    def max_bytes(self) -> int:
        """The effective bound: the setting, capped by available memory (checked once)."""
        if self._max_bytes is None:
            self._max_bytes = self.requested_bytes
            available = available_memory_bytes() if self.enabled else None
            if available is not None:
                cap = int(available * MEMORY_FRACTION)
                if cap < self.requested_bytes:
                    warnings.warn(
                        f"{self.setting} = {self.requested_bytes / 2**20:.0f} MB is more than "
                        f"{MEMORY_FRACTION:.0%} of the available memory "
                        f"({available / 2**20:.0f} MB); the feature cache is capped at "
                        f"{cap / 2**20:.0f} MB. Lower {self.setting} to silence this.",
                        stacklevel=3,
                    )
                    self._max_bytes = cap
        return self._max_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, device: torch.device) -> Optional[CtxOutput]:
        """The cached output for ``key`` on ``device`` in its original dtype, or None (a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        layers, piece_counts, piece_index, _, dtype = entry
        return CtxOutput(layers.to(device=device, dtype=dtype), piece_counts, piece_index)

    def put(self, key: bytes, output: CtxOutput) -> CtxOutput:
        """Store ``output`` and return it rounded through the cache dtype (use that one)."""
        if not self.enabled or key in self._entries:
            return round_output(output)
        half = output.layers.detach().to(CACHE_DTYPE)  # rounded once, on the device
        rounded = CtxOutput(half.to(output.layers.dtype), output.piece_counts, output.piece_index)
        layers = half.to(device="cpu", copy=True)
        size = (
            layers.numel() * layers.element_size()
            + _array_bytes(output.piece_counts)
            + _array_bytes(output.piece_index)
        )
        if size > self.max_bytes:
            return rounded
        self._entries[key] = (layers, output.piece_counts, output.piece_index, size, output.layers.dtype)
        self.n_bytes += size
        while self.n_bytes > self.max_bytes:
            _, (_, _, _, old_size, _) = self._entries.popitem(last=False)
            self.n_bytes -= old_size
            self.evictions += 1
            if not self._warned_evict:
                self._warned_evict = True
                warnings.warn(
                    f"The feature cache is full ({self.max_bytes / 2**20:.0f} MB) and starts "
                    f"evicting. With shuffled epochs a full LRU cache gives almost no hits, so "
                    f"frozen epochs recompute the encoder. Raise {self.setting} (or free memory) "
                    f"so the training data fits.",
                    stacklevel=3,
                )
        return rounded

    def clear(self) -> None:
        """Drop every entry (weights changed)."""
        self._entries.clear()
        self.n_bytes = 0
