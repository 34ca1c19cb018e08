"""A tiny random Hugging Face ModernBERT checkpoint for tests.

Hidden 64, 3 layers with a global layer every 2 (layers 0 and 2 global, layer 1
local) and an 8-piece local window (4 each side), so that test texts of 30+
pieces exercise the sliding window. Norm weights (and biases, where the config
has them) and all biases are perturbed away from HF's 1/0 initialisation so
that parity checks exercise them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from .tiny_models import build_eager, save

VOCAB_SIZE = 120
PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3

CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=512,
    local_attention=8,
    global_attn_every_n_layers=2,
    global_rope_theta=160_000.0,
    local_rope_theta=10_000.0,
    pad_token_id=PAD_ID,
    bos_token_id=CLS_ID,
    cls_token_id=CLS_ID,
    eos_token_id=SEP_ID,
    sep_token_id=SEP_ID,
)


def build(*, seed: int = 0, head: Optional[str] = None, **overrides: Any) -> torch.nn.Module:
    """The random HF model (``ModernBertModel``, or ``ModernBertForMaskedLM`` for
    ``head="mlm"``) in eval mode with eager attention. ``overrides`` replace
    :data:`CONFIG` entries (e.g. ``norm_bias=True``)."""
    import transformers

    return build_eager(
        transformers.ModernBertConfig,
        {None: transformers.ModernBertModel, "mlm": transformers.ModernBertForMaskedLM},
        {**CONFIG, **overrides},
        seed=seed, head=head, is_norm=lambda name: "norm" in name, bias_scale=0.05,
    )


def write(path: Path, *, seed: int = 0, head: Optional[str] = None, **overrides: Any) -> Path:
    """Save :func:`build`'s model with ``save_pretrained`` into ``path``; returns ``path``."""
    return save(build(seed=seed, head=head, **overrides), path)
