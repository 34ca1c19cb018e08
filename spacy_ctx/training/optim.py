"""AdamW with linear warmup and linear decay, the optimizer of BERT-style pretraining.

Weight decay applies to matrices only: biases and normalization weights (every
parameter with fewer than two dimensions) are left undecayed, as in BERT and
RoBERTa. The learning rate rises linearly from 0 to ``learn_rate`` over
``warmup_steps`` optimizer steps and then falls linearly to 0 at ``max_steps``.
Both objects have ``state_dict``/``load_state_dict``, so a resumed run continues
the schedule exactly.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError


def parameter_groups(
    named_parameters: Iterable[Tuple[str, torch.nn.Parameter]], weight_decay: float
) -> List[Dict]:
    """Split trainable parameters into a decayed group (matrices, embeddings) and an
    undecayed one (biases and LayerNorm/RMSNorm weights, i.e. ``ndim < 2``).

    Tied parameters (an MLM decoder sharing the word embeddings) appear once.
    """
    decay: List[torch.nn.Parameter] = []
    no_decay: List[torch.nn.Parameter] = []
    seen = set()
    for _name, param in named_parameters:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_linear_decay(warmup_steps: int, max_steps: int):
    """The learning-rate multiplier of step ``step`` (0-based count of updates done)."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max_steps - step
        return max(0.0, remaining / max(1, max_steps - warmup_steps))

    return factor


def make_optimizer(
    model: torch.nn.Module,
    *,
    learn_rate: float,
    weight_decay: float,
    warmup_steps: int,
    max_steps: int,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
) -> Tuple[torch.optim.AdamW, LambdaLR]:
    """AdamW over ``model``'s trainable parameters and its warmup + linear-decay schedule.

    Call ``scheduler.step()`` after every ``optimizer.step()``.
    """
    if learn_rate <= 0:
        raise ConfigError(f"learn_rate must be > 0, got {learn_rate}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    if not 0 <= warmup_steps <= max_steps:
        raise ConfigError(f"warmup_steps must be in 0..max_steps ({max_steps}), got {warmup_steps}")
    groups = parameter_groups(model.named_parameters(), weight_decay)
    if not any(group["params"] for group in groups):
        raise ConfigError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=learn_rate, betas=betas, eps=eps)
    scheduler = LambdaLR(optimizer, warmup_linear_decay(warmup_steps, max_steps))
    return optimizer, scheduler
