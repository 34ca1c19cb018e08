"""BERT-family encoder in plain PyTorch.

The module layout mirrors Hugging Face's ``BertModel`` parameter names (minus the
pooler), so checkpoints map onto it key for key. Attention uses
``torch.nn.functional.scaled_dot_product_attention`` with a padding mask, which
dispatches to fused kernels on CUDA.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

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


@dataclass
class BertConfig:
    """Hyper-parameters of a BERT encoder, read from a checkpoint's ``config.json``."""

    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    model_type: str = "bert"

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise CheckpointError(
                f"config.json: hidden_act={self.hidden_act!r} is not supported; "
                f"use one of {sorted(_ACTIVATIONS)}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"config.json: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )

    @classmethod
    def from_dict(cls, data: Dict[str, Any], *, source: str = "config.json") -> "BertConfig":
        """Build from a Hugging Face config dict, ignoring keys we do not use."""
        position_type = data.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise CheckpointError(
                f"{source}: position_embedding_type={position_type!r} is not supported "
                "(only 'absolute' BERT position embeddings are implemented)."
            )
        if "vocab_size" not in data:
            raise CheckpointError(f"{source}: the required key 'vocab_size' is missing.")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("pad_token_id") is None:
            kwargs.pop("pad_token_id", None)
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise CheckpointError(f"{source}: invalid BERT config: {err}") from err

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
        return asdict(self)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(
            config.max_position_embeddings, config.hidden_size
        )
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(0.1)

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
        self.dropout_p = 0.1

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


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

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
        # HF names the feed-forward output block "output"; it has the same shape
        # as the attention output block except for the input width.
        self.output = BertSelfOutput(config)
        self.output.dense = nn.Linear(config.intermediate_size, config.hidden_size)

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
