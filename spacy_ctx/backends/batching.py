"""Packing variable-length sequences into padded batches under a size budget, and the
device-memory helpers of batched encoding (out-of-memory back-off, pinned transfers)."""

from __future__ import annotations

import gc
from typing import Dict, List, Sequence, Tuple, Type

import numpy as np
import torch


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
