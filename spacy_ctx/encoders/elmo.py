"""ELMo bidirectional language model (biLM) in plain PyTorch.

The maths follows the original TensorFlow biLM (bilm-tf), whose published weights
AllenNLP also reads:

* every word is a row of 50 byte-level char ids (:mod:`spacy_ctx.pieces.chars`),
  embedded, run through one 1-d convolution per filter width, max-pooled over
  positions, passed through highway layers and projected: the *token embedding*;
* a forward and a backward stack of LSTM cells with a projection ("LSTMP") read the
  token embeddings of a sentence framed by ``<S>`` ... ``</S>``; every layer but the
  first adds its input to its output (skip connection);
* the output has one entry per layer: ``[token, lstm_1, lstm_2, ...]``, the token
  layer being the token embedding concatenated with itself so that every layer has
  the width ``2 * projection_dim``.

Unlike AllenNLP's ``_ElmoBiLm``, :class:`ElmoBiLM` is stateless: every sentence
starts from a zero LSTM state, so a sentence gets the same vectors whatever else
is in the batch and whatever ran before.

Weights are loaded by :mod:`spacy_ctx.encoders.elmo_checkpoint`. This module
imports only torch, numpy and numpy-only helpers of this package.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import CheckpointError
from ..pieces.chars import BOS_CHAR_IDS, EOS_CHAR_IDS, MAX_WORD_LENGTH, elmo_char_ids

__all__ = [
    "ElmoOptions",
    "ElmoCharEncoder",
    "Highway",
    "ProjectionLstmLayer",
    "BiProjectionLstm",
    "ElmoBiLM",
    "WordEmbeddingCache",
    "embed_words",
    "elmo_layer_names",
    "N_CHAR_EMBEDDING_ROWS",
]

#: Rows of the char embedding: 261 stored in the file plus row 0 for padding tokens.
N_CHAR_EMBEDDING_ROWS = 262

#: Every matmul gets a row count that is a multiple of this. BLAS libraries pick
#: different kernels (with different summation orders) for small or odd row
#: counts, which would make a sentence's vectors depend, in the last bits, on
#: how many other sentences share its batch. With the rows padded, a row's
#: result is bitwise independent of the other rows (checked with MKL on CPU,
#: 1-16 threads); on GPUs the agreement is only to float32 rounding.
ROW_MULTIPLE = 16


def _padded_size(n_rows: int) -> int:
    """Smallest multiple of ``ROW_MULTIPLE`` that is >= ``n_rows`` (at least one block)."""
    return max(1, -(-n_rows // ROW_MULTIPLE)) * ROW_MULTIPLE

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


def elmo_layer_names(n_lstm_layers: int) -> List[str]:
    """Names of the output layers: ``["token", "lstm_1", ..., "lstm_n"]``."""
    return ["token"] + [f"lstm_{k}" for k in range(1, n_lstm_layers + 1)]


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ElmoOptions:
    """The hyper-parameters of an ELMo biLM, as stored in AllenNLP's ``options.json``.

    Build it with :meth:`from_file` or :meth:`from_dict`; both validate every
    setting and raise :class:`~spacy_ctx.errors.CheckpointError` naming the file
    and the setting. ``cell_clip`` / ``proj_clip`` of ``None`` mean no clipping.
    """

    char_embedding_dim: int
    filters: Tuple[Tuple[int, int], ...]
    n_highway: int
    activation: str
    lstm_dim: int
    projection_dim: int
    n_layers: int
    cell_clip: Optional[float] = 3.0
    proj_clip: Optional[float] = 3.0
    use_skip_connections: bool = True
    n_characters: int = 262
    max_characters_per_token: int = MAX_WORD_LENGTH
    #: Where the options came from, only used in error messages.
    source: str = field(default="options.json", compare=False)

    @property
    def n_filters_total(self) -> int:
        """Width of the char CNN output (sum of the filters' output channels)."""
        return sum(n for _, n in self.filters)

    @property
    def output_dim(self) -> int:
        """Width of every output layer: ``2 * projection_dim``."""
        return 2 * self.projection_dim

    @property
    def n_output_layers(self) -> int:
        """Number of output layers: the token layer plus one per LSTM layer."""
        return self.n_layers + 1

    @property
    def uses_char_projection(self) -> bool:
        """Whether the char CNN has a projection (bilm-tf skips it when widths agree)."""
        return self.n_filters_total != self.projection_dim

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "ElmoOptions":
        """Read and validate an AllenNLP/bilm-tf ``options.json``."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"ELMo options file not found: '{path}'. Pass the path of the 'options.json' "
                "that was published with the ELMo weights file."
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"Could not read the ELMo options file '{path}' as JSON ({exc}). "
                "Download the 'options.json' of the model again."
            ) from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "options.json") -> "ElmoOptions":
        """Validate a parsed ``options.json`` dict; ``source`` names it in errors.

        Unknown keys (training settings such as ``n_epochs``) are ignored.
        """

        def fail(setting: str, problem: str, fix: str) -> CheckpointError:
            return CheckpointError(f"{source}: setting '{setting}' {problem}. {fix}")

        if not isinstance(data, Mapping):
            raise CheckpointError(
                f"{source}: expected a JSON object with 'lstm' and 'char_cnn' sections, "
                f"found {type(data).__name__}. Is this really an ELMo options.json?"
            )
        sections: Dict[str, Mapping[str, Any]] = {}
        for name in ("lstm", "char_cnn"):
            section = data.get(name)
            if not isinstance(section, Mapping):
                raise fail(
                    name,
                    "is missing or not an object",
                    "An ELMo options.json has 'lstm' and 'char_cnn' sections; "
                    "use the options file published with the weights.",
                )
            sections[name] = section
        lstm, cnn = sections["lstm"], sections["char_cnn"]

        def get_int(section: Mapping[str, Any], prefix: str, key: str, minimum: int,
                    default: Optional[int] = None) -> int:
            value = section.get(key, default)
            if not _is_int(value) or value < minimum:
                raise fail(
                    f"{prefix}.{key}",
                    f"must be an integer >= {minimum}, found {value!r}",
                    "Use the options file published with the weights.",
                )
            return int(value)

        def get_clip(key: str) -> Optional[float]:
            value = lstm.get(key)
            if value is None:
                return None
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise fail(
                    f"lstm.{key}",
                    f"must be a non-negative number or null, found {value!r}",
                    "Set it to the clip value used in training (3 for the published models) "
                    "or null for no clipping.",
                )
            # bilm-tf and AllenNLP treat 0 as "no clipping".
            return float(value) if value > 0 else None

        skip = lstm.get("use_skip_connections")
        if skip is not True:
            raise fail(
                "lstm.use_skip_connections",
                f"is {json.dumps(skip)}",
                "Only biLMs with residual (skip) connections between LSTM layers are "
                "supported, as in all published ELMo models; set it to true only if the "
                "weights were trained that way.",
            )
        if lstm.get("bidirectional", True) is not True:
            raise fail(
                "lstm.bidirectional",
                "is not true",
                "ELMo needs both LSTM directions; use a bidirectional checkpoint.",
            )

        embedding = cnn.get("embedding")
        if not isinstance(embedding, Mapping):
            raise fail(
                "char_cnn.embedding",
                "is missing or not an object",
                "Expected e.g. {\"dim\": 16}; use the options file published with the weights.",
            )
        char_dim = get_int(embedding, "char_cnn.embedding", "dim", 1)

        max_chars = get_int(cnn, "char_cnn", "max_characters_per_token", 1, MAX_WORD_LENGTH)
        if max_chars != MAX_WORD_LENGTH:
            raise fail(
                "char_cnn.max_characters_per_token",
                f"is {max_chars}",
                f"Only {MAX_WORD_LENGTH} characters per token are supported (all published "
                "ELMo models use 50).",
            )
        n_chars = get_int(cnn, "char_cnn", "n_characters", 1, N_CHAR_EMBEDDING_ROWS)
        if n_chars not in (N_CHAR_EMBEDDING_ROWS - 1, N_CHAR_EMBEDDING_ROWS):
            raise fail(
                "char_cnn.n_characters",
                f"is {n_chars}",
                "ELMo uses 261 characters (262 with the padding row); set it to 262.",
            )

        raw_filters = cnn.get("filters")
        if not isinstance(raw_filters, (list, tuple)) or not raw_filters:
            raise fail(
                "char_cnn.filters",
                f"must be a non-empty list of [width, n_filters] pairs, found {raw_filters!r}",
                "Use the options file published with the weights.",
            )
        filters: List[Tuple[int, int]] = []
        for item in raw_filters:
            if (
                not isinstance(item, (list, tuple))
                or len(item) != 2
                or not all(_is_int(v) and v >= 1 for v in item)
                or item[0] > MAX_WORD_LENGTH
            ):
                raise fail(
                    "char_cnn.filters",
                    f"contains {item!r}, which is not a [width, n_filters] pair of positive "
                    f"integers with width <= {MAX_WORD_LENGTH}",
                    "Use the options file published with the weights.",
                )
            filters.append((int(item[0]), int(item[1])))

        activation = cnn.get("activation")
        if activation not in _ACTIVATIONS:
            raise fail(
                "char_cnn.activation",
                f"is {activation!r}",
                f"Supported activations are {sorted(_ACTIVATIONS)}.",
            )

        return cls(
            char_embedding_dim=char_dim,
            filters=tuple(filters),
            n_highway=get_int(cnn, "char_cnn", "n_highway", 0),
            activation=str(activation),
            lstm_dim=get_int(lstm, "lstm", "dim", 1),
            projection_dim=get_int(lstm, "lstm", "projection_dim", 1),
            n_layers=get_int(lstm, "lstm", "n_layers", 1),
            cell_clip=get_clip("cell_clip"),
            proj_clip=get_clip("proj_clip"),
            use_skip_connections=True,
            n_characters=N_CHAR_EMBEDDING_ROWS,
            max_characters_per_token=max_chars,
            source=source,
        )

    def to_dict(self) -> Dict[str, Any]:
        """Return the options in the ``options.json`` layout (readable by AllenNLP)."""
        return {
            "lstm": {
                "dim": self.lstm_dim,
                "projection_dim": self.projection_dim,
                "n_layers": self.n_layers,
                "cell_clip": self.cell_clip,
                "proj_clip": self.proj_clip,
                "use_skip_connections": self.use_skip_connections,
            },
            "char_cnn": {
                "embedding": {"dim": self.char_embedding_dim},
                "filters": [list(f) for f in self.filters],
                "n_highway": self.n_highway,
                "activation": self.activation,
                "n_characters": self.n_characters,
                "max_characters_per_token": self.max_characters_per_token,
            },
        }


# --------------------------------------------------------------------------
# Character encoder
# --------------------------------------------------------------------------


class Highway(nn.Module):
    """One highway layer, bilm-tf convention.

    ``g = sigmoid(x W_carry + b_carry)`` and ``y = g * relu(x W_transform + b_transform)
    + (1 - g) * x``. Both halves live in one ``Linear`` (transform rows first, then
    carry rows) so a layer costs one matmul.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map (N, dim) to (N, dim)."""
        transform, carry = self.linear(x).chunk(2, dim=-1)
        gate = torch.sigmoid(carry)
        return gate * torch.relu(transform) + (1.0 - gate) * x


class ElmoCharEncoder(nn.Module):
    """Context-independent token embeddings from ELMo char ids.

    Input: char ids (N, 50) as made by :func:`spacy_ctx.pieces.chars.elmo_char_ids`.
    Output: (N, projection_dim). All-zero rows (padding tokens) give meaningless
    values; callers skip or mask them.
    """

    def __init__(self, options: ElmoOptions) -> None:
        super().__init__()
        self.options = options
        # Row 0 is for the padding id 0 and stays zero (padding_idx blocks its gradient).
        self.char_embedding = nn.Embedding(
            N_CHAR_EMBEDDING_ROWS, options.char_embedding_dim, padding_idx=0
        )
        self.convolutions = nn.ModuleList(
            nn.Conv1d(options.char_embedding_dim, n_filters, kernel_size=width)
            for width, n_filters in options.filters
        )
        self.activation = _ACTIVATIONS[options.activation]
        self.highways = nn.ModuleList(
            Highway(options.n_filters_total) for _ in range(options.n_highway)
        )
        self.projection: Optional[nn.Linear] = (
            nn.Linear(options.n_filters_total, options.projection_dim)
            if options.uses_char_projection
            else None
        )

    def forward(self, char_ids: Tensor) -> Tensor:
        """Map char ids (N, 50) to token embeddings (N, projection_dim)."""
        n_words = char_ids.shape[0]
        # Padding rows make a word's embedding independent of N (see ROW_MULTIPLE).
        char_ids = F.pad(char_ids, (0, 0, 0, _padded_size(n_words) - n_words))
        # (N, 50, char_dim) -> (N, char_dim, 50): Conv1d wants channels first.
        embedded = self.char_embedding(char_ids).transpose(1, 2)
        pooled = []
        for conv in self.convolutions:
            # Max over positions before the activation: same result (both are
            # monotonic), fewer elements to activate.
            pooled.append(self.activation(conv(embedded).amax(dim=-1)))
        hidden = torch.cat(pooled, dim=-1)
        for highway in self.highways:
            hidden = highway(hidden)
        if self.projection is not None:
            hidden = self.projection(hidden)
        return hidden[:n_words]


# --------------------------------------------------------------------------
# Projection LSTM
# --------------------------------------------------------------------------


class ProjectionLstmLayer(nn.Module):
    """One LSTM layer with a projection ("LSTMP"), for both directions at once.

    The forward and backward cells have separate weights, stacked on a leading
    direction axis (0 = forward, 1 = backward) so that one batched matmul serves
    both. Gate order along the ``4 * cell_dim`` axis is PyTorch's: input, forget,
    cell candidate, output. ``bias`` holds the bias as stored in the checkpoint;
    like TensorFlow's LSTMCell, the forward pass adds ``FORGET_BIAS`` (1.0) to the
    forget gate's part, so checkpoints round-trip unchanged.

    Shapes: ``input_weight`` (2, input_dim, 4*cell_dim), ``recurrent_weight``
    (2, projection_dim, 4*cell_dim), ``bias`` (2, 4*cell_dim), ``projection_weight``
    (2, cell_dim, projection_dim); all used as ``x @ W``.
    """

    #: Added to the forget gate at run time; TF's LSTMCell does the same and does
    #: not store it in the checkpoint.
    FORGET_BIAS = 1.0

    def __init__(
        self,
        input_dim: int,
        cell_dim: int,
        projection_dim: int,
        cell_clip: Optional[float],
        proj_clip: Optional[float],
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.cell_dim = cell_dim
        self.projection_dim = projection_dim
        self.cell_clip = cell_clip
        self.proj_clip = proj_clip
        scale = 1.0 / math.sqrt(cell_dim)
        self.input_weight = nn.Parameter(torch.empty(2, input_dim, 4 * cell_dim).uniform_(-scale, scale))
        self.recurrent_weight = nn.Parameter(
            torch.empty(2, projection_dim, 4 * cell_dim).uniform_(-scale, scale)
        )
        self.bias = nn.Parameter(torch.zeros(2, 4 * cell_dim))
        forget_offset = torch.zeros(4 * cell_dim)
        forget_offset[cell_dim : 2 * cell_dim] = self.FORGET_BIAS
        self.register_buffer("forget_bias_offset", forget_offset, persistent=False)
        self.projection_weight = nn.Parameter(
            torch.empty(2, cell_dim, projection_dim).uniform_(-scale, scale)
        )

    def forward(
        self, inputs: Tensor, active: Tensor, clip_counts: Optional[Dict[str, Tensor]] = None
    ) -> Tensor:
        """Run both directions over time.

        Args:
            inputs: (2, T, B, input_dim), direction-major then time; direction 1
                already holds each row's sequence reversed within its own length.
            active: (T, B) bool, True where a row still has a token at step t.
            clip_counts: when a dict, receives running counts of values beyond the
                clips (``"cell"``, ``"projection"``) at active positions (debugging).

        Returns:
            (2, T, B, projection_dim): the (clipped) projected outputs, zeros where
            ``active`` is False. A row keeps its state through inactive steps.
        """
        n_dirs, n_steps, batch_size, _ = inputs.shape
        # The input part of every gate for every step in one matmul per direction;
        # the loop below then needs only the recurrent matmul.
        flat_inputs = inputs.reshape(n_dirs, n_steps * batch_size, self.input_dim)
        bias = self.bias + self.forget_bias_offset
        input_gates = torch.baddbmm(bias.unsqueeze(1), flat_inputs, self.input_weight)
        input_gates = input_gates.view(n_dirs, n_steps, batch_size, -1)

        cell = inputs.new_zeros(n_dirs, batch_size, self.cell_dim)
        hidden = inputs.new_zeros(n_dirs, batch_size, self.projection_dim)
        step_active = active.view(n_steps, 1, batch_size, 1)  # broadcasts over directions
        outputs: List[Tensor] = []
        for t in range(n_steps):
            gates = torch.baddbmm(input_gates[:, t], hidden, self.recurrent_weight)
            in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)
            new_cell = torch.sigmoid(in_gate) * torch.tanh(candidate) + torch.sigmoid(forget_gate) * cell
            if clip_counts is not None and self.cell_clip is not None:
                _count_beyond(clip_counts, "cell", new_cell, self.cell_clip, step_active[t])
            if self.cell_clip is not None:
                new_cell = new_cell.clamp(-self.cell_clip, self.cell_clip)
            cell_output = torch.sigmoid(out_gate) * torch.tanh(new_cell)
            new_hidden = torch.bmm(cell_output, self.projection_weight)
            if clip_counts is not None and self.proj_clip is not None:
                _count_beyond(clip_counts, "projection", new_hidden, self.proj_clip, step_active[t])
            if self.proj_clip is not None:
                new_hidden = new_hidden.clamp(-self.proj_clip, self.proj_clip)
            # Finished rows keep their state and emit zeros.
            is_active = step_active[t]
            cell = torch.where(is_active, new_cell, cell)
            hidden = torch.where(is_active, new_hidden, hidden)
            outputs.append(torch.where(is_active, new_hidden, torch.zeros_like(new_hidden)))
        if not outputs:
            return inputs.new_zeros(n_dirs, 0, batch_size, self.projection_dim)
        return torch.stack(outputs, dim=1)


def _count_beyond(
    counts: Dict[str, Tensor], key: str, values: Tensor, limit: float, active: Tensor
) -> None:
    """Add the number of active entries of ``values`` with ``|v| > limit`` to ``counts[key]``."""
    beyond = ((values.detach().abs() > limit) & active).sum()
    counts[key] = counts[key] + beyond if key in counts else beyond


class BiProjectionLstm(nn.Module):
    """The stack of :class:`ProjectionLstmLayer` with skip connections after layer 0."""

    def __init__(self, options: ElmoOptions) -> None:
        super().__init__()
        self.options = options
        self.layers = nn.ModuleList(
            ProjectionLstmLayer(
                input_dim=options.projection_dim,
                cell_dim=options.lstm_dim,
                projection_dim=options.projection_dim,
                cell_clip=options.cell_clip,
                proj_clip=options.proj_clip,
            )
            for _ in range(options.n_layers)
        )
        #: Set to a dict to make the next forward passes count clipped values
        #: (keys "cell" and "projection", int tensors). ``None`` = off (fast path).
        self.clip_counts: Optional[Dict[str, Tensor]] = None

    def forward(self, inputs: Tensor, active: Tensor) -> List[Tensor]:
        """Run every layer; inputs (2, T, B, proj), active (T, B) -> list of (2, T, B, proj).

        Entry k is layer k's output after its skip connection (zeros at inactive steps).
        """
        outputs: List[Tensor] = []
        layer_input = inputs
        for index, layer in enumerate(self.layers):
            layer_output = layer(layer_input, active, self.clip_counts)
            if index > 0:
                layer_output = layer_output + layer_input
            outputs.append(layer_output)
            layer_input = layer_output
        return outputs


# --------------------------------------------------------------------------
# The biLM
# --------------------------------------------------------------------------


class ElmoBiLM(nn.Module):
    """The ELMo biLM: char CNN token embeddings, then a bidirectional projection LSTM.

    ``forward(char_ids (B, T, 50), lengths (B,))`` returns ``(n_layers + 1, B, T,
    2 * projection_dim)``: the token layer (embedding concatenated with itself),
    then ``[forward, backward]`` of every LSTM layer. ``<S>`` and ``</S>`` are added
    inside (after each row's own length) and removed from the output; positions
    at or past a row's length are zeros.

    Stateless: every sentence starts from zero LSTM state in both directions, so
    the result for a sentence does not depend on the rest of the batch.
    """

    def __init__(self, options: ElmoOptions) -> None:
        super().__init__()
        self.options = options
        self.char_encoder = ElmoCharEncoder(options)
        self.lstm = BiProjectionLstm(options)
        boundary = np.stack([BOS_CHAR_IDS, EOS_CHAR_IDS])
        self.register_buffer("boundary_char_ids", torch.from_numpy(boundary.copy()), persistent=False)

    # -- small helpers ----------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device of the parameters (where inputs are moved)."""
        return self.char_encoder.char_embedding.weight.device

    @property
    def layer_names(self) -> List[str]:
        """``["token", "lstm_1", ...]``, one name per output layer."""
        return elmo_layer_names(self.options.n_layers)

    @property
    def output_dim(self) -> int:
        """Width of every output layer (``2 * projection_dim``)."""
        return self.options.output_dim

    def token_embeddings(self, char_ids: Tensor) -> Tensor:
        """Context-independent embeddings of words: char ids (N, 50) -> (N, projection_dim)."""
        return self.char_encoder(char_ids.to(self.device))

    def boundary_embeddings(self) -> Tensor:
        """Token embeddings of ``<S>`` and ``</S>``, shape (2, projection_dim)."""
        return self.char_encoder(self.boundary_char_ids)

    def embed_words(self, words: Sequence[str], cache: Optional["WordEmbeddingCache"] = None) -> Tensor:
        """Token embeddings of words (N, projection_dim), via ``cache`` when given."""
        return embed_words(self, words, cache)

    # -- forward ------------------------------------------------------------

    def forward(
        self,
        char_ids: Optional[Tensor],
        lengths: Union[Tensor, Sequence[int]],
        token_embeddings: Optional[Tensor] = None,
    ) -> Tensor:
        """Contextual layers of a padded batch of sentences.

        Args:
            char_ids: (B, T, 50) char ids, boundary tokens NOT included; rows past
                a sentence's length are ignored (zeros by convention). May be None
                when ``token_embeddings`` is given.
            lengths: (B,) number of tokens of each sentence (0 allowed).
            token_embeddings: optional precomputed (B, T, projection_dim) token
                embeddings (e.g. from :func:`embed_words`); then the char CNN is skipped.

        Returns:
            (n_layers + 1, B, T, 2 * projection_dim), zeros at positions >= length.
        """
        if token_embeddings is None:
            if char_ids is None:
                raise ValueError("ElmoBiLM.forward needs char_ids or token_embeddings")
            if char_ids.dim() != 3 or char_ids.shape[-1] != MAX_WORD_LENGTH:
                raise ValueError(
                    f"char_ids must have shape (B, T, {MAX_WORD_LENGTH}), got {tuple(char_ids.shape)}"
                )
            lengths_tensor = self._lengths_tensor(lengths, char_ids.shape)
            token_embeddings = self._embed_padded(char_ids, lengths_tensor)
        return self.forward_from_embeddings(token_embeddings, lengths)

    def _lengths_tensor(self, lengths: Union[Tensor, Sequence[int]], shape: Sequence[int]) -> Tensor:
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.device)
        if lengths.dim() != 1 or lengths.shape[0] != shape[0]:
            raise ValueError(f"lengths must have shape ({shape[0]},), got {tuple(lengths.shape)}")
        return lengths

    def _embed_padded(self, char_ids: Tensor, lengths: Tensor) -> Tensor:
        """Token embeddings (B, T, proj) computed only at positions < length."""
        batch_size, n_tokens, _ = char_ids.shape
        char_ids = char_ids.to(self.device)
        positions = torch.arange(n_tokens, device=self.device)
        in_sentence = positions.unsqueeze(0) < lengths.unsqueeze(1)
        flat_mask = in_sentence.reshape(-1)
        embedded = self.char_encoder(char_ids.reshape(-1, MAX_WORD_LENGTH)[flat_mask])
        output = embedded.new_zeros(batch_size * n_tokens, self.options.projection_dim)
        output = output.masked_scatter(flat_mask.unsqueeze(1), embedded)
        return output.view(batch_size, n_tokens, self.options.projection_dim)

    def forward_from_embeddings(
        self, token_embeddings: Tensor, lengths: Union[Tensor, Sequence[int]]
    ) -> Tensor:
        """Like :meth:`forward`, from precomputed token embeddings (B, T, projection_dim).

        Values of ``token_embeddings`` at positions >= length are ignored.
        """
        if token_embeddings.dim() != 3 or token_embeddings.shape[-1] != self.options.projection_dim:
            raise ValueError(
                f"token_embeddings must have shape (B, T, {self.options.projection_dim}), "
                f"got {tuple(token_embeddings.shape)}"
            )
        device = self.device
        token_embeddings = token_embeddings.to(device)
        real_batch_size, n_tokens, proj_dim = token_embeddings.shape
        lengths = self._lengths_tensor(lengths, token_embeddings.shape)
        n_layers_out = self.options.n_output_layers
        if real_batch_size == 0 or n_tokens == 0:
            if real_batch_size and bool((lengths != 0).any()):
                raise ValueError("lengths exceed the number of token positions (0)")
            return token_embeddings.new_zeros(n_layers_out, real_batch_size, n_tokens, 2 * proj_dim)
        # One host sync: the loop only needs to run as long as the longest sentence.
        min_length, max_length = (int(v) for v in torch.stack(torch.aminmax(lengths)).tolist())
        if min_length < 0 or max_length > n_tokens:
            raise ValueError(f"lengths must be in [0, {n_tokens}], got [{min_length}, {max_length}]")
        # Extra empty rows so that every matmul has a stable row count (see ROW_MULTIPLE).
        batch_size = _padded_size(real_batch_size)
        n_extra_rows = batch_size - real_batch_size
        token_embeddings = F.pad(token_embeddings[:, :max_length], (0, 0, 0, 0, 0, n_extra_rows))
        lengths = F.pad(lengths, (0, n_extra_rows))

        # Sentences framed by <S> ... </S>; position p of row b is valid if p < length+2.
        n_steps = max_length + 2
        framed_lengths = lengths + 2
        steps = torch.arange(n_steps, device=device)
        valid = steps.unsqueeze(0) < framed_lengths.unsqueeze(1)  # (B, n_steps)

        bos, eos = self.boundary_embeddings().unbind(0)
        shifted = F.pad(token_embeddings, (0, 0, 1, 1))  # (B, n_steps, proj)
        is_token = (steps.unsqueeze(0) >= 1) & (steps.unsqueeze(0) <= lengths.unsqueeze(1))
        is_eos = steps.unsqueeze(0) == (lengths + 1).unsqueeze(1)
        framed = torch.where(is_token.unsqueeze(-1), shifted, torch.zeros_like(shifted))
        framed = torch.where(is_eos.unsqueeze(-1), eos.expand_as(framed), framed)
        framed = torch.where((steps == 0).view(1, -1, 1), bos.expand_as(framed), framed)

        # The backward direction reads each row reversed within its own length, so
        # its padding stays at the end and it never reads padding either.
        reversed_steps = framed_lengths.unsqueeze(1) - 1 - steps.unsqueeze(0)
        reverse_index = torch.where(valid, reversed_steps, steps.unsqueeze(0))
        gather_index = reverse_index.unsqueeze(-1).expand(-1, -1, proj_dim)
        backward_input = framed.gather(1, gather_index)

        lstm_input = torch.stack([framed, backward_input], dim=0).transpose(1, 2)  # (2, T, B, proj)
        layer_outputs = self.lstm(lstm_input, valid.transpose(0, 1))

        # Outputs: drop <S> / </S> and zero everything past each row's length.
        token_mask = (steps[:max_length].unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
        token_layer = torch.where(token_mask, token_embeddings, torch.zeros_like(token_embeddings))
        layers = [torch.cat([token_layer, token_layer], dim=-1)]
        for output in layer_outputs:
            forward_out = output[0].transpose(0, 1)  # (B, n_steps, proj)
            backward_out = output[1].transpose(0, 1).gather(1, gather_index)
            both = torch.cat([forward_out, backward_out], dim=-1)[:, 1 : max_length + 1]
            layers.append(torch.where(token_mask, both, torch.zeros_like(both)))
        stacked = torch.stack(layers, dim=0)[:, :real_batch_size]
        if max_length < n_tokens:
            stacked = F.pad(stacked, (0, 0, 0, n_tokens - max_length))
        return stacked

    def encode_words(
        self, sentences: Sequence[Sequence[str]], cache: Optional["WordEmbeddingCache"] = None
    ) -> Tuple[Tensor, Tensor]:
        """Convenience: run a batch of tokenised sentences.

        Returns ``(layers, lengths)`` with layers (n_layers + 1, B, T, 2 * proj) where
        T is the longest sentence. Token embeddings go through ``cache`` when given.
        """
        lengths = torch.tensor([len(s) for s in sentences], dtype=torch.long)
        n_tokens = int(lengths.max()) if len(sentences) else 0
        all_words = [word for sentence in sentences for word in sentence]
        flat = embed_words(self, all_words, cache)
        padded = flat.new_zeros(len(sentences), n_tokens, self.options.projection_dim)
        if all_words:
            mask = torch.arange(n_tokens).unsqueeze(0) < lengths.unsqueeze(1)
            padded = padded.masked_scatter(mask.to(flat.device).unsqueeze(-1), flat)
        return self.forward_from_embeddings(padded, lengths), lengths


# --------------------------------------------------------------------------
# Word embedding cache
# --------------------------------------------------------------------------


class WordEmbeddingCache:
    """Bounded LRU cache from word string to its ELMo token embedding row.

    The token embedding is context-independent, so it can be reused across
    sentences and batches. Rows are stored detached, on the device they were
    computed on. The cache belongs to one model with frozen weights: call
    :meth:`clear` after changing or reloading the weights, and do not use it when
    training the char CNN (cached rows carry no gradient).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._rows: "OrderedDict[str, Tensor]" = OrderedDict()
        #: Lookups that found the word / did not.
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, word: object) -> bool:
        return word in self._rows

    def get(self, word: str) -> Optional[Tensor]:
        """The cached row of ``word`` (marked most recently used), or None; counts hit/miss."""
        row = self._rows.get(word)
        if row is None:
            self.misses += 1
            return None
        self._rows.move_to_end(word)
        self.hits += 1
        return row

    def put(self, word: str, row: Tensor) -> None:
        """Store ``row`` (projection_dim,) for ``word``, evicting least recently used entries."""
        if self.max_entries == 0:
            return
        self._rows[word] = row.detach()
        self._rows.move_to_end(word)
        while len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        self._rows.clear()
        self.hits = 0
        self.misses = 0

    @property
    def stats(self) -> Dict[str, int]:
        """``{"hits", "misses", "size", "max_entries"}``."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "size": len(self),
            "max_entries": self.max_entries,
        }


def embed_words(
    model: ElmoBiLM, words: Sequence[str], cache: Optional[WordEmbeddingCache] = None
) -> Tensor:
    """Token embeddings (len(words), projection_dim) of ``words`` on the model's device.

    The char CNN runs once per distinct word, and only on words ``cache`` does not
    hold (each distinct word counts one hit or miss per call). Without a cache the
    result keeps its autograd graph; cached rows are detached.
    """
    device = model.device
    proj_dim = model.options.projection_dim
    if not words:
        return torch.zeros(0, proj_dim, device=device)
    position_of: Dict[str, int] = {}
    occurrence = [position_of.setdefault(word, len(position_of)) for word in words]
    distinct = list(position_of)
    rows: List[Optional[Tensor]] = [None] * len(distinct)
    missing: List[int] = []
    for index, word in enumerate(distinct):
        cached = cache.get(word) if cache is not None else None
        if cached is None:
            missing.append(index)
        else:
            rows[index] = cached.to(device)
    if missing:
        char_ids = torch.from_numpy(elmo_char_ids([distinct[i] for i in missing])).to(device)
        computed = model.token_embeddings(char_ids)
        if cache is None:  # everything was computed, in order of first occurrence
            return computed[torch.as_tensor(occurrence, device=device)]
        for index, row in zip(missing, computed.unbind(0)):
            rows[index] = row
            if cache is not None:
                # clone: a view would keep the whole batch tensor alive in the cache.
                cache.put(distinct[index], row.detach().clone())
    table = torch.stack(rows)  # type: ignore[arg-type]
    return table[torch.as_tensor(occurrence, device=device)]
