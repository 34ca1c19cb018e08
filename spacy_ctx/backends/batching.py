"""Packing variable-length sequences into padded batches under a size budget, and the
device-memory helpers of batched encoding (out-of-memory back-off, pinned transfers)."""

from __future__ import annotations

import gc
from typing import Dict, List, Optional, Sequence, Tuple, Type

import numpy as np
import torch


def pack_by_length(
    lengths: Sequence[int], max_batch_tokens: int, *, overhead: Optional[int] = None
) -> List[List[int]]:
    """Group sequence indices into batches, longest first.

    A batch's padded size is ``len(batch) * longest`` and stays within
    ``max_batch_tokens``; a sequence longer than the budget gets a batch of its
    own. Sorting by length keeps padding small; callers un-sort by index.

    ``overhead`` is what one more forward pass costs, counted in padded positions.
    None fills each batch up to the budget (fewest batches). With a number, the
    batches are the runs of the sorted sequences that minimise ``padded positions +
    overhead * batches`` (exactly, by dynamic programming): on a CPU, where a padded
    position costs as much as a real one and a forward pass little more (see
    :func:`batch_overhead`), a batch of short documents of mixed lengths is split
    into groups of similar length instead of being padded to its longest (64 tweets
    padded to their longest are ~45% padding).
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if overhead is not None:
        sizes = [max(int(lengths[i]), 1) for i in order]
        return [
            [order[k] for k in range(start, end)]
            for start, end in _cheapest_runs(sizes, max_batch_tokens, int(overhead))
        ]
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


def _cheapest_runs(sizes: Sequence[int], budget: int, overhead: int) -> List[Tuple[int, int]]:
    """``(start, end)`` runs partitioning ``sizes`` (sorted longest first) that minimise
    ``sum(rows * sizes[start] + overhead)``, each run within ``budget`` padded
    positions (or of a single row).

    Some optimal partition has contiguous runs in sorted order (moving a shorter
    sequence into the batch of a longer one's neighbours never raises a longest
    length), so a dynamic programme over run ends is exact; it takes O(n x rows per
    batch) and is vectorised over the runs that start at the same sequence.
    """
    n = len(sizes)
    if overhead < 0:
        raise ValueError(f"overhead must be >= 0, got {overhead}")
    size = np.asarray(sizes, dtype=np.int64)
    cost = np.full(n + 1, np.iinfo(np.int64).max // 4, dtype=np.int64)  # cost of the first j
    cost[0] = 0
    run_start = np.zeros(n + 1, dtype=np.int64)
    for start in range(n):
        rows = max(1, min(n - start, budget // int(size[start])))
        candidate = cost[start] + overhead + size[start] * np.arange(1, rows + 1, dtype=np.int64)
        current = cost[start + 1 : start + rows + 1]
        # On ties the later start wins: the last run is the shortest, the first ones are
        # full, as in the greedy fill.
        better = candidate <= current
        current[better] = candidate[better]
        run_start[start + 1 : start + rows + 1][better] = start
    runs: List[Tuple[int, int]] = []
    end = n
    while end > 0:
        start = int(run_start[end])
        runs.append((start, end))
        end = start
    return runs[::-1]


def batch_overhead(device: torch.device) -> int:
    """The ``overhead`` of :func:`pack_by_length` for a transformer on ``device``.

    CPU: 64 positions per torch thread. With one thread (all-MiniLM-L6-v2, 2-core
    AMD EPYC) a forward pass costs ~4 ms on top of ~0.24 ms per position, i.e.
    ~17 positions, and batches under ~256 positions run their matrix products less
    efficiently; with more threads a position gets cheaper while the fixed cost (and
    each op's thread synchronisation, which a busy machine stretches) does not.
    Accelerators: 4,096 positions: until the GPU is saturated a padded position
    costs it almost nothing, while every pass launches hundreds of kernels, so a
    batch is split only where padding wastes more than that.
    """
    if torch.device(device).type == "cpu":
        return 64 * max(1, torch.get_num_threads())
    return 4096


def batch_stats(
    lengths: Sequence[int], max_batch_tokens: int, *, overhead: Optional[int] = None
) -> Dict[str, int]:
    """``n_batches`` and ``n_padded_positions`` (rows x longest, summed) of
    :func:`pack_by_length` with the same arguments."""
    batches = pack_by_length(lengths, max_batch_tokens, overhead=overhead)
    return {
        "n_batches": len(batches),
        "n_padded_positions": sum(len(b) * max(lengths[i] for i in b) for b in batches),
    }


# -- device memory -------------------------------------------------------------------------
def _oom_errors() -> Tuple[Type[BaseException], ...]:
    """The exception types of an accelerator out-of-memory (``torch.OutOfMemoryError``
    exists from torch 2.5 on; ``torch.cuda.OutOfMemoryError`` is the older name)."""
    found = []
    for owner in (torch, torch.cuda):
        error = getattr(owner, "OutOfMemoryError", None)
        if isinstance(error, type) and error not in found:
            found.append(error)
    return tuple(found)


#: Catch these to handle an out-of-memory of the device (see :func:`_oom_errors`).
OOM_ERRORS: Tuple[Type[BaseException], ...] = _oom_errors()


def free_device_memory() -> None:
    """Return cached, unused blocks of the CUDA allocator after an out-of-memory, so a
    smaller retry (or other processes) can use them; a no-op without CUDA."""
    gc.collect()  # tensors kept by reference cycles (e.g. a traceback's frames)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def halved_budget(budget: int, longest: int) -> int:
    """The batch budget after an out-of-memory on a batch whose longest sequence has
    ``longest`` positions: half, but never below one such sequence."""
    return max(budget // 2, longest, 1)


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy array as a tensor on ``device``.

    For CUDA the host copy is made in pinned (page-locked) memory and copied with
    ``non_blocking=True``: the transfer is a DMA that does not stall this thread, and
    kernels queued on the stream wait for it. PyTorch's pinned-memory cache keeps
    the host buffer alive until the copy is done.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
