"""ModernBERT encoder (``model_type: modernbert``) in plain PyTorch.

ModernBERT is a pre-norm encoder without absolute positions: token embeddings
and a LayerNorm, then layers of ``x + attn(LN(x))`` and ``x + GeGLU(LN(x))``
(layer 0 skips the attention norm, its input being the normalised embeddings),
then a final LayerNorm. Attention uses a fused ``Wqkv`` projection and rotary
position embeddings; every ``global_attn_every_n_layers``-th layer (0, n, 2n,
...) attends globally with ``global_rope_theta``, the others attend to a
sliding window of ``local_attention // 2`` pieces each side with
``local_rope_theta``. Norms and linears have biases only when ``norm_bias``,
``attention_bias`` and ``mlp_bias`` say so (all false in the published models).

The last output of :meth:`ModernBertEncoder.forward` is after the final norm,
like Hugging Face's ``last_hidden_state`` (and the last of its
``hidden_states``); the others are the embedding output and each layer's
output before it.

Config formats: checkpoints written by transformers 4.x carry
``global_rope_theta``, ``local_rope_theta`` and ``global_attn_every_n_layers``;
transformers 5.x writes ``rope_parameters`` (per layer type
``full_attention``/``sliding_attention``) and ``layer_types``. Both are read,
the 5.x keys first, as transformers does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import CheckpointError
from .blocks import (
    FeedForward,
    PreNormLayer,
    SelfAttention,
    key_padding_mask,
    layer_norm,
    rotary_cos_sin,
    sliding_window_mask,
)
from .config import (
    MAX_DIM,
    MAX_LAYERS,
    check_activation,
    check_bool,
    check_divisible,
    check_eps,
    check_int,
    check_pad_token,
    check_probability,
    check_str,
    is_number,
    require_keys,
    require_object,
    setting,
)
from .family import TransformerEncoder, register_prefixed_family

GLOBAL = "full_attention"
LOCAL = "sliding_attention"

_INT_KEYS: Dict[str, Tuple[int, int, Optional[int]]] = {
    # key: (low, high, default when missing; None = required)
    "vocab_size": (1, MAX_DIM, None),
    "hidden_size": (1, MAX_DIM, 768),
    "num_hidden_layers": (1, MAX_LAYERS, 22),
    "num_attention_heads": (1, MAX_DIM, 12),
    "intermediate_size": (1, MAX_DIM, 1152),
    "max_position_embeddings": (3, MAX_DIM, 8192),  # [CLS] + one piece + [SEP]
    "local_attention": (1, MAX_DIM, 128),
    "global_attn_every_n_layers": (1, MAX_LAYERS, 3),
    "pad_token_id": (0, MAX_DIM, 50283),
}
_PROBABILITIES = ("embedding_dropout", "attention_dropout", "mlp_dropout")
_FLAGS = {"norm_bias": False, "attention_bias": False, "mlp_bias": False}
_DEFAULT_THETA = {GLOBAL: 160_000.0, LOCAL: 10_000.0}
_LEGACY_THETA_KEY = {GLOBAL: "global_rope_theta", LOCAL: "local_rope_theta"}


@dataclass
class ModernBertConfig:
    """Hyper-parameters of a ModernBERT encoder, validated on construction.

    Build it with :meth:`from_dict` from a ``config.json`` dict (``raw`` keeps
    that dict). ``layer_types`` holds ``"full_attention"`` or
    ``"sliding_attention"`` per layer; ``rope_theta`` the rotary base per layer
    type. Every value is checked (type and range) before any tensor exists, and a
    bad one raises :class:`CheckpointError` naming ``source`` and the key.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    local_attention: int
    global_attn_every_n_layers: int
    pad_token_id: int
    hidden_activation: str
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    embedding_dropout: float
    attention_dropout: float
    mlp_dropout: float
    layer_types: Tuple[str, ...]
    rope_theta: Dict[str, float]
    model_type: str = "modernbert"
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    source: str = field(default="config.json", repr=False, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def window_radius(self) -> int:
        """Pieces a local layer sees on each side (transformers' ``sliding_window``)."""
        return self.local_attention // 2

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config.json") -> "ModernBertConfig":
        """Read and validate a Hugging Face ``config.json`` dict (4.x or 5.x format)."""
        data = require_object(data, source)
        require_keys(data, ("vocab_size",), source)
        value = partial(setting, data)  # a missing or null key: the default

        ints: Dict[str, int] = {
            key: check_int(value(key, default), key, low, high, source)
            for key, (low, high, default) in _INT_KEYS.items()
        }
        check_divisible(
            ints["hidden_size"], "hidden_size", ints["num_attention_heads"], "num_attention_heads", source
        )
        head_dim = ints["hidden_size"] // ints["num_attention_heads"]
        if head_dim % 2:
            raise CheckpointError(
                f"{source}: hidden_size / num_attention_heads = {head_dim} must be even for "
                "rotary position embeddings."
            )
        check_pad_token(ints["pad_token_id"], ints["vocab_size"], source)
        floats = {key: check_probability(value(key, 0.0), key, source) for key in _PROBABILITIES}
        eps = check_eps(value("norm_eps", 1e-5), "norm_eps", source)
        flags = {key: check_bool(value(key, default), key, source) for key, default in _FLAGS.items()}
        act = check_activation(value("hidden_activation", "gelu"), "hidden_activation", source)
        model_type = check_str(value("model_type", "modernbert"), "model_type", source)

        return cls(
            **ints,
            **floats,
            **flags,
            hidden_activation=act,
            norm_eps=eps,
            layer_types=_layer_types(data, ints, source),
            rope_theta=_rope_theta(data, source),
            model_type=model_type,
            raw=dict(data),
            source=source,
        )


def _layer_types(data: Dict[str, Any], ints: Dict[str, int], source: str) -> Tuple[str, ...]:
    """``layer_types`` (transformers 5.x) or, without it, a global layer every
    ``global_attn_every_n_layers`` starting with layer 0 (4.x)."""
    n_layers = ints["num_hidden_layers"]
    found = data.get("layer_types")
    if found is None:
        every = ints["global_attn_every_n_layers"]
        return tuple(LOCAL if i % every else GLOBAL for i in range(n_layers))
    if (
        not isinstance(found, list)
        or len(found) != n_layers
        or any(kind not in (GLOBAL, LOCAL) for kind in found)
    ):
        raise CheckpointError(
            f"{source}: layer_types={found!r} must list {n_layers} entries (num_hidden_layers), "
            f"each {GLOBAL!r} or {LOCAL!r}."
        )
    return tuple(found)


def _rope_theta(data: Dict[str, Any], source: str) -> Dict[str, float]:
    """The rotary base per layer type: ``rope_parameters[type]["rope_theta"]`` (5.x),
    else ``global_rope_theta``/``local_rope_theta`` (4.x), else the defaults."""
    parameters = data.get("rope_parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise CheckpointError(
            f"{source}: rope_parameters={parameters!r} must be an object with "
            f"{GLOBAL!r} and {LOCAL!r} entries."
        )
    if data.get("rope_scaling") is not None:
        raise CheckpointError(
            f"{source}: rope_scaling={data['rope_scaling']!r} is not supported (only the "
            "default rotary embeddings are implemented); remove it to use the model as trained."
        )
    thetas: Dict[str, float] = {}
    for kind in (GLOBAL, LOCAL):
        entry = (parameters or {}).get(kind)
        legacy = data.get(_LEGACY_THETA_KEY[kind])
        theta = legacy if legacy is not None else _DEFAULT_THETA[kind]
        key = _LEGACY_THETA_KEY[kind]
        if entry is not None:
            if not isinstance(entry, dict):
                raise CheckpointError(
                    f"{source}: rope_parameters[{kind!r}]={entry!r} must be an object."
                )
            rope_type = entry.get("rope_type", entry.get("type", "default"))
            if rope_type != "default":
                raise CheckpointError(
                    f"{source}: rope_parameters[{kind!r}].rope_type={rope_type!r} is not "
                    "supported; only 'default' rotary embeddings are implemented."
                )
            if entry.get("rope_theta") is not None:
                theta = entry["rope_theta"]
                key = f"rope_parameters[{kind!r}].rope_theta"
        if not is_number(theta) or not math.isfinite(theta) or theta <= 1:
            raise CheckpointError(f"{source}: {key}={theta!r} must be a finite number above 1.")
        thetas[kind] = float(theta)
    return thetas


# -- module ---------------------------------------------------------------------------------
class ModernBertEmbeddings(nn.Module):
    """Token embeddings, LayerNorm, dropout (no position embeddings: rotary)."""

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.norm = layer_norm(config.hidden_size, config.norm_eps, config.norm_bias)
        self.dropout = nn.Dropout(config.embedding_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.tok_embeddings(input_ids)))


class ModernBertAttention(SelfAttention):
    """Fused-qkv rotary attention; ModernBERT also drops out the output projection's
    result (with ``attention_dropout``), which the shared block does not."""

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__(
            config.hidden_size,
            config.num_attention_heads,
            bias=config.attention_bias,
            fused_qkv=True,
            dropout=config.attention_dropout,
        )
        self.out_dropout = nn.Dropout(config.attention_dropout)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: Optional[torch.Tensor],
        rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        return self.out_dropout(super().forward(hidden, mask, rotary))


class ModernBertEncoder(TransformerEncoder):
    """ModernBERT embeddings, pre-norm layers with global and sliding-window
    attention, and the final norm; returns every layer's hidden states."""

    def __init__(self, config: ModernBertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ModernBertEmbeddings(config)
        self.layers = nn.ModuleList(
            PreNormLayer(
                ModernBertAttention(config),
                FeedForward(
                    config.hidden_size,
                    config.intermediate_size,
                    config.hidden_activation,
                    bias=config.mlp_bias,
                    glu=True,
                    dropout=config.mlp_dropout,
                ),
                config.hidden_size,
                config.norm_eps,
                # ModernBERT adds the sublayer outputs without a residual dropout.
                dropout=0.0,
                norm_bias=config.norm_bias,
                first_norm=i != 0,
            )
            for i in range(config.num_hidden_layers)
        )
        self.final_norm = layer_norm(config.hidden_size, config.norm_eps, config.norm_bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        n_layers: Optional[int] = None,
    ) -> List[torch.Tensor]:
        """Encode a padded batch: input_ids and attention_mask (batch, length), mask
        1 for real pieces, 0 for padding. Returns ``n_layers`` tensors (batch,
        length, hidden): the embedding output, each layer, the last one after the
        final norm. With ``n_layers`` below ``self.n_layers`` the layers above are
        not computed and no output is after the final norm (as in Hugging Face's
        hidden states, where only the model's last layer is normed)."""
        n_blocks = self.blocks_to_run(n_layers)
        config = self.config
        length = self.check_input_ids(input_ids, config.max_position_embeddings)
        device = input_ids.device
        hidden = self.embeddings(input_ids)
        kinds = set(config.layer_types)
        masks: Dict[str, Optional[torch.Tensor]] = {}
        if GLOBAL in kinds:
            masks[GLOBAL] = key_padding_mask(attention_mask)
        if LOCAL in kinds:
            local = sliding_window_mask(attention_mask, length, config.window_radius, device)
            # A padding query far from every real piece would see no key at all; some
            # SDPA kernels return NaN for such a row (CPU's gives zeros), which would
            # leak into real rows through 0 * NaN in the next layer's values. Letting
            # every query see itself avoids it and changes nothing for real queries
            # (they already see themselves).
            masks[LOCAL] = local | torch.eye(length, dtype=torch.bool, device=device)
        # One rotary table per layer type and forward pass, shared by the layers.
        rotary = {
            kind: rotary_cos_sin(length, config.head_dim, config.rope_theta[kind], device, hidden.dtype)
            for kind in kinds
        }
        outputs = [hidden]
        for kind, layer in islice(zip(config.layer_types, self.layers), n_blocks):
            hidden = layer(hidden, masks[kind], rotary=rotary[kind])
            outputs.append(hidden)
        if n_blocks == config.num_hidden_layers:
            outputs[-1] = self.final_norm(hidden)
        return outputs


MODERNBERT = register_prefixed_family(
    "modernbert",
    "model.",
    read_config=lambda data, source: ModernBertConfig.from_dict(data, source=source),
    build=ModernBertEncoder,
    usable_positions=lambda config: config.max_position_embeddings,
    names=(
        ("embeddings.tok_embeddings.", "embeddings.tok_embeddings."),
        ("embeddings.norm.", "embeddings.norm."),
        ("layers.{n}.attn_norm.", "layers.{n}.attention_norm."),
        ("layers.{n}.attn.Wqkv.", "layers.{n}.attention.qkv."),
        ("layers.{n}.attn.Wo.", "layers.{n}.attention.out."),
        ("layers.{n}.mlp_norm.", "layers.{n}.ffn_norm."),
        ("layers.{n}.mlp.Wi.", "layers.{n}.ffn.inner."),
        ("layers.{n}.mlp.Wo.", "layers.{n}.ffn.outer."),
        ("final_norm.", "final_norm."),
    ),
    # ModernBertForMaskedLM: head.dense/head.norm + decoder (tied to the
    # embeddings, usually not saved); the classification/QA/multiple-choice
    # models: head + classifier.
    heads=(r"^head\.", r"^decoder\.", r"^classifier\."),
    tokenizer_kind="bpe",
)
