"""BERT-family encoder in plain PyTorch.

The module layout mirrors Hugging Face's ``BertModel`` parameter names (minus the
pooler), so checkpoints map onto it key for key. Attention uses
``torch.nn.functional.scaled_dot_product_attention`` with a padding mask, which
dispatches to fused kernels on CUDA.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


# Generous bounds on single values, far above any published BERT: they turn absurd
# values into a clear message naming the key. They do not bound the model's size
# (16M x 16M would still be huge); that guard is ``bert_checkpoint``'s comparison
# of the implied shapes with the weight file's header before anything is built.
_MAX_DIM = 1 << 24
_MAX_LAYERS = 1024
_INT_LIMITS = {
    "vocab_size": (1, _MAX_DIM),
    "hidden_size": (1, _MAX_DIM),
    "num_hidden_layers": (1, _MAX_LAYERS),
    "num_attention_heads": (1, _MAX_DIM),
    "intermediate_size": (1, _MAX_DIM),
    "max_position_embeddings": (3, _MAX_DIM),  # [CLS] + one piece + [SEP]
    "type_vocab_size": (1, _MAX_DIM),
    "pad_token_id": (0, _MAX_DIM),
}
_PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob")
# Keys where Hugging Face writes null for "the default".
_NULLABLE = ("pad_token_id", "hidden_dropout_prob", "attention_probs_dropout_prob")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class BertConfig:
    """Hyper-parameters of a BERT encoder, read from a checkpoint's ``config.json``.

    Every value is validated (type and range) on construction, so that a bad
    ``config.json`` fails with a :class:`CheckpointError` naming the key before any
    tensor is allocated.
    """

    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    model_type: str = "bert"
    source: str = field(default="config.json", repr=False, compare=False)

    def __post_init__(self) -> None:
        source = self.source
        for key, (low, high) in _INT_LIMITS.items():
            value = getattr(self, key)
            if not _is_int(value):
                raise CheckpointError(
                    f"{source}: {key}={value!r} must be an integer, not {type(value).__name__}."
                )
            if not low <= value <= high:
                raise CheckpointError(f"{source}: {key}={value} must be between {low} and {high}.")
        for key in _PROBABILITIES:
            value = getattr(self, key)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise CheckpointError(f"{source}: {key}={value!r} must be a number in [0, 1).")
        eps = self.layer_norm_eps
        if not _is_number(eps) or not math.isfinite(eps) or not 0 < eps < 1:
            raise CheckpointError(f"{source}: layer_norm_eps={eps!r} must be a number in (0, 1).")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in _ACTIVATIONS:
            raise CheckpointError(
                f"{source}: hidden_act={self.hidden_act!r} is not supported; "
                f"use one of {sorted(_ACTIVATIONS)}."
            )
        if not isinstance(self.model_type, str):
            raise CheckpointError(f"{source}: model_type={self.model_type!r} must be a string.")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"{source}: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )
        if self.pad_token_id >= self.vocab_size:
            raise CheckpointError(
                f"{source}: pad_token_id={self.pad_token_id} is outside the vocabulary "
                f"(vocab_size={self.vocab_size})."
            )

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config.json") -> "BertConfig":
        """Build from a Hugging Face config dict, ignoring keys we do not use."""
        if not isinstance(data, dict):
            raise CheckpointError(
                f"{source}: must hold a JSON object of settings, found {type(data).__name__}."
            )
        position_type = data.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise CheckpointError(
                f"{source}: position_embedding_type={position_type!r} is not supported "
                "(only 'absolute' BERT position embeddings are implemented)."
            )
        if "vocab_size" not in data:
            raise CheckpointError(f"{source}: the required key 'vocab_size' is missing.")
        known = {f.name for f in fields(cls)} - {"source"}
        kwargs = {k: v for k, v in data.items() if k in known and not (v is None and k in _NULLABLE)}
        return cls(**kwargs, source=source)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "BertConfig":
        """Read a ``config.json`` file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf8"))
        except FileNotFoundError as err:
            raise CheckpointError(
                f"{path}: no config.json; a BERT checkpoint directory needs one."
            ) from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not valid JSON ({err}).") from err
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> Dict[str, Any]:
        """The settings as a ``config.json`` dict (without where they were read from)."""
        data = asdict(self)
        del data["source"]
        return data


def state_shapes(config: BertConfig) -> Dict[str, Tuple[int, ...]]:
    """Name and shape of every tensor of ``BertEncoder(config).state_dict()``.

    Computed from the config alone, so a checkpoint's shapes can be compared with
    the model it describes before anything is allocated. A test keeps it equal
    to the real module.
    """
    h, ffn = config.hidden_size, config.intermediate_size
    shapes: Dict[str, Tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (config.vocab_size, h),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    per_layer = {
        "attention.self.query.weight": (h, h),
        "attention.self.query.bias": (h,),
        "attention.self.key.weight": (h, h),
        "attention.self.key.bias": (h,),
        "attention.self.value.weight": (h, h),
        "attention.self.value.bias": (h,),
        "attention.output.dense.weight": (h, h),
        "attention.output.dense.bias": (h,),
        "attention.output.LayerNorm.weight": (h,),
        "attention.output.LayerNorm.bias": (h,),
        "intermediate.dense.weight": (ffn, h),
        "intermediate.dense.bias": (ffn,),
        "output.dense.weight": (h, ffn),
        "output.dense.bias": (h,),
        "output.LayerNorm.weight": (h,),
        "output.LayerNorm.bias": (h,),
    }
    for i in range(config.num_hidden_layers):
        shapes.update({f"encoder.layer.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(hidden))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.n_heads, -1).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            heads(self.query(hidden)),
            heads(self.key(hidden)),
            heads(self.value(hidden)),
            attn_mask=attn_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return context.transpose(1, 2).reshape(batch, length, width)


class BertOutputBlock(nn.Module):
    """Dense projection to ``hidden_size``, dropout, residual add, LayerNorm.

    HF has two such blocks per layer, both named ``output`` in the checkpoint:
    after attention (input width ``hidden_size``) and after the feed-forward
    (input width ``intermediate_size``).
    """

    def __init__(self, config: BertConfig, input_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(input_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertOutputBlock(config, input_size=config.hidden_size)

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, attn_mask), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutputBlock(config, input_size=config.intermediate_size)

    def forward(self, hidden: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden, attn_mask)
        return self.output(self.intermediate(attended), attended)


class BertStack(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertEncoder(nn.Module):
    """BERT embeddings plus transformer layers; returns every layer's hidden states."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertStack(config)

    @property
    def n_layers(self) -> int:
        """Number of outputs of :meth:`forward`: the embedding output plus each layer."""
        return self.config.num_hidden_layers + 1

    @property
    def layer_names(self) -> List[str]:
        return ["embeddings"] + [f"layer_{i + 1}" for i in range(self.config.num_hidden_layers)]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> List[torch.Tensor]:
        """Encode a padded batch.

        input_ids: (batch, length) piece ids. attention_mask: (batch, length),
        true/1 for real pieces, false/0 for padding. Returns ``n_layers`` tensors of
        shape (batch, length, hidden): the embedding output, then each layer.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} positions but the model supports "
                f"{self.config.max_position_embeddings}; cut the input into windows."
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids)
        attn_mask = None
        if attention_mask is not None:
            # (batch, 1, 1, length) boolean mask: keys that may be attended to.
            attn_mask = attention_mask.to(torch.bool)[:, None, None, :]
        outputs = [hidden]
        for layer in self.encoder.layer:
            hidden = layer(hidden, attn_mask)
            outputs.append(hidden)
        return outputs
