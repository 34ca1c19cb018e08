"""The post-norm BERT-shaped families: BERT, RoBERTa (XLM-R, CamemBERT), ELECTRA,
DistilBERT.

All four are embeddings (word + position [+ token type], LayerNorm) followed by
:class:`~.blocks.PostNormLayer` layers. They differ only in

- position ids: BERT counts 0, 1, 2, ...; RoBERTa starts at ``pad_token_id + 1``
  and counts non-padding pieces only (padding gets ``pad_token_id``);
- ELECTRA's embeddings may be narrower than the layers (``embedding_size``), with
  a linear projection between them;
- DistilBERT has no token types, its own config keys and its own tensor names.

Each is a :class:`~.family.Family` (config reader, module, checkpoint names),
registered by ``model_type``. Our modules use our own tensor names (the shared
blocks' names); ``Family.names`` maps Hugging Face names onto them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from itertools import islice
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import CheckpointError
from .blocks import FeedForward, PostNormLayer, SelfAttention, key_padding_mask
from .config import (
    MAX_DIM,
    MAX_LAYERS,
    check_activation,
    check_bert_settings,
    check_bool,
    check_divisible,
    check_int_fields,
    check_pad_token,
    check_probability,
    check_str,
    is_int,
    pick,
    read_config_file,
    require_keys,
    require_object,
)
from .family import Family, TransformerEncoder, register_family, register_prefixed_family

# (low, high) for every integer setting of BertConfig.
_INT_LIMITS = {
    "vocab_size": (1, MAX_DIM),
    "hidden_size": (1, MAX_DIM),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, MAX_DIM),
    "intermediate_size": (1, MAX_DIM),
    "max_position_embeddings": (3, MAX_DIM),  # [CLS] + one piece + [SEP]
    "type_vocab_size": (1, MAX_DIM),
    "pad_token_id": (0, MAX_DIM),
    "embedding_size": (1, MAX_DIM),
}
# Keys where Hugging Face writes null for "the default".
_NULLABLE = ("pad_token_id", "hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_size")
ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")


@dataclass
class BertConfig:
    """Hyper-parameters of a BERT, RoBERTa or ELECTRA encoder (``config.json``).

    Every value is validated (type and range) on construction, so that a bad
    ``config.json`` fails with a :class:`CheckpointError` naming the key before any
    tensor is allocated. ``embedding_size`` (ELECTRA) is the width of the
    embeddings, None for ``hidden_size``. ``raw`` is the ``config.json`` dict as
    read, written back verbatim when a pipeline is saved.
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
    embedding_size: Optional[int] = None
    source: str = field(default="config.json", repr=False, compare=False)
    raw: Optional[Dict[str, Any]] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        source = self.source
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size if is_int(self.hidden_size) else None
        check_int_fields(self, _INT_LIMITS, source)
        check_bert_settings(self, source)
        if self.model_type in ROBERTA_TYPES and self.max_positions < 3:
            raise CheckpointError(
                f"{source}: max_position_embeddings={self.max_position_embeddings} leaves "
                f"{self.max_positions} positions after the pad_token_id={self.pad_token_id} "
                "offset of RoBERTa position ids; at least 3 are needed (<s> piece </s>)."
            )

    @property
    def max_positions(self) -> int:
        """Longest input: RoBERTa's position ids start at ``pad_token_id + 1``."""
        if self.model_type in ROBERTA_TYPES:
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        source: str = "config.json",
        defaults: Optional[Dict[str, Any]] = None,
        keys: Optional[Tuple[str, ...]] = None,
    ) -> "BertConfig":
        """Build from a Hugging Face config dict, ignoring keys we do not use.

        defaults: the family's defaults for keys the dict lacks (Hugging Face's
        own defaults differ between BERT, RoBERTa and ELECTRA). keys: the settings
        this family reads (ELECTRA alone reads ``embedding_size``).
        """
        data = require_object(data, source)
        position_type = data.get("position_embedding_type", "absolute")
        if position_type not in ("absolute", None):
            raise CheckpointError(
                f"{source}: position_embedding_type={position_type!r} is not supported "
                "(only 'absolute' position embeddings are implemented)."
            )
        require_keys(data, ("vocab_size",), source)
        known = keys or tuple(f.name for f in fields(cls) if f.name not in ("source", "raw", "embedding_size"))
        base = {f.name: f.default for f in fields(cls) if f.name in known and f.name != "vocab_size"}
        values = pick(data, {**base, **(defaults or {}), "vocab_size": None}, _NULLABLE)
        values = {k: v for k, v in values.items() if k in known}
        return cls(**values, source=source, raw=dict(data))

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "BertConfig":
        """Read a ``config.json`` file."""
        return cls.from_dict(read_config_file(path), source=str(path))

    def to_dict(self) -> Dict[str, Any]:
        """The ``config.json`` dict: the original one where there is one (so a saved
        pipeline writes back what it read), else our settings."""
        if self.raw is not None:
            return dict(self.raw)
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("source", "raw")}
        if self.model_type != "electra":
            del data["embedding_size"]
        return data


# -- DistilBERT's config ------------------------------------------------------------------
_DISTIL_INTS = {
    "vocab_size": (1, MAX_DIM),
    "dim": (1, MAX_DIM),
    "n_layers": (1, MAX_LAYERS),
    "n_heads": (1, MAX_DIM),
    "hidden_dim": (1, MAX_DIM),
    "max_position_embeddings": (3, MAX_DIM),
    "pad_token_id": (0, MAX_DIM),
}


@dataclass
class DistilBertConfig:
    """DistilBERT's ``config.json`` under its own key names, validated like
    :class:`BertConfig`; the common names (``hidden_size``, ``num_hidden_layers``,
    ...) are properties, so :class:`BertEncoder` and the backend read it like any
    family's config."""

    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 3072
    activation: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False  # the table is stored in the checkpoint either way
    pad_token_id: int = 0
    model_type: str = "distilbert"
    source: str = field(default="config.json", repr=False, compare=False)
    raw: Optional[Dict[str, Any]] = field(default=None, repr=False, compare=False)

    # Fixed in DistilBERT: no token types, LayerNorm eps 1e-12.
    type_vocab_size = 0
    layer_norm_eps = 1e-12

    def __post_init__(self) -> None:
        source = self.source
        check_int_fields(self, _DISTIL_INTS, source)
        check_probability(self.dropout, "dropout", source)
        check_probability(self.attention_dropout, "attention_dropout", source)
        check_activation(self.activation, "activation", source)
        check_bool(self.sinusoidal_pos_embds, "sinusoidal_pos_embds", source)
        check_str(self.model_type, "model_type", source)
        check_divisible(self.dim, "dim", self.n_heads, "n_heads", source)
        check_pad_token(self.pad_token_id, self.vocab_size, source)

    hidden_size = property(lambda self: self.dim)
    embedding_size = property(lambda self: self.dim)
    num_hidden_layers = property(lambda self: self.n_layers)
    num_attention_heads = property(lambda self: self.n_heads)
    intermediate_size = property(lambda self: self.hidden_dim)
    hidden_act = property(lambda self: self.activation)
    hidden_dropout_prob = property(lambda self: self.dropout)
    attention_probs_dropout_prob = property(lambda self: self.attention_dropout)
    max_positions = property(lambda self: self.max_position_embeddings)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config.json") -> "DistilBertConfig":
        data = require_object(data, source)
        require_keys(data, ("vocab_size",), source)
        defaults = {f.name: f.default for f in fields(cls) if f.name not in ("source", "raw")}
        values = pick(data, defaults, ("pad_token_id", "dropout", "attention_dropout"))
        return cls(**values, source=source, raw=dict(data))

    def to_dict(self) -> Dict[str, Any]:
        if self.raw is not None:
            return dict(self.raw)
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("source", "raw")}


FamilyConfig = Union[BertConfig, DistilBertConfig]


# -- the module -------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    """word + position (+ token type) embeddings, LayerNorm, dropout, then (ELECTRA,
    when ``embedding_size != hidden_size``) a projection to ``hidden_size``."""

    def __init__(self, config: FamilyConfig) -> None:
        super().__init__()
        width = config.embedding_size
        self.word = nn.Embedding(config.vocab_size, width)
        self.position = nn.Embedding(config.max_position_embeddings, width)
        self.token_type = (
            nn.Embedding(config.type_vocab_size, width) if config.type_vocab_size else None
        )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.project = (
            nn.Linear(width, config.hidden_size) if width != config.hidden_size else None
        )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor]
    ) -> torch.Tensor:
        hidden = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            if token_type_ids is None:
                # Every piece is of type 0: one row, broadcast.
                hidden = hidden + self.token_type.weight[0]
            else:
                hidden = hidden + self.token_type(token_type_ids)
        hidden = self.dropout(self.norm(hidden))
        return hidden if self.project is None else self.project(hidden)


class BertEncoder(TransformerEncoder):
    """Embeddings plus post-norm layers; returns every layer's hidden states.

    Serves BERT, ELECTRA and DistilBERT as is; :class:`RobertaEncoder` changes
    the position ids.
    """

    def __init__(self, config: FamilyConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(
            PostNormLayer(
                SelfAttention(
                    width, config.num_attention_heads, dropout=config.attention_probs_dropout_prob
                ),
                FeedForward(width, config.intermediate_size, config.hidden_act),
                width,
                config.layer_norm_eps,
                config.hidden_dropout_prob,
            )
            for _ in range(config.num_hidden_layers)
        )

    @property
    def max_length(self) -> int:
        """Longest input (pieces, specials included) the position table covers."""
        return self.config.max_position_embeddings

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch|1, length) positions: 0, 1, 2, ..."""
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        *,
        n_layers: Optional[int] = None,
    ) -> List[torch.Tensor]:
        """Encode a padded batch.

        input_ids: (batch, length) piece ids. attention_mask: (batch, length),
        true/1 for real pieces, false/0 for padding. Returns ``n_layers`` tensors of
        shape (batch, length, hidden): the embedding output, then each layer
        (None: all; layers above are not computed).
        """
        n_blocks = self.blocks_to_run(n_layers)
        self.check_input_ids(input_ids, self.max_length)
        hidden = self.embeddings(input_ids, self.position_ids(input_ids), token_type_ids)
        mask = key_padding_mask(attention_mask)
        outputs = [hidden]
        for layer in islice(self.layers, n_blocks):
            hidden = layer(hidden, mask)
            outputs.append(hidden)
        return outputs


class RobertaEncoder(BertEncoder):
    """BERT with RoBERTa's position ids: ``pad_token_id + 1`` onwards, counted over
    pieces that are not padding (a padding id gets ``pad_token_id``), so padding on
    the left or in the middle would not shift the real pieces' positions."""

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings - self.config.pad_token_id - 1

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        pad = self.config.pad_token_id
        real = input_ids.ne(pad).to(torch.long)
        return torch.cumsum(real, dim=1) * real + pad


# -- families -------------------------------------------------------------------------------
_EMBEDDING_NAMES = (
    ("embeddings.word_embeddings.", "embeddings.word."),
    ("embeddings.position_embeddings.", "embeddings.position."),
    ("embeddings.token_type_embeddings.", "embeddings.token_type."),
    ("embeddings.LayerNorm.", "embeddings.norm."),
)
BERT_NAMES = _EMBEDDING_NAMES + (
    ("encoder.layer.{n}.attention.self.query.", "layers.{n}.attention.query."),
    ("encoder.layer.{n}.attention.self.key.", "layers.{n}.attention.key."),
    ("encoder.layer.{n}.attention.self.value.", "layers.{n}.attention.value."),
    ("encoder.layer.{n}.attention.output.dense.", "layers.{n}.attention.out."),
    ("encoder.layer.{n}.attention.output.LayerNorm.", "layers.{n}.attention_norm."),
    ("encoder.layer.{n}.intermediate.dense.", "layers.{n}.ffn.inner."),
    ("encoder.layer.{n}.output.dense.", "layers.{n}.ffn.outer."),
    ("encoder.layer.{n}.output.LayerNorm.", "layers.{n}.ffn_norm."),
)
ELECTRA_NAMES = BERT_NAMES + (("embeddings_project.", "embeddings.project."),)
DISTILBERT_NAMES = _EMBEDDING_NAMES[:2] + (
    ("embeddings.LayerNorm.", "embeddings.norm."),
    ("transformer.layer.{n}.attention.q_lin.", "layers.{n}.attention.query."),
    ("transformer.layer.{n}.attention.k_lin.", "layers.{n}.attention.key."),
    ("transformer.layer.{n}.attention.v_lin.", "layers.{n}.attention.value."),
    ("transformer.layer.{n}.attention.out_lin.", "layers.{n}.attention.out."),
    ("transformer.layer.{n}.sa_layer_norm.", "layers.{n}.attention_norm."),
    ("transformer.layer.{n}.ffn.lin1.", "layers.{n}.ffn.inner."),
    ("transformer.layer.{n}.ffn.lin2.", "layers.{n}.ffn.outer."),
    ("transformer.layer.{n}.output_layer_norm.", "layers.{n}.ffn_norm."),
)
# Inside the encoder prefix, on purpose not ours: the pooler, and buffers that
# older versions of transformers saved.
_SKIPPED = (r"^pooler\.", r"^embeddings\.position_ids$", r"^embeddings\.token_type_ids$")

_BERT_KEYS = tuple(
    f.name for f in fields(BertConfig) if f.name not in ("source", "raw", "embedding_size")
)
# Hugging Face's defaults for keys a config.json lacks, where they differ from BERT's.
_ROBERTA_DEFAULTS = {"pad_token_id": 1}
_ELECTRA_DEFAULTS = {
    "embedding_size": 128,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
}


def read_bert_config(data: Dict[str, Any], source: str) -> BertConfig:
    return BertConfig.from_dict(data, source=source, keys=_BERT_KEYS)


def read_roberta_config(data: Dict[str, Any], source: str) -> BertConfig:
    return BertConfig.from_dict(data, source=source, defaults=_ROBERTA_DEFAULTS, keys=_BERT_KEYS)


def read_electra_config(data: Dict[str, Any], source: str) -> BertConfig:
    return BertConfig.from_dict(
        data, source=source, defaults=_ELECTRA_DEFAULTS, keys=_BERT_KEYS + ("embedding_size",)
    )


def read_distilbert_config(data: Dict[str, Any], source: str) -> DistilBertConfig:
    return DistilBertConfig.from_dict(data, source=source)


def _positions(config: FamilyConfig) -> int:
    return config.max_positions


def _register(name: str, **settings: Any) -> Family:
    """A BERT-shaped family: the encoder under ``<name>.``, windows up to
    ``config.max_positions``, the pooler and old buffers skipped (unless
    ``settings`` say otherwise)."""
    settings = {"usable_positions": _positions, "skipped": _SKIPPED, **settings}
    return register_prefixed_family(name, f"{name}.", **settings)


BERT = _register(
    "bert",
    read_config=read_bert_config,
    build=BertEncoder,
    names=BERT_NAMES,
    heads=(r"^cls\.",),
    tokenizer_kind="wordpiece",
)
ROBERTA = _register(
    "roberta",
    read_config=read_roberta_config,
    build=RobertaEncoder,  # its own position ids
    names=BERT_NAMES,
    heads=(r"^lm_head\.",),
    tokenizer_kind="bpe",
)
# XLM-R and CamemBERT: RoBERTa's module and names (their checkpoints use the
# ``roberta.`` prefix too) with a SentencePiece (Unigram) tokenizer.
XLM_ROBERTA = register_family(replace(ROBERTA, model_types=("xlm-roberta",), tokenizer_kind="unigram"))
CAMEMBERT = register_family(replace(ROBERTA, model_types=("camembert",), tokenizer_kind="unigram"))
ELECTRA = _register(
    "electra",
    read_config=read_electra_config,
    build=BertEncoder,
    names=ELECTRA_NAMES,  # BERT's plus the embedding projection
    heads=(
        r"^discriminator_predictions\.",
        r"^generator_predictions\.",
        r"^generator_lm_head\.",
        r"^sequence_summary\.",
    ),
    tokenizer_kind="wordpiece",
)
DISTILBERT = _register(
    "distilbert",
    read_config=read_distilbert_config,
    build=BertEncoder,
    names=DISTILBERT_NAMES,
    skipped=(r"^embeddings\.position_ids$",),  # no pooler, no token types
    heads=(
        r"^vocab_transform\.",
        r"^vocab_layer_norm\.",
        r"^vocab_projector\.",
        r"^pre_classifier\.",
    ),
    tokenizer_kind="wordpiece",
)
