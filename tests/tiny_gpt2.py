"""Write a tiny random GPT-2 checkpoint in Hugging Face format (weights and config
only; tokenizers are written by the tests that need them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .tiny_models import perturb

# Model class per ``head``: None is a bare GPT2Model (names without prefix), the
# others nest it under ``transformer.`` next to a task head.
_HEADS = {
    None: "GPT2Model",
    "lm": "GPT2LMHeadModel",
    "sequence": "GPT2ForSequenceClassification",
    "token": "GPT2ForTokenClassification",
}


def config(**overrides: Any) -> Dict[str, Any]:
    """The tiny model's settings: width 64, 3 layers, 4 heads, 64 positions."""
    settings: Dict[str, Any] = {
        "vocab_size": 96,
        "n_embd": 64,
        "n_layer": 3,
        "n_head": 4,
        "n_positions": 64,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": 95,
        "eos_token_id": 95,
    }
    settings.update(overrides)
    return settings


def write(path: Path, *, seed: int = 0, head: Optional[str] = None, **overrides: Any) -> Path:
    """Save a random GPT-2 (``head``: None, "lm", "sequence" or "token") with
    ``save_pretrained`` under ``path`` and return ``path``.

    LayerNorm weights and biases and every bias (zero at initialisation) get small
    random offsets, so parity checks exercise them.
    """
    import transformers

    path = Path(path)
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(**config(**overrides))
    model = getattr(transformers, _HEADS[head])(hf_config).eval()
    perturb(model, is_norm=lambda name: "ln_" in name, generator=torch.Generator().manual_seed(seed + 1))
    model.save_pretrained(path)
    return path
