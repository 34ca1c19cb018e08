"""Packing variable-length sequences into padded batches under a size budget."""

from __future__ import annotations

from typing import Dict, List, Sequence


def pack_by_length(lengths: Sequence[int], max_batch_tokens: int) -> List[List[int]]:
    """Group sequence indices into batches, longest first.

    A batch's padded size is ``len(batch) * longest`` and stays within
    ``max_batch_tokens``; a sequence longer than the budget gets a batch of its
    own. Sorting by length keeps padding small; callers un-sort by index.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: List[List[int]] = []
    current: List[int] = []
    longest = 0
    for index in order:
        size = max(lengths[index], 1)
        if current and (len(current) + 1) * max(longest, size) > max_batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


def batch_stats(lengths: Sequence[int], max_batch_tokens: int) -> Dict[str, int]:
    """``n_batches`` and ``n_padded_positions`` (rows x longest, summed) of :func:`pack_by_length`."""
    batches = pack_by_length(lengths, max_batch_tokens)
    return {
        "n_batches": len(batches),
        "n_padded_positions": sum(len(b) * max(lengths[i] for i in b) for b in batches),
    }
