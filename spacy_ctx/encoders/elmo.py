"""ELMo bidirectional language model (biLM) in plain PyTorch.

The maths follows the original TensorFlow biLM (bilm-tf), whose published weights
AllenNLP also reads:

* every token is a row of 50 byte-level char ids, embedded, run through one 1-d
  convolution per filter width, max-pooled over positions, passed through highway
  layers and projected: the *token embedding* (:class:`ElmoCharEncoder`);
* a forward and a backward stack of LSTM cells with a projection ("LSTMP") read
  the token embeddings of a sequence; every layer but the first adds its input to
  its output (skip connection) (:class:`BiProjectionLstm`);
* the output has one entry per layer: ``[token, lstm_1, lstm_2, ...]``, the token
  layer being the token embedding concatenated with itself so that every layer has
  the width ``2 * projection_dim``.

:class:`ElmoBiLM` is a plain biLM over the sequences it is given. ELMo was trained
on sentences framed by ``<S>`` ... ``</S>``; adding those boundary tokens (and
dropping their output rows) is the caller's job, as adding ``[CLS]``/``[SEP]`` is
for BERT: :mod:`spacy_ctx.backends.elmo` does it with the char ids of
:mod:`spacy_ctx.pieces.chars`. This module takes tensors only and imports neither
``pieces/`` nor spaCy nor Thinc.

Unlike AllenNLP's ``_ElmoBiLm``, :class:`ElmoBiLM` is stateless: every sequence
starts from a zero LSTM state, so it gets the same vectors whatever else is in the
batch and whatever ran before.

The options and their checks live in :mod:`spacy_ctx.encoders.elmo_options`;
weights are loaded by :mod:`spacy_ctx.encoders.elmo_checkpoint`.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .elmo_options import CHARS_PER_TOKEN, N_CHAR_EMBEDDING_ROWS, ElmoOptions, elmo_layer_names

__all__ = [
    "ElmoOptions",
    "ElmoCharEncoder",
    "Highway",
    "ProjectionLstmLayer",
    "BiProjectionLstm",
    "ElmoBiLM",
    "elmo_layer_names",
    "ROW_MULTIPLE",
    "INPUT_GATE_BUDGET",
    "CHAR_CNN_BUDGET",
]

#: Every matmul gets a row count that is a multiple of this. BLAS libraries pick
#: different kernels (with different summation orders) for small or odd row
#: counts, which would make a sequence's vectors depend, in the last bits, on
#: how many other sequences share its batch. With the rows padded, a row's
#: result is bitwise independent of the other rows (checked with MKL on CPU,
#: 1-16 threads); on GPUs the agreement is only to float32 rounding.
#:
#: Only the matmul operands are padded, never the tensors that span a whole
#: sequence: the char CNN runs on chunks of a multiple of 16 words; the LSTM's
#: per-step state has the batch's rows padded to a multiple of 16 (small: one
#: step); its input gates are computed for blocks of a multiple of 16 time steps
#: times the real rows (so the row count is a multiple of 16 whatever the batch
#: size). The cost is compute on at most 15 padded time steps per block, not
#: memory: one long sequence alone in its batch is not stored 16 times.
ROW_MULTIPLE = 16

#: Most float elements of LSTM input gates precomputed at once (1 Mi floats, 4 MiB
#: in float32; see :meth:`ProjectionLstmLayer.forward`). The input part of every
#: gate is computed in blocks of time steps, so memory is bounded by this budget
#: (or one block of ROW_MULTIPLE steps, if larger), not by the sequence length.
#: Larger budgets did not run normal batches faster (the per-step loop dominates).
INPUT_GATE_BUDGET = 1 << 20

#: The same bound for the inference loop (:meth:`ProjectionLstmLayer._forward_prefix`),
#: per direction: 4 Mi floats (16 MiB in float32), or one time step if that is larger.
#: Its blocks hold only the rows that are active in the block, not padded steps.
INFERENCE_GATE_BUDGET = 1 << 22

#: Smallest LSTM cell dim whose inference loop runs direction by direction with
#: oneDNN matmuls (see :meth:`ProjectionLstmLayer._per_direction`); smaller layers
#: (test fixtures) run both directions in one batched op, as their time goes to
#: per-op overhead. The published models have 1,024 to 4,096.
ONEDNN_MIN_CELL_DIM = 256

#: Most float elements of char CNN activations computed at once; words are run
#: through the CNN in chunks that fit it (:meth:`ElmoCharEncoder.forward`).
CHAR_CNN_BUDGET = 1 << 22

#: Elements of per-step LSTM cell state (padded rows x cell_dim) per intra-op
#: thread in the inference loop (see :class:`_step_threads`).
STEP_ELEMENTS_PER_THREAD = 1 << 20

#: Extra floats after each row of the inference loop's per-row state buffers, which
#: are used through ``[:, :cell_dim]`` views. torch's CPU kernels run a contiguous
#: tensor as one flat loop, vectorised except for a tail that uses scalar code, and
#: scalar and vector ``sigmoid`` differ in the last bits: in a flat loop over rows
#: whose width is not a multiple of the vector length, a row's values would depend
#: on its position, i.e. on the batch. With a gap between rows every row is its own
#: loop, split the same way. (The published models' widths are multiples of 32, so
#: there it changes nothing; tiny test models need it.)
ROW_GAP = 16

#: The padding *char* id (after the +1 shift of ``spacy_ctx.pieces.chars``, which
#: this module may not import): what follows a word's end-of-word marker.
PADDING_CHAR_ID = 261

#: Granularity of the char CNN's trimmed widths (:meth:`ElmoCharEncoder._forward_trimmed`):
#: words are grouped by their length rounded up to this.
TRIM_STEP = 4

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


def _has_onednn_linear() -> bool:
    """Whether this torch build has oneDNN's fused linear op (x86 and arm builds do)."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(
            torch.ops.mkldnn, "_linear_pointwise"
        )
    except (AttributeError, RuntimeError):
        return False


#: Use oneDNN for float32 matmuls of the inference paths on CPU. On the AVX-512
#: machine we measured (torch 2.13, MKL 2024.2, one thread) oneDNN ran the LSTM's
#: matmuls at 2-2.5x MKL's speed (e.g. 144 x 128 @ 128 x 4096: ~1.4 ms with MKL's
#: sgemm, ~0.6 ms with oneDNN), and a row's result does not depend on how many rows
#: share the matmul (checked for row counts that are multiples of ROW_MULTIPLE,
#: 1 and 2 threads), which batch independence needs. Set to False to use
#: ``F.linear`` (MKL) everywhere; the autograd paths always use it.
USE_ONEDNN_LINEAR = _has_onednn_linear()


def _prepacked(weight: Tensor, rows_hint: int) -> Tensor:
    """``weight`` (out, in) reordered once into oneDNN's blocked layout for
    :func:`fast_linear` (saves the reorder on every call: ~8% of the LSTM loop), or
    ``weight`` itself where oneDNN is not used or cannot do it. ``rows_hint`` is the
    typical row count; any row count works with the result."""
    if not USE_ONEDNN_LINEAR or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return weight
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
    except (AttributeError, RuntimeError):  # a build without the op: unpacked works too
        return weight


def fast_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for inference; oneDNN on CPU in float32 (see
    ``USE_ONEDNN_LINEAR``). ``x`` is (N, in), ``weight`` (out, in) contiguous or
    from :func:`_prepacked`."""
    if weight.is_mkldnn or (
        USE_ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def padded_size(n_rows: int) -> int:
    """Smallest multiple of ``ROW_MULTIPLE`` that is >= ``n_rows`` (at least one block)."""
    return max(1, -(-n_rows // ROW_MULTIPLE)) * ROW_MULTIPLE


def _rows_within(budget: int, elements_per_row: int) -> int:
    """Rows (a multiple of ROW_MULTIPLE, at least one block) whose elements fit ``budget``."""
    return max(ROW_MULTIPLE, budget // max(1, elements_per_row) // ROW_MULTIPLE * ROW_MULTIPLE)


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
        transform, carry = fast_linear(x, self.linear.weight, self.linear.bias).chunk(2, dim=-1)
        gate = torch.sigmoid(carry)
        return gate * torch.relu(transform) + (1.0 - gate) * x


class ElmoCharEncoder(nn.Module):
    """Context-independent token embeddings from ELMo char ids.

    Input: char ids (N, 50), as made by ``spacy_ctx.pieces.chars.elmo_char_ids``.
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
        """Map char ids (N, 50) to token embeddings (N, projection_dim).

        Words run in chunks whose activations fit ``CHAR_CNN_BUDGET``; chunks are
        multiples of ``ROW_MULTIPLE`` words, so the result does not depend on them.
        """
        n_words = char_ids.shape[0]
        if not torch.is_grad_enabled() and n_words:
            return self._forward_trimmed(char_ids)
        per_word = (self.options.char_embedding_dim + self.options.n_filters_total) * CHARS_PER_TOKEN
        chunk = _rows_within(CHAR_CNN_BUDGET, per_word)
        if n_words <= chunk:
            return self._embed_chunk(char_ids)
        return torch.cat(
            [self._embed_chunk(char_ids[start : start + chunk]) for start in range(0, n_words, chunk)]
        )

    def _forward_trimmed(self, char_ids: Tensor) -> Tensor:
        """Inference-only :meth:`forward` that convolves only the char positions that matter.

        A word of ``n`` ids before its padding chars is followed by identical
        padding windows, whose conv value is the same constant for every word: the
        max over positions only needs the windows that touch the word and one
        all-padding window, i.e. the first ``n + widest filter`` positions. Words
        are grouped by ``n`` rounded up to ``TRIM_STEP``, so a word's positions
        (and its result) depend on its own length only, never on the other words.
        Most words are short, so most convolutions run on ~1/3 of the 50 positions.
        """
        n_words = char_ids.shape[0]
        widest = max(width for width, _ in self.options.filters)
        positions = torch.arange(1, CHARS_PER_TOKEN + 1, device=char_ids.device)
        # Index + 1 of the last non-padding id of each word (padding tokens: 50).
        n_ids = torch.where(char_ids != PADDING_CHAR_ID, positions, 0).amax(dim=1)
        trimmed = torch.clamp(-(-n_ids // TRIM_STEP) * TRIM_STEP + widest, max=CHARS_PER_TOKEN)
        # Lengths whose windows would not all fit keep the full 50 positions.
        trimmed = torch.where(n_ids + widest > CHARS_PER_TOKEN, CHARS_PER_TOKEN, trimmed)
        lengths, counts = torch.unique(trimmed, return_counts=True)
        if len(lengths) == 1 and int(lengths[0]) == CHARS_PER_TOKEN:
            return self._chunks(char_ids)
        output: Optional[Tensor] = None
        for length in lengths.tolist():
            rows = torch.nonzero(trimmed == length).squeeze(1)
            embedded = self._chunks(char_ids[rows, :length])
            if output is None:
                output = embedded.new_empty(n_words, embedded.shape[1])
            output[rows] = embedded
        assert output is not None
        return output

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())  # a copy: never touch the live module
        state.pop("_window_cache", None)  # derived weights, rebuilt when needed
        return state

    def _window_weights(self) -> Tuple[Tensor, Tensor]:
        """All filters as one ``(n_filters_total, char_dim * widest)`` matrix (narrower
        filters padded with zero taps on the right) and their biases; cached while the
        convolutions' parameters are unchanged."""
        params = [p for conv in self.convolutions for p in (conv.weight, conv.bias)]
        key = (USE_ONEDNN_LINEAR, *((p.data_ptr(), p._version, p.device, p.dtype) for p in params))
        cached = getattr(self, "_window_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        widest = max(width for width, _ in self.options.filters)
        with torch.no_grad():
            weight = torch.cat(
                [F.pad(conv.weight, (0, widest - conv.weight.shape[2])) for conv in self.convolutions]
            ).reshape(self.options.n_filters_total, -1)
            bias = torch.cat([conv.bias for conv in self.convolutions])
        weights = (_prepacked(weight.contiguous(), 1024), bias)
        self._window_cache = (key, weights)
        return weights

    def _pooled_windows(self, char_ids: Tensor) -> Tensor:
        """Inference-only: the max-pooled, activated filter outputs of trimmed words
        (N, width < 50) as one matmul over all windows of the widest filter.

        A trimmed word's positions from its length on are padding chars, so a
        narrower filter's windows that do not fit in a widest window are all-padding
        windows, whose value the last widest window (all padding under the narrower
        filter's taps) already gives: the max over positions is the same as the
        convolutions'. One matmul (oneDNN on CPU) instead of one convolution per
        filter width, and the max runs over a contiguous filter axis.
        """
        weight, bias = self._window_weights()
        n_words, width = char_ids.shape
        widest = max(w for w, _ in self.options.filters)
        n_windows = width - widest + 1
        embedded = self.char_embedding(char_ids)  # (N, width, char_dim)
        # (N, windows, char_dim, widest) -> one row per window, laid out like the weight.
        windows = embedded.unfold(1, widest, 1).reshape(n_words * n_windows, -1)
        filtered = fast_linear(windows, weight, bias).view(n_words, n_windows, -1)
        return self.activation(filtered.amax(dim=1))

    def _chunks(self, char_ids: Tensor) -> Tensor:
        """:meth:`_embed_chunk` over chunks of words whose activations fit ``CHAR_CNN_BUDGET``."""
        per_word = (self.options.char_embedding_dim + self.options.n_filters_total) * char_ids.shape[1]
        chunk = _rows_within(CHAR_CNN_BUDGET, per_word)
        if char_ids.shape[0] <= chunk:
            return self._embed_chunk(char_ids)
        return torch.cat(
            [
                self._embed_chunk(char_ids[start : start + chunk])
                for start in range(0, char_ids.shape[0], chunk)
            ]
        )

    def _embed_chunk(self, char_ids: Tensor) -> Tensor:
        n_words, width = char_ids.shape
        # Padding rows make a word's embedding independent of N (see ROW_MULTIPLE).
        char_ids = F.pad(char_ids, (0, 0, 0, padded_size(n_words) - n_words))
        if width < CHARS_PER_TOKEN and not torch.is_grad_enabled():
            hidden = self._pooled_windows(char_ids)
        else:
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
            hidden = fast_linear(hidden, self.projection.weight, self.projection.bias)
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

    def block_steps(self, batch_size: int) -> int:
        """Time steps whose input gates are computed at once (a multiple of ROW_MULTIPLE)."""
        return _rows_within(INPUT_GATE_BUDGET, 2 * batch_size * 4 * self.cell_dim)

    def input_gates(self, block: Tensor) -> Tensor:
        """Input part of every gate, bias included: (2, k, B, input_dim) -> (2, k, B, 4*cell_dim).

        ``k * B`` rows go through one matmul per direction; callers keep ``k`` a
        multiple of ROW_MULTIPLE, so the row count is one too.
        """
        n_dirs, n_steps, batch_size, _ = block.shape
        flat = block.reshape(n_dirs, n_steps * batch_size, self.input_dim)
        bias = (self.bias + self.forget_bias_offset).unsqueeze(1)
        return torch.baddbmm(bias, flat, self.input_weight).view(n_dirs, n_steps, batch_size, -1)

    def forward(self, inputs: Tensor, active: Tensor) -> Tensor:
        """Run both directions over time.

        Args:
            inputs: (2, T, B, input_dim), direction-major then time; direction 1
                already holds each row's sequence reversed within its own length.
            active: (T, B) bool, True where a row still has a token at step t.

        Returns:
            (2, T, B, projection_dim): the (clipped) projected outputs, zeros where
            ``active`` is False. A row keeps its state through inactive steps.

        Memory is bounded by the real rows and a time-step budget: the input gates
        are computed in blocks of :meth:`block_steps` steps (``INPUT_GATE_BUDGET``),
        and only the small per-step state is padded to ``ROW_MULTIPLE`` rows (for
        the matmul kernels, see ``ROW_MULTIPLE``). So one 50,000-token sequence
        costs about its own size, not 16 padded rows of it.
        """
        n_dirs, n_steps, batch_size, _ = inputs.shape
        if not torch.is_grad_enabled() and n_steps and batch_size:
            n_active = _prefix_counts(active)
            if n_active is not None:
                with _step_threads(padded_size(batch_size) * self.cell_dim):
                    return self._forward_prefix(inputs, n_active)
        n_rows = padded_size(batch_size)  # rows of the per-step state and matmuls
        n_extra = n_rows - batch_size
        cell = inputs.new_zeros(n_dirs, n_rows, self.cell_dim)
        hidden = inputs.new_zeros(n_dirs, n_rows, self.projection_dim)
        # Padding rows are never active: their state stays zero and is never read.
        active = F.pad(active, (0, n_extra)).view(n_steps, 1, n_rows, 1)
        blocks: List[Tensor] = []
        block_steps = self.block_steps(batch_size)
        for block_start in range(0, n_steps, block_steps):
            block = inputs[:, block_start : block_start + block_steps]
            n_block = block.shape[1]
            # A multiple of ROW_MULTIPLE steps, so the matmul's row count is one too.
            block = F.pad(block, (0, 0, 0, 0, 0, padded_size(n_block) - n_block))
            block_gates = self.input_gates(block)
            outputs: List[Tensor] = []
            for offset in range(n_block):
                step_gates = block_gates[:, offset]
                if n_extra:
                    step_gates = F.pad(step_gates, (0, 0, 0, n_extra))
                gates = torch.baddbmm(step_gates, hidden, self.recurrent_weight)
                in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)
                new_cell = (
                    torch.sigmoid(in_gate) * torch.tanh(candidate) + torch.sigmoid(forget_gate) * cell
                )
                if self.cell_clip is not None:
                    new_cell = new_cell.clamp(-self.cell_clip, self.cell_clip)
                cell_output = torch.sigmoid(out_gate) * torch.tanh(new_cell)
                new_hidden = torch.bmm(cell_output, self.projection_weight)
                if self.proj_clip is not None:
                    new_hidden = new_hidden.clamp(-self.proj_clip, self.proj_clip)
                # Finished rows keep their state and emit zeros.
                is_active = active[block_start + offset]
                cell = torch.where(is_active, new_cell, cell)
                hidden = torch.where(is_active, new_hidden, hidden)
                # Only the real rows are kept: a new (2, B, proj) tensor, not a view
                # that would keep the padded step alive.
                outputs.append(
                    torch.where(is_active[:, :batch_size], new_hidden[:, :batch_size], 0.0)
                )
            # One tensor per block: a list of small per-step tensors costs far more
            # than their data (each tensor has its own allocation and header).
            blocks.append(torch.stack(outputs, dim=1))
            del block_gates, outputs
        if not blocks:
            return inputs.new_zeros(n_dirs, 0, batch_size, self.projection_dim)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


    def __getstate__(self) -> dict:
        # The inference weights are derived (and may be oneDNN tensors that cannot be
        # copied or pickled): copies and pickles rebuild them when needed.
        state = dict(super().__getstate__())  # a copy: never touch the live module
        state.pop("_inference_cache", None)
        return state

    def _per_direction(self, inputs: Tensor) -> bool:
        """Whether the inference loop runs each direction alone with oneDNN matmuls
        (large layers on CPU in float32), rather than both directions at once with
        batched matmuls (small layers, whose steps cost per op, not per FLOP; GPUs)."""
        return (
            USE_ONEDNN_LINEAR
            and inputs.device.type == "cpu"
            and inputs.dtype == torch.float32
            and self.cell_dim >= ONEDNN_MIN_CELL_DIM
        )

    def _inference_weights(self, per_direction: bool) -> "_InferenceWeights":
        """The weights in the layout of the inference loop, cached while the parameters
        are unchanged (same storage, same in-place version counter).

        The input and recurrent weights have the cell candidate's part doubled (so
        that one sigmoid over all gates also gives ``tanh(x) = 2 sigmoid(2x) - 1`` of
        the candidate: doubling is exact in floating point), the bias has the forget
        offset added (candidate part doubled too). ``per_direction``: one
        ``(out, in)`` matrix per direction for :func:`fast_linear`, prepacked for
        oneDNN; else ``(2, in, out)`` stacks for batched matmuls.
        """
        params = (self.input_weight, self.recurrent_weight, self.bias, self.projection_weight)
        key = (
            per_direction,
            USE_ONEDNN_LINEAR,
            *((p.data_ptr(), p._version, p.device, p.dtype) for p in params),
        )
        cached = getattr(self, "_inference_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            scale = torch.ones(4 * self.cell_dim, dtype=self.bias.dtype, device=self.bias.device)
            scale[2 * self.cell_dim : 3 * self.cell_dim] = 2.0
            bias = (self.bias + self.forget_bias_offset) * scale
            input_weight = self.input_weight * scale
            recurrent_weight = self.recurrent_weight * scale
            if per_direction:
                weights = _InferenceWeights(
                    input_weight=[_prepacked(w.t().contiguous(), 1024) for w in input_weight],
                    input_bias=[b.contiguous() for b in bias],
                    recurrent_weight=[_prepacked(w.t().contiguous(), 128) for w in recurrent_weight],
                    projection_weight=[
                        _prepacked(w.t().contiguous(), 128) for w in self.projection_weight
                    ],
                )
            else:
                weights = _InferenceWeights(
                    input_weight=[input_weight],
                    input_bias=[bias.unsqueeze(1)],
                    recurrent_weight=[recurrent_weight],
                    projection_weight=[self.projection_weight.detach()],
                )
        # A plain attribute, not a buffer: never saved, rebuilt after any weight change.
        self._inference_cache = (key, weights)
        return weights

    def _forward_prefix(self, inputs: Tensor, n_active: List[int]) -> Tensor:
        """Inference-only :meth:`forward` when the active rows of every step are a prefix.

        Rows sorted by length, longest first (as the backend's batches are), make
        ``active[t]`` the first ``n_active[t]`` rows, non-increasing in ``t``. Then:

        * the input part of the gates is computed for blocks of steps in one matmul
          over the rows that are active at the block's first step only (no padded
          time steps), the block's row count padded to ``ROW_MULTIPLE``, within
          ``INFERENCE_GATE_BUDGET``;
        * a step computes only its active rows (padded to ``ROW_MULTIPLE`` for the
          matmul kernels); a finished row's state is never read again;
        * one in-place sigmoid covers all four gates: the candidate's
          pre-activation is doubled in the weights, and ``tanh(x) = 2 sigmoid(2x) - 1``
          (this torch build's CPU ``tanh`` was ~10x slower than ``sigmoid``), for the
          cell output too; the gate arithmetic runs in place;
        * large layers on CPU (:meth:`_per_direction`) run each direction's loop
          alone with oneDNN matmuls (:func:`fast_linear`); others run both
          directions at once with batched matmuls (half the ops per step).

        Same maths as :meth:`forward` up to float32 rounding (the sigmoid form of
        tanh differs from ``tanh`` by < 2e-7); a row's result is independent of the
        other rows (every matmul has a padded row count, every elementwise op works
        on whole rows, see ``ROW_GAP``).
        """
        n_dirs, n_steps, batch_size, input_dim = inputs.shape
        per_direction = self._per_direction(inputs)
        weights = self._inference_weights(per_direction)
        groups = [slice(d, d + 1) for d in range(n_dirs)] if per_direction else [slice(0, n_dirs)]
        cell_dim = self.cell_dim
        n_rows = padded_size(batch_size)
        output = inputs.new_zeros(n_dirs, n_steps, batch_size, self.projection_dim)
        # Steps that have rows at all (counts are non-increasing).
        n_run = next((t for t, n in enumerate(n_active) if n == 0), n_steps)
        blocks = _gate_blocks(n_active[:n_run], INFERENCE_GATE_BUDGET // (4 * cell_dim))
        for index, dirs in enumerate(groups):
            w_in, b_in, w_rec, w_proj = (
                weights.input_weight[index],
                weights.input_bias[index],
                weights.recurrent_weight[index],
                weights.projection_weight[index],
            )
            n_group = len(range(*dirs.indices(n_dirs)))
            # Row-strided views (see ROW_GAP): the cell state and a scratch buffer.
            cell = inputs.new_zeros(n_group, n_rows, cell_dim + ROW_GAP)[..., :cell_dim]
            scratch = inputs.new_zeros(n_group, n_rows, cell_dim + ROW_GAP)[..., :cell_dim]
            # Contiguous rows, so the projection reads its first m rows without a copy;
            # rows past the active ones hold finite leftovers that are never used.
            cell_output = inputs.new_zeros(n_group, n_rows, cell_dim)
            hidden = inputs.new_zeros(n_group, n_rows, self.projection_dim)
            for block_start, block_end in blocks:
                block_rows = n_active[block_start]
                block = inputs[dirs, block_start:block_end, :block_rows].reshape(n_group, -1, input_dim)
                n_block = block.shape[1]
                block = F.pad(block, (0, 0, 0, padded_size(n_block) - n_block))
                block_gates = _group_linear(block, w_in, b_in)  # (group, steps x rows, 4 * cell)
                for step in range(block_start, block_end):
                    n = n_active[step]
                    m = padded_size(n)
                    offset = (step - block_start) * block_rows
                    # (group, m, 4*cell): recurrent part for the padded rows; rows >= n are ignored.
                    gates = _group_linear(hidden[:, :m], w_rec)
                    real = gates[:, :n]
                    real.add_(block_gates[:, offset : offset + n])
                    # Two row-strided halves, not one contiguous block (see ROW_GAP).
                    real[..., : 2 * cell_dim].sigmoid_()
                    real[..., 2 * cell_dim :].sigmoid_()
                    in_gate, forget_gate, candidate, out_gate = real.split(cell_dim, dim=-1)
                    candidate.mul_(2.0).sub_(1.0)  # = tanh of the candidate's pre-activation
                    state = cell[:, :n]
                    state.mul_(forget_gate).addcmul_(in_gate, candidate)
                    if self.cell_clip is not None:
                        state.clamp_(-self.cell_clip, self.cell_clip)
                    # cell output = out_gate * tanh(state) = out_gate * (2 sigmoid(2 state) - 1)
                    squashed = torch.mul(state, 2.0, out=scratch[:, :n]).sigmoid_().mul_(2.0).sub_(1.0)
                    torch.mul(squashed, out_gate, out=cell_output[:, :n])
                    hidden = _group_linear(cell_output[:, :m], w_proj)
                    real_hidden = hidden[:, :n]
                    if self.proj_clip is not None:
                        real_hidden.clamp_(-self.proj_clip, self.proj_clip)
                    output[dirs, step, :n] = real_hidden
                del block_gates
        return output


class _InferenceWeights(NamedTuple):
    """Weights of :meth:`ProjectionLstmLayer._forward_prefix`, one entry per direction
    group (see :meth:`ProjectionLstmLayer._inference_weights`)."""

    input_weight: List[Tensor]  # candidate part doubled
    input_bias: List[Tensor]  # forget offset added, candidate part doubled
    recurrent_weight: List[Tensor]  # candidate part doubled
    projection_weight: List[Tensor]


def _group_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x`` (group, rows, in) times one direction group's weight: an ``(out, in)``
    matrix for :func:`fast_linear` (a group of one direction) or a ``(group, in, out)``
    stack for a batched matmul (``bias`` then ``(group, 1, out)``)."""
    if weight.is_mkldnn or (weight.dim() == 2 and x.shape[0] == 1):
        return fast_linear(x[0], weight, bias).unsqueeze(0)
    if bias is None:
        return torch.bmm(x, weight)
    return torch.baddbmm(bias, x, weight)


def _gate_blocks(n_active: Sequence[int], max_rows: int) -> List[Tuple[int, int]]:
    """Split steps into ``(start, end)`` blocks for the input-gate matmul.

    A block's matmul has ``(end - start) * n_active[start]`` rows (the rows active
    at its first step; counts are non-increasing): at most ``max_rows``, or one step
    if that step alone has more rows.
    """
    blocks: List[Tuple[int, int]] = []
    start = 0
    while start < len(n_active):
        steps = max(1, max_rows // max(1, n_active[start]))
        end = min(len(n_active), start + steps)
        blocks.append((start, end))
        start = end
    return blocks


def _prefix_counts(active: Tensor) -> Optional[List[int]]:
    """Active rows per step if, at every step, they are the first ones (non-increasing
    counts: rows sorted by length, longest first); else None."""
    counts = active.sum(dim=1)
    rows = torch.arange(active.shape[1], device=active.device)
    is_prefix = bool(torch.equal(active, rows.unsqueeze(0) < counts.unsqueeze(1)))
    if not is_prefix or bool((counts[1:] > counts[:-1]).any()):
        return None
    return counts.tolist()


class _step_threads:
    """Run the per-step LSTM loop with at most as many intra-op threads as its matmuls
    can use; restore the caller's count afterwards.

    Each step's ops are small and many (a few MFLOP, tens of microseconds), so
    extra threads mostly wait at barriers, and on a loaded machine a descheduled
    thread stalls every step: on a busy 2-core machine 50,000 tokens took 91 s with
    2 threads vs 0.42 s with 1, and our benchmark (``benchmarks/elmo_speed.py``)
    measured the loop 3.9x slower with 2 threads than with 1. So a thread is added
    only per ``STEP_ELEMENTS_PER_THREAD`` elements of per-step cell state (padded
    rows x cell_dim): one thread for any batch of fewer than 1,024 rows of the
    published models. The big matmuls outside the loop (char CNN, input gates)
    keep the caller's count.
    """

    def __init__(self, step_elements: int) -> None:
        self.wanted = max(1, step_elements // STEP_ELEMENTS_PER_THREAD)

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        if self.wanted < self.saved:
            torch.set_num_threads(self.wanted)

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self.saved:
            torch.set_num_threads(self.saved)


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

    def forward(self, inputs: Tensor, active: Tensor) -> List[Tensor]:
        """Run every layer; inputs (2, T, B, proj), active (T, B) -> list of (2, T, B, proj).

        Entry k is layer k's output after its skip connection (zeros at inactive steps).
        """
        outputs: List[Tensor] = []
        layer_input = inputs
        for index, layer in enumerate(self.layers):
            layer_output = layer(layer_input, active)
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
    then ``[forward, backward]`` of every LSTM layer, at every position of each
    sequence; positions at or past a row's length are zeros. The sequences are
    taken as given: frame them with ``<S>`` ... ``</S>`` as ELMo was trained
    (``spacy_ctx.backends.elmo`` does) and drop those rows from the output.

    Stateless: every sequence starts from zero LSTM state in both directions, so
    the result for a sequence does not depend on the rest of the batch.
    """

    def __init__(self, options: ElmoOptions) -> None:
        super().__init__()
        self.options = options
        self.char_encoder = ElmoCharEncoder(options)
        self.lstm = BiProjectionLstm(options)

    @property
    def device(self) -> torch.device:
        """The device of the parameters (where inputs are moved)."""
        return self.char_encoder.char_embedding.weight.device

    def drop_derived_weights(self) -> None:
        """Forget the cached inference weights (prepacked matrices, scaled gates).

        The caches notice parameters that are replaced or changed through autograd-aware
        in-place ops (``_version``), but not writes through ``param.data`` or a numpy
        view of it, which is how Thinc's optimizer updates a fine-tuned encoder; such
        callers must call this after each update.
        """
        for module in self.modules():
            module.__dict__.pop("_window_cache", None)
            module.__dict__.pop("_inference_cache", None)

    @property
    def layer_names(self) -> List[str]:
        """``["token", "lstm_1", ...]``, one name per output layer."""
        return elmo_layer_names(self.options.n_layers)

    @property
    def output_dim(self) -> int:
        """Width of every output layer (``2 * projection_dim``)."""
        return self.options.output_dim

    def token_embeddings(self, char_ids: Tensor) -> Tensor:
        """Context-independent embeddings of tokens: char ids (N, 50) -> (N, projection_dim)."""
        return self.char_encoder(char_ids.to(self.device))

    def forward(self, char_ids: Tensor, lengths: Union[Tensor, Sequence[int]]) -> Tensor:
        """Contextual layers of a padded batch of sequences.

        Args:
            char_ids: (B, T, 50) char ids; rows at or past a sequence's length are
                ignored (zeros by convention).
            lengths: (B,) number of tokens of each sequence (0 allowed).

        Returns:
            (n_layers + 1, B, T, 2 * projection_dim), zeros at positions >= length.
        """
        if char_ids.dim() != 3 or char_ids.shape[-1] != CHARS_PER_TOKEN:
            raise ValueError(
                f"char_ids must have shape (B, T, {CHARS_PER_TOKEN}), got {tuple(char_ids.shape)}"
            )
        lengths_tensor = self._lengths_tensor(lengths, char_ids.shape)
        return self.forward_from_embeddings(self._embed_padded(char_ids, lengths_tensor), lengths_tensor)

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
        in_sequence = (positions.unsqueeze(0) < lengths.unsqueeze(1)).reshape(-1)
        embedded = self.char_encoder(char_ids.reshape(-1, CHARS_PER_TOKEN)[in_sequence])
        output = embedded.new_zeros(batch_size * n_tokens, self.options.projection_dim)
        output = output.masked_scatter(in_sequence.unsqueeze(1), embedded)
        return output.view(batch_size, n_tokens, self.options.projection_dim)

    def forward_from_embeddings(
        self, token_embeddings: Tensor, lengths: Union[Tensor, Sequence[int]]
    ) -> Tensor:
        """Like :meth:`forward`, from token embeddings (B, T, projection_dim).

        Values of ``token_embeddings`` at positions >= length are ignored.
        """
        proj_dim = self.options.projection_dim
        if token_embeddings.dim() != 3 or token_embeddings.shape[-1] != proj_dim:
            raise ValueError(
                f"token_embeddings must have shape (B, T, {proj_dim}), "
                f"got {tuple(token_embeddings.shape)}"
            )
        device = self.device
        token_embeddings = token_embeddings.to(device)
        batch_size, n_tokens, _ = token_embeddings.shape
        lengths = self._lengths_tensor(lengths, token_embeddings.shape)
        n_layers_out = self.options.n_output_layers
        if batch_size == 0 or n_tokens == 0:
            if batch_size and bool((lengths != 0).any()):
                raise ValueError("lengths exceed the number of token positions (0)")
            return token_embeddings.new_zeros(n_layers_out, batch_size, n_tokens, 2 * proj_dim)
        # One host sync: the loop only needs to run as long as the longest sequence.
        min_length, max_length = (int(v) for v in torch.stack(torch.aminmax(lengths)).tolist())
        if min_length < 0 or max_length > n_tokens:
            raise ValueError(f"lengths must be in [0, {n_tokens}], got [{min_length}, {max_length}]")

        if not torch.is_grad_enabled() and batch_size > 1 and bool((lengths[1:] > lengths[:-1]).any()):
            # The inference LSTM loop wants rows sorted longest first (its active
            # rows are then a prefix of every step); rows are independent, so
            # sorting and un-sorting changes no value.
            order = torch.sort(lengths, descending=True, stable=True).indices
            stacked = self.forward_from_embeddings(token_embeddings[order], lengths[order])
            return stacked.index_select(1, torch.argsort(order))
        steps = torch.arange(max_length, device=device)
        valid = steps.unsqueeze(0) < lengths.unsqueeze(1)  # (B, max_length)
        tokens = torch.where(valid.unsqueeze(-1), token_embeddings[:, :max_length], 0.0)

        # The backward direction reads each row reversed within its own length, so
        # its padding stays at the end and it never reads padding either.
        reversed_steps = lengths.unsqueeze(1) - 1 - steps.unsqueeze(0)
        reverse_index = torch.where(valid, reversed_steps, steps.unsqueeze(0))
        gather_index = reverse_index.unsqueeze(-1).expand(-1, -1, proj_dim)
        backward_input = tokens.gather(1, gather_index)

        lstm_input = torch.stack([tokens, backward_input], dim=0).transpose(1, 2)  # (2, T, B, proj)
        del backward_input
        layer_outputs = self.lstm(lstm_input, valid.transpose(0, 1))
        del lstm_input

        # Every LSTM output is zero at inactive steps, and the un-reversing gather
        # maps those steps to themselves, so positions past a length stay zero.
        layers = [torch.cat([tokens, tokens], dim=-1)]
        while layer_outputs:
            output = layer_outputs.pop(0)  # drop each layer's LSTM output once used
            forward_out = output[0].transpose(0, 1)  # (B, T, proj)
            backward_out = output[1].transpose(0, 1).gather(1, gather_index)
            layers.append(torch.cat([forward_out, backward_out], dim=-1))
        stacked = torch.stack(layers, dim=0)
        if max_length < n_tokens:
            stacked = F.pad(stacked, (0, 0, 0, n_tokens - max_length))
        return stacked
