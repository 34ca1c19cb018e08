"""Cutting long piece sequences into overlapping windows and stitching them back.

Windows live in piece space: each window holds at most ``window`` pieces (the
model's specials come on top), consecutive windows start ``stride`` pieces
apart, and the last window is aligned to the end so nothing is dropped. Where
windows overlap, a piece either takes its vector from the window in which it has
the most context on both sides (``"best"``) or averages all windows (``"mean"``).
For a causal (left-to-right) model such as GPT-2 a piece sees nothing to its
right, so with ``causal=True`` its best window is the one with the most *left*
context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple

import numpy as np

OVERLAP_MODES = ("best", "mean")


@dataclass
class WindowPlan:
    """How one document's pieces are covered by windows.

    ``spans``: (start, end) piece offsets of each window. ``weights``: for every
    piece of every window, in window order, the weight with which it contributes
    to the document piece ``start + offset``; rows of the same piece sum to 1.
    """

    n_pieces: int
    spans: List[Tuple[int, int]]
    weights: np.ndarray

    def windows(self) -> Iterator[Tuple[int, int, np.ndarray]]:
        """``(start, end, weights)`` of each window, ``weights`` a view of this
        window's part of :attr:`weights` (one entry per piece of the window)."""
        offset = 0
        for start, end in self.spans:
            yield start, end, self.weights[offset : offset + end - start]
            offset += end - start

    def destination(self) -> np.ndarray:
        """Document piece index of every window piece, in window order."""
        if not self.spans:
            return np.zeros((0,), dtype=np.int64)
        return np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in self.spans])


def plan_windows(
    n_pieces: int, window: int, stride: int, overlap: str = "best", *, causal: bool = False
) -> WindowPlan:
    """Cover ``n_pieces`` pieces with windows of at most ``window`` pieces.

    ``causal``: with ``"best"`` overlap, rank windows by the context to a piece's
    left only (its offset in the window), for models that attend leftwards.
    """
    if window < 1 or not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"overlap must be one of {OVERLAP_MODES}, got {overlap!r}")
    if n_pieces <= window:
        spans = [(0, n_pieces)] if n_pieces else []
        return WindowPlan(n_pieces, spans, np.ones((n_pieces,), dtype=np.float32))
    starts = list(range(0, n_pieces - window + 1, stride))
    if starts[-1] + window < n_pieces:
        starts.append(n_pieces - window)
    spans = [(s, s + window) for s in starts]
    offsets = np.arange(window)
    if overlap == "mean":
        coverage = np.zeros((n_pieces,), dtype=np.float32)
        for s, e in spans:
            coverage[s:e] += 1
        weights = np.concatenate([1.0 / coverage[s:e] for s, e in spans]).astype(np.float32)
        return WindowPlan(n_pieces, spans, weights)
    # Context of a piece in a window = distance to the nearer window edge, or for a
    # causal model the number of pieces before it in the window.
    context = offsets if causal else np.minimum(offsets, window - 1 - offsets)
    best_context = np.full((n_pieces,), -1, dtype=np.int64)
    best_window = np.zeros((n_pieces,), dtype=np.int64)
    for i, (s, e) in enumerate(spans):
        better = context > best_context[s:e]
        best_context[s:e][better] = context[better]
        best_window[s:e][better] = i
    weights = np.concatenate(
        [(best_window[s:e] == i).astype(np.float32) for i, (s, e) in enumerate(spans)]
    )
    return WindowPlan(n_pieces, spans, weights)
