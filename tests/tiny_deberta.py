"""A tiny random Hugging Face DeBERTa-v2 checkpoint with DeBERTa-v3's settings.

Hidden 32, 2 layers, 4 heads; relative attention with both terms (``p2c|c2p``),
shared position keys, a layer-normed relative table, no absolute positions and
no token types, as in microsoft/deberta-v3-*. ``position_buckets=8`` and
``max_relative_positions=16`` (v3: 256 and 512) so that a 40-piece input uses
the log buckets and the clipping at both ends of the table. Norm weights and
all biases are perturbed away from HF's 1/0 initialisation so that parity
checks exercise them; ``initializer_range`` is 0.2 (not 0.02) so that the
attention scores are far from uniform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from .tiny_models import build_eager, save

VOCAB_SIZE = 120
PAD_ID, CLS_ID, SEP_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 119

CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    hidden_act="gelu",
    # HF's 0.02 leaves attention almost uniform at this width; larger weights
    # make the content and relative scores (and so the parity checks) matter.
    initializer_range=0.2,
    max_position_embeddings=64,
    type_vocab_size=0,
    layer_norm_eps=1e-7,
    relative_attention=True,
    position_buckets=8,
    max_relative_positions=16,
    pos_att_type=["p2c", "c2p"],
    share_att_key=True,
    norm_rel_ebd="layer_norm",
    position_biased_input=False,
    pad_token_id=PAD_ID,
    bos_token_id=CLS_ID,
    eos_token_id=SEP_ID,
)


def build(*, seed: int = 0, head: Optional[str] = None, **overrides: Any) -> torch.nn.Module:
    """The random HF model (``DebertaV2Model``, or ``DebertaV2ForMaskedLM`` for
    ``head="mlm"``) in eval mode. ``overrides`` replace :data:`CONFIG` entries
    (e.g. ``share_att_key=False``); ``legacy=False`` gives the ``lm_predictions``
    MLM head instead of ``cls``."""
    import transformers

    return build_eager(
        transformers.DebertaV2Config,
        {None: transformers.DebertaV2Model, "mlm": transformers.DebertaV2ForMaskedLM},
        {**CONFIG, **overrides},
        seed=seed, head=head, is_norm=lambda name: "LayerNorm" in name, bias_scale=0.05,
    )


def write(path: Path, *, seed: int = 0, head: Optional[str] = None, **overrides: Any) -> Path:
    """Save :func:`build`'s model with ``save_pretrained`` into ``path``; returns ``path``."""
    return save(build(seed=seed, head=head, **overrides), path)
