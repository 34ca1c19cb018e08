"""GPT-2 as a left-context encoder, in plain PyTorch.

GPT-2 is a causal language model: each piece's vector sees only the pieces
before it (and itself), never the ones after. Used as a ``ctx_bert`` encoder it
therefore gives *left-context* features: the vector of "bank" in "the river
bank" knows about "river", but the vector of "river" knows nothing of "bank".
There are no special tokens and no token types; padding is on the right and
masked, so any id can fill it.

Layout (Hugging Face ``GPT2Model``): token (``wte``) plus learned position
(``wpe``) embeddings, ``n_layer`` pre-norm blocks (``x + attn(ln_1(x))``, then
``x + mlp(ln_2(x))``) with causal self-attention, and a final ``ln_f``.
GPT-2's projections are ``Conv1D`` modules whose weights are stored transposed,
(in, out); ours are ``nn.Linear`` (out, in), so the family lists them in
``Family.transposed`` and the loader transposes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..errors import CheckpointError
from .blocks import FeedForward, PreNormLayer, SelfAttention, causal_mask, layer_norm
from .config import (
    MAX_DIM,
    MAX_LAYERS,
    check_activation,
    check_bool,
    check_divisible,
    check_eps,
    check_int_fields,
    check_pad_token,
    check_probability,
    check_str,
    is_int,
    require_object,
)
from .family import TransformerEncoder, register_prefixed_family

# Our field -> the config.json key it is read from (then the HF attribute alias,
# which GPT2Config also accepts when it is written out by other tools).
_KEYS = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("n_embd", "hidden_size"),
    "num_hidden_layers": ("n_layer", "num_hidden_layers"),
    "num_attention_heads": ("n_head", "num_attention_heads"),
    "max_position_embeddings": ("n_positions", "max_position_embeddings"),
    "intermediate_size": ("n_inner",),
    "activation_function": ("activation_function",),
    "resid_pdrop": ("resid_pdrop",),
    "embd_pdrop": ("embd_pdrop",),
    "attn_pdrop": ("attn_pdrop",),
    "layer_norm_epsilon": ("layer_norm_epsilon",),
    "scale_attn_weights": ("scale_attn_weights",),
    "pad_token_id": ("pad_token_id",),
    "model_type": ("model_type",),
}
_INT_LIMITS = {
    "vocab_size": (1, MAX_DIM),
    "hidden_size": (1, MAX_DIM),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, MAX_DIM),
    "max_position_embeddings": (1, MAX_DIM),
    "intermediate_size": (1, MAX_DIM),
    "pad_token_id": (0, MAX_DIM),
}
_PROBABILITIES = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
# Settings of GPT2Config that change the math and that we do not implement: key ->
# the value we support. (``reorder_and_upcast_attn`` only matters in half precision,
# but a checkpoint that asks for it would silently differ under autocast.)
_UNSUPPORTED = {
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}


@dataclass
class Gpt2Config:
    """Hyper-parameters of a GPT-2 encoder, read from a checkpoint's ``config.json``.

    Field names follow our other families (``hidden_size`` for GPT-2's ``n_embd``,
    ``num_hidden_layers`` for ``n_layer``, ``num_attention_heads`` for ``n_head``,
    ``max_position_embeddings`` for ``n_positions``, ``intermediate_size`` for
    ``n_inner``, which is 4 x ``n_embd`` when null). Every value is validated on
    construction, so a bad ``config.json`` fails with a :class:`CheckpointError`
    naming the key before any tensor is allocated. ``raw`` keeps the dict as read.

    ``pad_token_id``: GPT-2 has no padding token; padding is masked, so any id in
    the vocabulary works. When the config has none we use ``eos_token_id`` if it
    is in the vocabulary, else 0.
    """

    vocab_size: int = 50257
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 1024
    intermediate_size: Optional[int] = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    pad_token_id: int = 0
    model_type: str = "gpt2"
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    source: str = field(default="config.json", repr=False, compare=False)

    def __post_init__(self) -> None:
        source = self.source
        if self.intermediate_size is None:
            if is_int(self.hidden_size):
                self.intermediate_size = 4 * self.hidden_size
        # Messages name the key as the config.json spells it (n_embd, not hidden_size).
        check_int_fields(self, _INT_LIMITS, source, key_name=self._key)
        for key in _PROBABILITIES:
            check_probability(getattr(self, key), key, source)
        check_eps(self.layer_norm_epsilon, "layer_norm_epsilon", source)
        check_activation(self.activation_function, "activation_function", source)
        check_bool(self.scale_attn_weights, "scale_attn_weights", source)
        check_str(self.model_type, "model_type", source)
        check_divisible(self.hidden_size, "n_embd", self.num_attention_heads, "n_head", source)
        check_pad_token(
            self.pad_token_id,
            self.vocab_size,
            source,
            hint=f"; remove it or set an id below {self.vocab_size}",
        )

    def _key(self, field_name: str) -> str:
        """The config.json key a field was read from, for messages."""
        for key in _KEYS.get(field_name, (field_name,)):
            if key in self.raw:
                return key
        return _KEYS.get(field_name, (field_name,))[0]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config.json") -> "Gpt2Config":
        """Build from a Hugging Face GPT-2 config dict, ignoring keys we do not use."""
        data = require_object(data, source)
        for key, supported in _UNSUPPORTED.items():
            value = data.get(key, supported)
            if value is not None and value != supported:
                raise CheckpointError(
                    f"{source}: {key}={value!r} is not supported by ctx_bert's GPT-2 encoder "
                    f"(only {str(supported).lower()} is implemented); use a checkpoint without it."
                )
        kwargs: Dict[str, Any] = {}
        for name, keys in _KEYS.items():
            for key in keys:
                if key in data and data[key] is not None:
                    kwargs[name] = data[key]
                    break
        if "pad_token_id" not in kwargs:
            eos = data.get("eos_token_id")
            vocab = kwargs.get("vocab_size", cls.vocab_size)
            if is_int(eos) and is_int(vocab) and 0 <= eos < vocab:
                kwargs["pad_token_id"] = eos
        return cls(**kwargs, raw=dict(data), source=source)


def read_config(data: Dict[str, Any], source: str) -> Gpt2Config:
    """``Family.read_config`` for GPT-2."""
    return Gpt2Config.from_dict(data, source=source)


class Gpt2Attention(SelfAttention):
    """Fused-qkv causal self-attention; ``scale`` is 1/sqrt(head_dim), or 1 when the
    checkpoint sets ``scale_attn_weights: false``."""

    def __init__(self, config: Gpt2Config) -> None:
        super().__init__(
            config.hidden_size,
            config.num_attention_heads,
            fused_qkv=True,
            dropout=config.attn_pdrop,
        )
        self.scale: Optional[float] = None if config.scale_attn_weights else 1.0

    def forward(
        self, hidden: torch.Tensor, mask: Optional[torch.Tensor], rotary: Any = None
    ) -> torch.Tensor:
        query, key, value = self.project(hidden)
        return self.attend(query, key, value, mask, scale=self.scale)


class Gpt2Encoder(TransformerEncoder):
    """GPT-2 embeddings, pre-norm causal blocks and the final norm.

    :meth:`forward` returns ``n_layer + 1`` tensors exactly like Hugging Face's
    ``output_hidden_states``: the embedding output (token + position embeddings),
    then the output of each block, **except that the last entry is after the final
    layer norm** ``ln_f`` (HF replaces the last block's raw output with the
    model's ``last_hidden_state``). Every vector depends only on the pieces at or
    before its position.
    """

    def __init__(self, config: Gpt2Config) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, width)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
        self.dropout = nn.Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList(
            PreNormLayer(
                Gpt2Attention(config),
                FeedForward(width, config.intermediate_size, config.activation_function),
                width,
                config.layer_norm_epsilon,
                config.resid_pdrop,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.final_norm = layer_norm(width, config.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        n_layers: Optional[int] = None,
    ) -> List[torch.Tensor]:
        """input_ids, attention_mask: (batch, length), padding on the right. Returns
        ``n_layers`` tensors (batch, length, width) (None: all); see the class
        docstring. With fewer than all, the blocks above are not run and the last
        returned entry is a block's raw output, exactly the same tensor as in the
        full run (the final norm ``ln_f`` belongs to the last block's entry only)."""
        n_blocks = self.blocks_to_run(n_layers)
        length = self.check_input_ids(input_ids, self.config.max_position_embeddings)
        # Right padding: real pieces sit at 0..n-1, so plain positions are right.
        positions = torch.arange(length, device=input_ids.device)
        hidden = self.dropout(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])
        mask = causal_mask(attention_mask, length, input_ids.device)
        # Key 0 stays visible so that an all-padding row gives finite values instead of
        # NaN. With right padding it is already visible to every query of a sequence
        # with at least one real piece, so nothing else changes.
        mask[..., 0] = True  # causal_mask returns a new tensor
        outputs = [hidden]
        for layer in islice(self.layers, n_blocks):
            hidden = layer(hidden, mask)
            outputs.append(hidden)
        if n_blocks == self.config.num_hidden_layers:
            outputs[-1] = self.final_norm(hidden)
        return outputs


_NAMES = (
    ("wte.", "word_embeddings."),
    ("wpe.", "position_embeddings."),
    ("h.{n}.ln_1.", "layers.{n}.attention_norm."),
    ("h.{n}.attn.c_attn.", "layers.{n}.attention.qkv."),
    ("h.{n}.attn.c_proj.", "layers.{n}.attention.out."),
    ("h.{n}.ln_2.", "layers.{n}.ffn_norm."),
    ("h.{n}.mlp.c_fc.", "layers.{n}.ffn.inner."),
    ("h.{n}.mlp.c_proj.", "layers.{n}.ffn.outer."),
    ("ln_f.", "final_norm."),
)

GPT2 = register_prefixed_family(
    "gpt2",
    "transformer.",
    read_config=read_config,
    build=Gpt2Encoder,
    usable_positions=lambda config: config.max_position_embeddings,
    names=_NAMES,
    # Old checkpoints carry the causal mask as buffers; we build our own.
    skipped=(r"^h\.\d+\.attn\.bias$", r"^h\.\d+\.attn\.masked_bias$"),
    heads=(
        r"^lm_head\.",
        r"^score\.",
        r"^multiple_choice_head\.",
        r"^qa_outputs\.",
        r"^classifier\.",
    ),
    # Conv1D weights are (in, out); nn.Linear's are (out, in).
    transposed=(
        r"\.attention\.qkv\.weight$",
        r"\.attention\.out\.weight$",
        r"\.ffn\.inner\.weight$",
        r"\.ffn\.outer\.weight$",
    ),
    causal=True,
    tokenizer_kind="bpe",
)
