"""Dynamic masking for masked-language-model pretraining (BERT, RoBERTa, SpanBERT).

:func:`mask_for_mlm` picks positions of a batch to predict and corrupts them
80/10/10 ([MASK] / a random piece / unchanged, as BERT). A new mask is drawn on
every call (the generator's state advances), so each pass over the data sees
different masks (RoBERTa's dynamic masking); the same generator seed gives the
same masks.

Three ways to choose what is predicted, all aiming at ``probability`` (15%) of
the *maskable pieces* (not specials, not padding) on average:

``"piece"``
    every maskable piece independently with ``probability`` (BERT,
    ``DataCollatorForLanguageModeling``).
``"word"``
    whole-word masking with spaCy's tokens: every *unit* (``word_ids``: one spaCy
    token, see :mod:`spacy_ctx.training.packing`) is chosen independently with
    ``probability`` and all its pieces are chosen with it. Calibration: a piece
    is chosen exactly when its unit is, so each piece is chosen with probability
    ``probability`` and the expected fraction of chosen pieces is ``probability``
    whatever the words' lengths (linearity of expectation); 15% of tokens and
    15% of pieces on average, with a larger variance per sequence than "piece".
``"span"``
    SpanBERT: per sequence a budget of ``probability * n_maskable_pieces``
    pieces; spans of whole units with lengths from a geometric distribution
    (``span_p``, clipped at ``max_span`` units) start at uniformly random units
    until the budget is used. The unit that would overshoot the budget is taken
    with probability ``remaining / its_pieces`` and sampling stops, so the
    expected number of chosen pieces equals the budget exactly. A span whose
    start is already chosen is redrawn; spans stop at the end of the sequence.

Labels are the original ids at chosen positions and :data:`IGNORE_INDEX` (-100)
elsewhere (what ``torch.nn.functional.cross_entropy`` ignores). A sequence may
end up with no chosen piece (short sequences); a batch where no piece at all is
chosen has only -100 labels, and the caller must not divide by zero.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, List, Literal, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError

__all__ = ["IGNORE_INDEX", "MASK_MODES", "mask_for_mlm", "replacement_ids"]

IGNORE_INDEX = -100
MASK_MODES = ("piece", "word", "span")
MaskMode = Literal["piece", "word", "span"]

# Random numbers are drawn in blocks for the span sampler; each draw uses 3 numbers.
_SPAN_DRAWS = 64


def mask_for_mlm(
    input_ids: torch.Tensor,
    *,
    special_mask: torch.Tensor,
    word_ids: Optional[torch.Tensor] = None,
    mode: MaskMode = "piece",
    probability: float = 0.15,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    span_p: float = 0.2,
    max_span: int = 10,
    replace: Tuple[float, float, float] = (0.8, 0.1, 0.1),
    special_ids: Iterable[int] = (),
    attention_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Choose positions to predict and corrupt them; returns ``(masked_ids, labels)``.

    ``input_ids``: (batch, length) int64. ``special_mask``: (batch, length) bool,
    True at specials *and padding* (:func:`spacy_ctx.training.packing.collate`
    sets both); ``attention_mask`` (optional, 1 = real) excludes padding too.
    ``word_ids``: (batch, length) int64 unit index per piece (unique within a
    row), -1 at specials and padding; required for "word" and "span" (a
    maskable piece with -1 counts as a unit of its own). ``mode``, ``probability``,
    ``span_p`` and ``max_span``: see the module docstring. ``replace``: the
    shares of chosen positions set to ``mask_id``, to a random piece, and left
    unchanged. Random pieces are drawn uniformly from ``0..vocab_size-1`` minus
    ``special_ids`` and ``mask_id`` (pass the tokenizer's special ids, e.g.
    :func:`spacy_ctx.training.packing.special_ids_of`, and its ``max_id + 1`` as
    ``vocab_size``). All randomness comes from ``generator`` (on any device;
    numbers are drawn there and moved to the tensors' device), so the same
    generator state gives the same masks, and every call advances it.
    """
    _check_arguments(input_ids, special_mask, word_ids, mode, probability, mask_id, vocab_size,
                     span_p, max_span, replace, attention_mask)
    device = input_ids.device
    maskable = ~special_mask.bool()
    if attention_mask is not None:
        maskable &= attention_mask.bool()
    if mode == "piece":
        draws = _rand(input_ids.shape, generator, device)
        chosen = maskable & (draws < probability)
    else:
        assert word_ids is not None  # checked above
        keys = _unit_keys(word_ids.to(device), maskable)
        if mode == "word":
            n_keys = int(keys.max().item()) + 1 if keys.numel() else 1
            draws = _rand((input_ids.shape[0], n_keys), generator, device)
            chosen = maskable & (torch.gather(draws, 1, keys) < probability)
        else:
            chosen = _choose_spans(keys, maskable, probability, span_p, max_span, generator)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    # Draw the replacement numbers for every position, so the generator advances
    # by the same amount whatever was chosen.
    kind = _rand(input_ids.shape, generator, device)
    pool = replacement_ids(vocab_size, tuple(sorted({int(i) for i in special_ids} | {int(mask_id)})))
    pool = pool.to(device)
    picks = torch.randint(len(pool), input_ids.shape, generator=generator, device=generator.device)
    random_ids = pool[picks.to(device)]
    to_mask = chosen & (kind < replace[0])
    to_random = chosen & (kind >= replace[0]) & (kind < replace[0] + replace[1])
    masked = torch.where(to_mask, torch.full_like(input_ids, int(mask_id)), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def _rand(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform numbers from ``generator`` (on its own device), moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


@lru_cache(maxsize=16)
def replacement_ids(vocab_size: int, excluded: Tuple[int, ...]) -> torch.Tensor:
    """The ids random replacements are drawn from: ``0..vocab_size-1`` minus ``excluded``."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    for token_id in excluded:
        if 0 <= token_id < vocab_size:
            keep[token_id] = False
    pool = torch.nonzero(keep).flatten()
    if len(pool) == 0:
        raise ConfigError(
            f"No piece is left to draw random replacements from: vocab_size {vocab_size} and "
            f"{len(excluded)} special ids. Pass the tokenizer's size as vocab_size."
        )
    return pool


def _check_arguments(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    word_ids: Optional[torch.Tensor],
    mode: str,
    probability: float,
    mask_id: int,
    vocab_size: int,
    span_p: float,
    max_span: int,
    replace: Sequence[float],
    attention_mask: Optional[torch.Tensor],
) -> None:
    if mode not in MASK_MODES:
        raise ConfigError(f"masking = {mode!r} is not one of {', '.join(MASK_MODES)}.")
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be (batch, length); got shape {tuple(input_ids.shape)}.")
    others = [("special_mask", special_mask), ("word_ids", word_ids), ("attention_mask", attention_mask)]
    for name, tensor in others:
        if tensor is not None and tensor.shape != input_ids.shape:
            raise ConfigError(
                f"{name} has shape {tuple(tensor.shape)} but input_ids {tuple(input_ids.shape)}."
            )
    if mode != "piece" and word_ids is None:
        raise ConfigError(f"masking = {mode!r} needs word_ids (the spaCy token of every piece).")
    if not 0.0 <= probability <= 1.0:
        raise ConfigError(f"mask probability must be in [0, 1]; got {probability}.")
    if len(replace) != 3 or any(share < 0 for share in replace) or abs(sum(replace) - 1.0) > 1e-6:
        raise ConfigError(
            f"replace = {tuple(replace)} must be three non-negative shares ([MASK], random, "
            "keep) that sum to 1, e.g. (0.8, 0.1, 0.1)."
        )
    if not 0 <= mask_id < vocab_size:
        raise ConfigError(f"mask_id {mask_id} is outside the vocabulary (0..{vocab_size - 1}).")
    if mode == "span" and (not 0.0 < span_p <= 1.0 or max_span < 1):
        raise ConfigError(f"span_p must be in (0, 1] and max_span >= 1; got {span_p}, {max_span}.")


def _unit_keys(word_ids: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """Non-negative unit keys per position: the word id, or a key of its own for a
    maskable piece without one (beyond every word id); 0 where not maskable."""
    word_ids = word_ids.long()
    offset = int(word_ids.max().item()) + 1 if word_ids.numel() else 0
    positions = torch.arange(word_ids.shape[1], device=word_ids.device).expand_as(word_ids)
    keys = torch.where(word_ids >= 0, word_ids, offset + positions)
    return torch.where(maskable, keys, torch.zeros_like(keys))


def _choose_spans(
    keys: torch.Tensor,
    maskable: torch.Tensor,
    probability: float,
    span_p: float,
    max_span: int,
    generator: torch.Generator,
) -> torch.Tensor:
    chosen = torch.zeros_like(maskable)
    log_q = math.log1p(-span_p) if span_p < 1.0 else None
    for row in range(keys.shape[0]):
        positions = torch.nonzero(maskable[row]).flatten()
        if len(positions) == 0:
            continue
        units, inverse, sizes = torch.unique(keys[row, positions], return_inverse=True, return_counts=True)
        sizes_list: List[int] = sizes.tolist()
        taken = _sample_span_units(sizes_list, probability * len(positions), log_q, max_span, generator)
        if taken:
            unit_chosen = torch.zeros(len(units), dtype=torch.bool, device=keys.device)
            unit_chosen[torch.tensor(taken, device=keys.device)] = True
            chosen[row, positions] = unit_chosen[inverse]
    return chosen


def _sample_span_units(
    sizes: List[int], budget: float, log_q: Optional[float], max_span: int, generator: torch.Generator
) -> List[int]:
    """Indices of the units (in order of their keys) chosen by SpanBERT sampling."""
    n_units = len(sizes)
    taken = [False] * n_units
    total = 0
    draws: List[List[float]] = []
    # Every loop takes at least one unit or redraws; a generous cap keeps a
    # degenerate case (almost every unit taken) from spinning.
    for _ in range(64 * n_units + 64):
        if total >= budget:
            break
        if not draws:
            draws = torch.rand((_SPAN_DRAWS, 3), generator=generator, device=generator.device).tolist()
        u_length, u_start, u_cross = draws.pop()
        if log_q is None:
            length = 1
        else:  # geometric on 1, 2, ... with success probability span_p
            length = int(math.floor(math.log(max(u_length, 1e-12)) / log_q)) + 1
        length = min(length, max_span)
        start = min(int(u_start * n_units), n_units - 1)
        if taken[start]:
            continue
        for unit in range(start, min(start + length, n_units)):
            if taken[unit]:
                continue
            if total + sizes[unit] > budget:
                # Take the overshooting unit with probability remaining/size: the
                # expected total is then exactly the budget.
                if u_cross * sizes[unit] < budget - total:
                    taken[unit] = True
                    total += sizes[unit]
                return [i for i, flag in enumerate(taken) if flag]
            taken[unit] = True
            total += sizes[unit]
    return [i for i, flag in enumerate(taken) if flag]
