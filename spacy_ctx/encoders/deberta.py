"""DeBERTa-v2 and DeBERTa-v3 encoders (``model_type: deberta-v2``) in plain PyTorch.

DeBERTa is BERT's post-norm layer with *disentangled* attention: besides the
content-to-content score ``q_i . k_j``, each head adds a content-to-position
term ``q_i . pk[r(i, j)]`` (``c2p``) and a position-to-content term
``k_j . pq[r(j, i)]`` (``p2c``), where ``pk``/``pq`` are projections of a shared
table of relative-position embeddings (``rel_embeddings``, one row per relative
distance bucket, optionally layer-normed) and ``r`` maps the distance ``i - j``
to a row. All three terms are divided by ``sqrt(head_dim * (1 + n_terms))``.

Here the relative terms are computed from the queries and keys of
:meth:`~.blocks.SelfAttention.project`, divided by that factor and added to the
padding bias (:func:`~.blocks.mask_to_bias`); the shared
:meth:`~.blocks.SelfAttention.attend` (SDPA) then applies them with
``scale=1/factor``. The distance-to-row table ``r`` is built once per forward
pass, for the whole batch.

Config settings (as Hugging Face reads them; published v3 values in brackets):

- ``relative_attention`` [true], ``pos_att_type`` [``"p2c|c2p"``]: which
  relative terms are added;
- ``position_buckets`` [256] and ``max_relative_positions`` [-1, i.e.
  ``max_position_embeddings``]: distances up to ``position_buckets // 2`` keep
  their own row, longer ones share log-spaced rows up to
  ``max_relative_positions``; without buckets, distances are clipped at
  ``max_relative_positions``;
- ``share_att_key`` [true]: the position projections are the content query and
  key projections; otherwise separate ``pos_key_proj``/``pos_query_proj``;
- ``norm_rel_ebd`` [``"layer_norm"``]: a LayerNorm on the relative table;
- ``position_biased_input`` [false]: absolute position embeddings added to the
  word embeddings (DeBERTa-v2 style); ``type_vocab_size`` [0];
  ``embedding_size``: a narrower embedding table with a projection
  (``embed_proj``) to ``hidden_size``;
- ``conv_kernel_size`` [absent; 3 in deberta-v2-xlarge/xxlarge]: a convolution
  over the embedding output merged into the first layer's output.

Embeddings are zeroed at padding positions (as Hugging Face does), so padding
never reaches the real positions (not even through the convolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..errors import CheckpointError
from .blocks import (
    FeedForward,
    PostNormLayer,
    SelfAttention,
    activation,
    key_padding_mask,
    layer_norm,
    mask_to_bias,
)
from .config import (
    MAX_DIM,
    MAX_LAYERS,
    check_activation,
    check_bert_settings,
    check_bool,
    check_divisible,
    check_int,
    check_int_fields,
    is_int,
    require_keys,
    require_object,
    setting,
)
from .family import TransformerEncoder, register_prefixed_family

POSITION_TERMS = ("c2p", "p2c")
_REL_NORMS = ("none", "layer_norm")

# Integer settings: (low, high, default when missing or null). Defaults are
# Hugging Face's DebertaV2Config defaults, which differ from the v3 checkpoints'
# values (those always write them out).
_INTS: Dict[str, Tuple[int, int, Optional[int]]] = {
    "vocab_size": (1, MAX_DIM, None),
    "hidden_size": (1, MAX_DIM, 1536),
    "num_hidden_layers": (1, MAX_LAYERS, 24),
    "num_attention_heads": (1, MAX_DIM, 24),
    "intermediate_size": (1, MAX_DIM, 6144),
    "max_position_embeddings": (1, MAX_DIM, 512),
    "type_vocab_size": (0, MAX_DIM, 0),
    "pad_token_id": (0, MAX_DIM, 0),
    # < 1 means max_position_embeddings.
    "max_relative_positions": (-MAX_DIM, MAX_DIM, -1),
    # < 1 means no log buckets.
    "position_buckets": (-MAX_DIM, MAX_DIM, -1),
    # < 1 means no convolution.
    "conv_kernel_size": (-MAX_DIM, MAX_DIM, 0),
    "conv_groups": (1, MAX_DIM, 1),
}
_PROBABILITIES = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
_FLAGS = {"relative_attention": False, "position_biased_input": True, "share_att_key": False}


@dataclass
class DebertaV2Config:
    """Hyper-parameters of a DeBERTa-v2/v3 encoder, validated on construction.

    Build it with :meth:`from_dict` from a ``config.json`` dict (``raw`` keeps
    that dict, written back verbatim when a pipeline is saved). Every value is
    checked (type and range) before any tensor exists; a bad one raises
    :class:`CheckpointError` naming ``source`` and the key. ``pos_att_type`` is a
    tuple of ``"c2p"``/``"p2c"`` (Hugging Face also accepts ``"p2c|c2p"``);
    ``embedding_size`` is the embedding width (``hidden_size`` unless the
    checkpoint says otherwise).
    """

    vocab_size: int
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    pad_token_id: int = 0
    relative_attention: bool = False
    max_relative_positions: int = -1
    position_buckets: int = -1
    pos_att_type: Tuple[str, ...] = ()
    share_att_key: bool = False
    norm_rel_ebd: Tuple[str, ...] = ("none",)
    position_biased_input: bool = True
    embedding_size: Optional[int] = None
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    model_type: str = "deberta-v2"
    source: str = field(default="config.json", repr=False, compare=False)
    raw: Optional[Dict[str, Any]] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        source = self.source
        if self.embedding_size is None and is_int(self.hidden_size):
            self.embedding_size = self.hidden_size
        check_int_fields(self, _INTS, source)
        check_int(self.embedding_size, "embedding_size", 1, MAX_DIM, source)
        check_bert_settings(self, source)
        for key in _FLAGS:
            check_bool(getattr(self, key), key, source)
        self.pos_att_type = _position_terms(self.pos_att_type, source)
        self.norm_rel_ebd = _rel_norms(self.norm_rel_ebd, source)
        if self.relative_attention and self.position_buckets > 0:
            half = self.position_buckets // 2
            if half < 1:
                raise CheckpointError(
                    f"{source}: position_buckets={self.position_buckets} must be at least 2 "
                    "(or below 1 for no buckets)."
                )
            if self.max_relative_span <= half + 1:
                raise CheckpointError(
                    f"{source}: max_relative_positions={self.max_relative_positions} (resolved: "
                    f"{self.max_relative_span}) must exceed position_buckets // 2 + 1 = "
                    f"{half + 1}; "
                    "the log buckets are undefined otherwise."
                )
        if self.conv_kernel_size > 0:
            if self.conv_kernel_size % 2 == 0:
                raise CheckpointError(
                    f"{source}: conv_kernel_size={self.conv_kernel_size} must be odd (an even "
                    "kernel would shorten the sequence)."
                )
            check_activation(self.conv_act, "conv_act", source)
            check_divisible(
                self.hidden_size, "hidden_size", self.conv_groups, "conv_groups", source
            )

    # -- derived settings --------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_relative_span(self) -> int:
        """``max_relative_positions``, where values below 1 mean ``max_position_embeddings``."""
        if self.max_relative_positions < 1:
            return self.max_position_embeddings
        return self.max_relative_positions

    @property
    def relative_span(self) -> int:
        """Rows of the relative table on each side of distance 0 (the table has twice
        as many): ``position_buckets`` if set, else ``max_relative_span``."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_span

    @property
    def score_scale(self) -> float:
        """The divisor of every attention score: sqrt(head_dim * (1 + relative terms)).
        Hugging Face counts ``pos_att_type`` even without ``relative_attention``."""
        return math.sqrt(self.head_dim * (1 + len(self.pos_att_type)))

    @property
    def rel_layer_norm(self) -> bool:
        return "layer_norm" in self.norm_rel_ebd

    @property
    def max_positions(self) -> int:
        """Longest input: bounded by the absolute position table only when there is one
        (``position_biased_input``); relative positions are clipped, not bounded."""
        return self.max_position_embeddings

    # -- reading and writing -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config.json") -> "DebertaV2Config":
        """Read a Hugging Face ``config.json`` dict, ignoring keys that do not change
        the encoder (pooler, initialiser, tokens, ``legacy`` of the MLM head)."""
        data = require_object(data, source)
        require_keys(data, ("vocab_size",), source)
        width, heads = data.get("hidden_size"), data.get("num_attention_heads")
        head_size = data.get("attention_head_size")
        if head_size is not None and (
            not is_int(width) or not is_int(heads) or heads < 1 or head_size * heads != width
        ):
            raise CheckpointError(
                f"{source}: attention_head_size={head_size!r} with num_attention_heads={heads!r} "
                f"does not give hidden_size={width!r}; attention heads narrower or wider than "
                "hidden_size / num_attention_heads are not supported."
            )

        value = partial(setting, data)  # a missing or null key: the default
        values: Dict[str, Any] = {key: value(key, d) for key, (_, _, d) in _INTS.items()}
        values.update({key: value(key, d) for key, d in _PROBABILITIES.items()})
        values.update({key: value(key, d) for key, d in _FLAGS.items()})
        values.update(
            hidden_act=value("hidden_act", "gelu"),
            layer_norm_eps=value("layer_norm_eps", 1e-7),
            pos_att_type=data.get("pos_att_type"),
            norm_rel_ebd=value("norm_rel_ebd", "none"),
            embedding_size=data.get("embedding_size"),
            conv_act=value("conv_act", "tanh"),
            model_type=value("model_type", "deberta-v2"),
        )
        return cls(**values, source=source, raw=dict(data))

    def to_dict(self) -> Dict[str, Any]:
        """The ``config.json`` dict: the original one where there is one, else ours."""
        if self.raw is not None:
            return dict(self.raw)
        data = {
            key: getattr(self, key)
            for key in self.__dataclass_fields__
            if key not in ("source", "raw")
        }
        data["pos_att_type"] = list(self.pos_att_type)
        data["norm_rel_ebd"] = "|".join(self.norm_rel_ebd)
        return data


def _position_terms(value: Any, source: str) -> Tuple[str, ...]:
    """``pos_att_type`` as a tuple of distinct terms: null, a list of strings, or a
    ``"|"``-separated string (older configs), case-insensitive as in Hugging Face."""
    if value is None:
        return ()
    items = value.split("|") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise CheckpointError(
            f"{source}: pos_att_type={value!r} must be a list of strings (or a '|'-separated "
            f"string) from {list(POSITION_TERMS)}."
        )
    terms: List[str] = []
    for item in items:
        term = item.strip().lower()
        if not term:
            continue
        if term not in POSITION_TERMS:
            raise CheckpointError(
                f"{source}: pos_att_type={value!r} contains {item!r}; DeBERTa-v2 supports only "
                f"{list(POSITION_TERMS)} (content-to-position and position-to-content)."
            )
        if term not in terms:
            terms.append(term)
    return tuple(terms)


def _rel_norms(value: Any, source: str) -> Tuple[str, ...]:
    """``norm_rel_ebd``: ``"none"``, ``"layer_norm"`` (or a ``"|"``-separated mix)."""
    if isinstance(value, (list, tuple)):  # our own normalised form
        value = "|".join(value) if all(isinstance(x, str) for x in value) else value
    if not isinstance(value, str):
        raise CheckpointError(
            f"{source}: norm_rel_ebd={value!r} must be a string, 'none' or 'layer_norm'."
        )
    parts = tuple(part.strip().lower() for part in value.split("|"))
    for part in parts:
        if part not in _REL_NORMS:
            raise CheckpointError(
                f"{source}: norm_rel_ebd={value!r} contains {part!r}; supported: "
                f"{list(_REL_NORMS)}."
            )
    return parts


# -- relative positions ------------------------------------------------------------------------
def log_bucket(relative: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """Map distances to bucketed distances: |d| <= buckets // 2 unchanged, longer
    ones log-spaced so that ``max_distance`` lands near ``buckets``, sign kept.

    The float32 operations are the ones of the reference implementation, so
    distances on a bucket boundary round the same way.
    """
    half = buckets // 2
    sign = torch.sign(relative)
    near = (relative < half) & (relative > -half)
    # Distances that keep their own value get a dummy positive one for the log.
    distance = torch.where(near, torch.full_like(relative, half - 1), relative.abs())
    log_ratio = torch.log(distance / half) / torch.log(
        torch.tensor((max_distance - 1) / half, device=relative.device)
    )
    far = torch.ceil(log_ratio * (half - 1)) + half
    return torch.where(distance <= half, relative.to(far.dtype), far * sign).to(torch.long)


class RelativeIndex(NamedTuple):
    """Rows of the relative table for every (query, key) pair, (length, length) each:
    ``c2p[i, j]`` for query i's score against key j's position offset, ``p2c[j, i]``
    for key j's score against query i's."""

    c2p: torch.Tensor
    p2c: torch.Tensor


def relative_index(length: int, config: DebertaV2Config, device: torch.device) -> RelativeIndex:
    """The table rows for a ``length``-piece input, built once per forward pass."""
    positions = torch.arange(length, dtype=torch.long, device=device)
    relative = positions[:, None] - positions[None, :]  # query minus key
    if config.position_buckets > 0:
        relative = log_bucket(relative, config.position_buckets, config.max_relative_span)
    span = config.relative_span
    return RelativeIndex(
        c2p=(relative + span).clamp(0, 2 * span - 1),
        p2c=(span - relative).clamp(0, 2 * span - 1),
    )


class RelativeContext(NamedTuple):
    """What every layer's attention needs from the encoder: the (normed) relative
    embedding table, (2 * span, hidden), and the row indices."""

    table: torch.Tensor
    index: RelativeIndex


# -- module ----------------------------------------------------------------------------------------
class DebertaEmbeddings(nn.Module):
    """Word (+ absolute position, + token type) embeddings, a projection when
    ``embedding_size`` differs from ``hidden_size``, LayerNorm, zero at padding."""

    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        width = config.embedding_size
        self.word = nn.Embedding(config.vocab_size, width)
        self.position = (
            nn.Embedding(config.max_position_embeddings, width)
            if config.position_biased_input
            else None
        )
        self.token_type = (
            nn.Embedding(config.type_vocab_size, width) if config.type_vocab_size > 0 else None
        )
        self.project = (
            nn.Linear(width, config.hidden_size, bias=False)
            if width != config.hidden_size
            else None
        )
        self.norm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,
        keep: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """keep: (batch, length, 1) 1.0 at real pieces, 0.0 at padding."""
        hidden = self.word(input_ids)
        if self.position is not None:
            hidden = hidden + self.position.weight[: input_ids.shape[1]]
        if self.token_type is not None:
            if token_type_ids is None:
                hidden = hidden + self.token_type.weight[0]  # every piece is of type 0
            else:
                hidden = hidden + self.token_type(token_type_ids)
        if self.project is not None:
            hidden = self.project(hidden)
        return self.dropout(self.norm(hidden) * keep.to(hidden.dtype))


class DisentangledAttention(SelfAttention):
    """:class:`~.blocks.SelfAttention` plus DeBERTa's content-to-position and
    position-to-content terms, added to the padding bias before SDPA."""

    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__(
            config.hidden_size,
            config.num_attention_heads,
            dropout=config.attention_probs_dropout_prob,
        )
        self.relative = config.relative_attention
        self.terms = config.pos_att_type
        self.scale_divisor = config.score_scale
        self.share_keys = config.share_att_key
        width = config.hidden_size
        # Separate position projections unless they share the content ones.
        if self.relative and not self.share_keys and "c2p" in self.terms:
            self.pos_key = nn.Linear(width, width)
        if self.relative and not self.share_keys and "p2c" in self.terms:
            self.pos_query = nn.Linear(width, width)
        self.pos_dropout = nn.Dropout(config.hidden_dropout_prob)

    def split_table(self, table: torch.Tensor) -> torch.Tensor:
        """(rows, width) -> (heads, rows, head_dim)."""
        return table.view(table.shape[0], self.n_heads, self.head_dim).transpose(0, 1)

    def relative_bias(
        self, query: torch.Tensor, key: torch.Tensor, context: RelativeContext
    ) -> torch.Tensor:
        """The c2p and p2c scores, (batch, heads, length, length), not yet scaled."""
        table = self.pos_dropout(context.table)
        batch, heads, length, _ = query.shape
        shape = (batch, heads, length, length)
        bias = torch.zeros((), dtype=query.dtype, device=query.device)
        if "c2p" in self.terms:
            pos_key = self.split_table((self.key if self.share_keys else self.pos_key)(table))
            # (batch, heads, query, row): query i against every position row; pick
            # the row of each key's offset.
            scores = torch.matmul(query, pos_key.transpose(-1, -2))
            bias = bias + scores.gather(-1, context.index.c2p.expand(shape))
        if "p2c" in self.terms:
            pos_query = self.split_table((self.query if self.share_keys else self.pos_query)(table))
            # (batch, heads, key, row): key j against every row; pick the row of
            # each query's offset as seen from the key, then put queries first.
            scores = torch.matmul(key, pos_query.transpose(-1, -2))
            bias = bias + scores.gather(-1, context.index.p2c.expand(shape)).transpose(-1, -2)
        return bias

    def forward(  # type: ignore[override]
        self,
        hidden: torch.Tensor,
        mask: Optional[torch.Tensor],
        relative: Optional[RelativeContext] = None,
    ) -> torch.Tensor:
        """mask: the padding bias (float, from :func:`~.blocks.mask_to_bias`) or a bool
        mask or None; relative: the encoder's table and indices (when
        ``relative_attention``)."""
        query, key, value = self.project(hidden)
        if self.relative and self.terms and relative is not None:
            extra = self.relative_bias(query, key, relative) / self.scale_divisor
            if mask is not None and mask.dtype == torch.bool:
                mask = mask_to_bias(mask, extra.dtype)
            mask = extra if mask is None else mask + extra
        return self.attend(query, key, value, mask, scale=1.0 / self.scale_divisor)


class DebertaConv(nn.Module):
    """deberta-v2-xlarge's convolution: ``LN(layer_1 + act(conv(embeddings)))``, zero
    at padding (the convolution's padding and the masked embeddings are zeros
    alike, so real positions never see padding)."""

    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        kernel = config.conv_kernel_size
        width = config.hidden_size
        self.conv = nn.Conv1d(
            width, width, kernel, padding=(kernel - 1) // 2, groups=config.conv_groups
        )
        self.norm = layer_norm(width, config.layer_norm_eps)
        self.act = activation(config.conv_act)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, embedded: torch.Tensor, layer_out: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """embedded: the embedding output; layer_out: layer 1's; keep: (batch, length, 1)."""
        out = self.conv(embedded.transpose(1, 2)).transpose(1, 2)
        out = self.act(self.dropout(out.masked_fill(keep == 0, 0.0)))
        return self.norm(layer_out + out) * keep.to(out.dtype)


class DebertaV2Encoder(TransformerEncoder):
    """DeBERTa-v2/v3: embeddings, post-norm layers with disentangled attention (one
    relative table for all layers), and (v2-xlarge) a convolution after layer 1.
    Returns every layer's hidden states."""

    def __init__(self, config: DebertaV2Config) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.embeddings = DebertaEmbeddings(config)
        self.layers = nn.ModuleList(
            PostNormLayer(
                DisentangledAttention(config),
                FeedForward(width, config.intermediate_size, config.hidden_act),
                width,
                config.layer_norm_eps,
                config.hidden_dropout_prob,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.rel_embeddings = (
            nn.Embedding(2 * config.relative_span, width) if config.relative_attention else None
        )
        self.rel_norm = layer_norm(width, config.layer_norm_eps) if config.rel_layer_norm else None
        self.conv = DebertaConv(config) if config.conv_kernel_size > 0 else None

    @property
    def max_length(self) -> Optional[int]:
        """Longest input, or None when only relative positions are used (distances
        beyond the table share its last row)."""
        return self.config.max_position_embeddings if self.config.position_biased_input else None

    def relative_context(self, length: int, device: torch.device) -> Optional[RelativeContext]:
        """The relative table (normed) and the index for this length; None without
        relative attention."""
        if self.rel_embeddings is None:
            return None
        table = self.rel_embeddings.weight
        if self.rel_norm is not None:
            table = self.rel_norm(table)
        return RelativeContext(table, relative_index(length, self.config, device))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        *,
        n_layers: Optional[int] = None,
    ) -> List[torch.Tensor]:
        """Encode a padded batch.

        input_ids: (batch, length) piece ids; attention_mask: (batch, length), 1 for
        real pieces, 0 for padding. Returns ``n_layers`` tensors (batch, length,
        hidden): the embedding output, then each layer (None: all; layers above
        are not computed).
        """
        n_blocks = self.blocks_to_run(n_layers)
        length = self.check_input_ids(input_ids, self.max_length)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask[..., None]
        hidden = self.embeddings(input_ids, keep, token_type_ids)
        relative = self.relative_context(length, input_ids.device)
        # One additive bias for padding, to which each layer adds its relative terms.
        mask = mask_to_bias(key_padding_mask(attention_mask), hidden.dtype)
        outputs = [hidden]
        for i, layer in enumerate(islice(self.layers, n_blocks)):
            out = layer(outputs[-1], mask, relative=relative)
            if i == 0 and self.conv is not None:
                out = self.conv(hidden, out, keep)
            outputs.append(out)
        return outputs


# -- family --------------------------------------------------------------------------------------
DEBERTA_NAMES = (
    ("embeddings.word_embeddings.", "embeddings.word."),
    ("embeddings.position_embeddings.", "embeddings.position."),
    ("embeddings.token_type_embeddings.", "embeddings.token_type."),
    ("embeddings.embed_proj.", "embeddings.project."),
    ("embeddings.LayerNorm.", "embeddings.norm."),
    ("encoder.layer.{n}.attention.self.query_proj.", "layers.{n}.attention.query."),
    ("encoder.layer.{n}.attention.self.key_proj.", "layers.{n}.attention.key."),
    ("encoder.layer.{n}.attention.self.value_proj.", "layers.{n}.attention.value."),
    ("encoder.layer.{n}.attention.self.pos_key_proj.", "layers.{n}.attention.pos_key."),
    ("encoder.layer.{n}.attention.self.pos_query_proj.", "layers.{n}.attention.pos_query."),
    ("encoder.layer.{n}.attention.output.dense.", "layers.{n}.attention.out."),
    ("encoder.layer.{n}.attention.output.LayerNorm.", "layers.{n}.attention_norm."),
    ("encoder.layer.{n}.intermediate.dense.", "layers.{n}.ffn.inner."),
    ("encoder.layer.{n}.output.dense.", "layers.{n}.ffn.outer."),
    ("encoder.layer.{n}.output.LayerNorm.", "layers.{n}.ffn_norm."),
    ("encoder.rel_embeddings.", "rel_embeddings."),
    ("encoder.LayerNorm.", "rel_norm."),
    ("encoder.conv.conv.", "conv.conv."),
    ("encoder.conv.LayerNorm.", "conv.norm."),
)
# Task heads outside the ``deberta.`` prefix: the MLM heads (``cls.`` when
# ``legacy``, ``lm_predictions.`` otherwise), the replaced-token-detection head
# of Microsoft's v3 checkpoints (``mask_predictions.``), and the classification,
# token-classification and question-answering heads.
DEBERTA_HEADS = (
    r"^cls\.",
    r"^lm_predictions\.",
    r"^mask_predictions\.",
    r"^pooler\.",
    r"^classifier\.",
    r"^qa_outputs\.",
)


def read_deberta_config(data: Dict[str, Any], source: str) -> DebertaV2Config:
    return DebertaV2Config.from_dict(data, source=source)


def _positions(config: DebertaV2Config) -> int:
    # Hugging Face's tokenizers cut at model_max_length = max_position_embeddings
    # (512) even where only relative positions are used.
    return config.max_positions


DEBERTA_V2 = register_prefixed_family(
    "deberta-v2",
    "deberta.",
    read_config=read_deberta_config,
    build=DebertaV2Encoder,
    usable_positions=_positions,
    names=DEBERTA_NAMES,
    skipped=(r"^embeddings\.position_ids$",),
    heads=DEBERTA_HEADS,
    tokenizer_kind="unigram",
)
