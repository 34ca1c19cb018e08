"""The language-model side of ELMo: the softmax head and the biLM training loss.

ELMo is trained as two language models that share the token layer (the char CNN)
and the softmax (Peters et al. 2018; bilm-tf): on a sentence framed as ``<S> w_1 ...
w_n </S>``,

* the **forward** LM reads the top forward LSTM layer at position ``t`` and
  predicts the token at ``t + 1`` (``w_1 ... w_n </S>``);
* the **backward** LM reads the top backward LSTM layer at position ``t`` (which
  has read ``t ... end``) and predicts the token at ``t - 1`` (``<S> w_1 ... w_n``).

Both use one :class:`LmSoftmax` (weights ``(vocab, projection_dim)`` and a bias),
and the loss is the mean of the forward and the backward mean token losses.

Two softmax losses:

* :func:`full_softmax_loss`: the exact cross-entropy over the whole vocabulary
  (training with vocabularies up to ~50k words, and every evaluation);
* :func:`sampled_softmax_loss` with :class:`LogUniformSampler`: for large
  vocabularies, like ``tf.nn.sampled_softmax_loss`` as bilm-tf used it (8,192
  candidates shared by the batch, drawn from a log-uniform (Zipf) distribution
  over frequency-sorted ids, unique, the ``log Q`` correction subtracted from every
  logit and accidental hits of the true class removed). With every class as a
  candidate and a zero correction it equals the full softmax loss exactly.

Plain PyTorch: no spaCy, Thinc or tokenizer imports (the vocabulary and the
char ids are built by ``spacy_ctx.training``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .elmo import ElmoBiLM

__all__ = [
    "LmSoftmax",
    "LogUniformSampler",
    "full_softmax_loss",
    "sampled_softmax_loss",
    "BiLmLosses",
    "ElmoLanguageModel",
    "lm_targets",
]

#: Most float elements of logits computed at once in :func:`full_softmax_loss`
#: (64 Mi floats, 256 MiB): evaluating a 1M-word vocabulary goes in token chunks.
LOGITS_BUDGET = 1 << 26


class LmSoftmax(nn.Module):
    """The softmax of both LMs: ``logits = h @ weight.T + bias`` over the vocabulary.

    ``weight`` is (vocab_size, dim) like bilm-tf's ``softmax/W``, initialised
    N(0, 1/dim) as there; ``bias`` (vocab_size,) starts at zero.
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        if vocab_size < 1 or dim < 1:
            raise ValueError(f"vocab_size and dim must be positive, got {vocab_size}, {dim}")
        self.vocab_size = vocab_size
        self.dim = dim
        self.weight = nn.Parameter(torch.randn(vocab_size, dim) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: Tensor) -> Tensor:
        """Full logits: (N, dim) -> (N, vocab_size)."""
        return F.linear(hidden, self.weight, self.bias)


def full_softmax_loss(hidden: Tensor, targets: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per-token cross-entropy over the whole vocabulary: (N, dim), (N,) -> (N,).

    Tokens go through in chunks whose logits fit ``LOGITS_BUDGET``, so a large
    vocabulary does not need an (N, vocab) matrix at once.
    """
    n_tokens = hidden.shape[0]
    chunk = max(1, LOGITS_BUDGET // max(1, weight.shape[0]))
    if n_tokens <= chunk:
        return F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="none")
    return torch.cat(
        [
            F.cross_entropy(
                F.linear(hidden[start : start + chunk], weight, bias),
                targets[start : start + chunk],
                reduction="none",
            )
            for start in range(0, n_tokens, chunk)
        ]
    )


class LogUniformSampler:
    """Candidate classes for sampled softmax, from the log-uniform (Zipf) distribution.

    Class ``k`` of ``vocab_size`` has probability ``p(k) = log((k + 2) / (k + 1)) /
    log(vocab_size + 1)``, which fits a vocabulary sorted by decreasing frequency
    (TF's ``log_uniform_candidate_sampler``). :meth:`sample` draws ``n_samples``
    times with replacement and keeps the distinct classes; the chance that class
    ``k`` is among them is exactly ``1 - (1 - p(k)) ** n_samples``, the
    "expected count" whose log is subtracted from the logits (the logQ correction).
    """

    def __init__(self, vocab_size: int, n_samples: int) -> None:
        if vocab_size < 1 or n_samples < 1:
            raise ValueError(f"vocab_size and n_samples must be positive, got {vocab_size}, {n_samples}")
        self.vocab_size = vocab_size
        self.n_samples = n_samples
        self._log_range = math.log(vocab_size + 1)

    def probabilities(self, ids: Tensor) -> Tensor:
        """p(k) for class ids ``ids`` (float64 for accuracy on rare classes)."""
        ids = ids.to(torch.float64)
        return torch.log1p(1.0 / (ids + 1.0)) / self._log_range

    def log_expected_count(self, ids: Tensor) -> Tensor:
        """log of the chance that each class in ``ids`` is among the candidates (float32)."""
        p = self.probabilities(ids)
        # 1 - (1 - p)^n, computed without cancellation for tiny p.
        inclusion = -torch.expm1(self.n_samples * torch.log1p(-p))
        return torch.log(inclusion).to(torch.float32)

    def sample(self, generator: Optional[torch.Generator] = None, device=None) -> Tuple[Tensor, Tensor]:
        """Draw candidates: (distinct class ids (S,) sorted, their log expected counts (S,)).

        Drawn on the CPU with ``generator`` (so runs are reproducible whatever the
        device), then moved to ``device``.
        """
        uniform = torch.rand(self.n_samples, generator=generator, dtype=torch.float64)
        # Inverse CDF: P(id <= k) = log(k + 2) / log(V + 1).
        ids = torch.floor(torch.exp(uniform * self._log_range)).to(torch.long) - 1
        ids = torch.unique(ids.clamp_(0, self.vocab_size - 1))
        return ids.to(device), self.log_expected_count(ids).to(device)


def sampled_softmax_loss(
    hidden: Tensor,
    targets: Tensor,
    weight: Tensor,
    bias: Tensor,
    candidates: Tensor,
    candidate_log_q: Tensor,
    target_log_q: Tensor,
) -> Tensor:
    """Per-token sampled softmax loss: (N, dim), (N,) -> (N,).

    Each token's logits are its true class's and the shared ``candidates``', each
    minus its log expected count (``target_log_q`` (N,), ``candidate_log_q`` (S,));
    a candidate equal to the token's true class is removed (logit -inf), as
    ``remove_accidental_hits`` does in TF. The loss is the cross-entropy of the
    true class among these ``1 + S`` logits. With ``candidates`` = every class
    and zero corrections it is exactly :func:`full_softmax_loss`.
    """
    true_logits = (hidden * weight[targets]).sum(-1) + bias[targets] - target_log_q
    sampled_logits = F.linear(hidden, weight[candidates], bias[candidates]) - candidate_log_q
    hits = targets.unsqueeze(1) == candidates.unsqueeze(0)
    sampled_logits = sampled_logits.masked_fill(hits, float("-inf"))
    logits = torch.cat([true_logits.unsqueeze(1), sampled_logits], dim=1)
    return torch.logsumexp(logits, dim=1) - true_logits


def lm_targets(token_ids: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Which positions predict which ids, for both directions.

    Args:
        token_ids: (B, T) vocabulary ids of framed sentences (``<S>`` ... ``</S>``).
        lengths: (B,) tokens per row (boundaries included).

    Returns:
        ``(mask, forward_targets, backward_targets)``: ``mask`` (B, T) is True at
        positions ``t < length - 1``; the forward LM at ``t`` predicts
        ``token_ids[:, t + 1]`` and the backward LM at ``t + 1`` predicts
        ``token_ids[:, t]``, both aligned on ``mask``'s positions.
    """
    n_tokens = token_ids.shape[1]
    positions = torch.arange(max(n_tokens - 1, 0), device=token_ids.device)
    mask = positions.unsqueeze(0) < (lengths.unsqueeze(1) - 1)
    return mask, token_ids[:, 1:], token_ids[:, :-1]


@dataclass
class BiLmLosses:
    """Summed token losses of one batch per direction, and the number of predictions."""

    forward_sum: Tensor
    backward_sum: Tensor
    n_predictions: int

    @property
    def loss(self) -> Tensor:
        """The training loss: mean of the forward and backward mean token losses."""
        n = max(self.n_predictions, 1)
        return 0.5 * (self.forward_sum + self.backward_sum) / n


class ElmoLanguageModel(nn.Module):
    """An :class:`ElmoBiLM` with the shared softmax: the model trained by ELMo pretraining.

    ``n_samples`` of None (or >= the vocabulary size) trains with the full
    softmax; otherwise training uses sampled softmax with a
    :class:`LogUniformSampler`. Evaluation (:meth:`losses` with ``full=True``)
    always uses the full softmax. ``dropout`` is applied to the top LSTM layer's
    outputs before the softmax in training mode (bilm-tf's 0.1 also covered the
    layers below; :class:`ElmoBiLM` has no dropout, so inference is unchanged).
    """

    def __init__(
        self,
        bilm: ElmoBiLM,
        vocab_size: int,
        *,
        n_samples: Optional[int] = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.bilm = bilm
        self.softmax = LmSoftmax(vocab_size, bilm.options.projection_dim)
        self.dropout = float(dropout)
        self.sampler: Optional[LogUniformSampler] = (
            LogUniformSampler(vocab_size, n_samples)
            if n_samples is not None and n_samples < vocab_size
            else None
        )

    @property
    def vocab_size(self) -> int:
        """Number of classes of the softmax."""
        return self.softmax.vocab_size

    def top_layers(self, token_embeddings: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """Top forward and backward LSTM outputs, each (B, T, projection_dim)."""
        layers = self.bilm.forward_from_embeddings(token_embeddings, lengths)
        top = layers[-1]
        proj = self.bilm.options.projection_dim
        return top[..., :proj], top[..., proj:]

    def losses(
        self,
        token_embeddings: Tensor,
        lengths: Tensor,
        token_ids: Tensor,
        *,
        full: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> BiLmLosses:
        """Summed forward and backward token losses of a batch.

        Args:
            token_embeddings: (B, T, projection_dim) from ``bilm.token_embeddings``
                (the caller embeds each distinct word once and gathers).
            lengths: (B,) tokens per row, ``<S>`` and ``</S>`` included.
            token_ids: (B, T) vocabulary ids (targets).
            full: use the full softmax even if the model trains with sampling.
            generator: the random source of the sampled softmax candidates.
        """
        lengths = lengths.to(token_embeddings.device)
        token_ids = token_ids.to(token_embeddings.device)
        forward_top, backward_top = self.top_layers(token_embeddings, lengths)
        if self.training and self.dropout > 0:
            forward_top = F.dropout(forward_top, self.dropout, True)
            backward_top = F.dropout(backward_top, self.dropout, True)
        mask, forward_targets, backward_targets = lm_targets(token_ids, lengths)
        n_predictions = int(mask.sum())
        # Forward LM: position t predicts t + 1; backward LM: position t + 1 predicts t.
        hidden = torch.cat([forward_top[:, :-1][mask], backward_top[:, 1:][mask]])
        targets = torch.cat([forward_targets[mask], backward_targets[mask]])
        weight, bias = self.softmax.weight, self.softmax.bias
        if full or self.sampler is None:
            token_losses = full_softmax_loss(hidden, targets, weight, bias)
        else:
            candidates, candidate_log_q = self.sampler.sample(generator, device=hidden.device)
            target_log_q = self.sampler.log_expected_count(targets)
            token_losses = sampled_softmax_loss(
                hidden, targets, weight, bias, candidates, candidate_log_q, target_log_q
            )
        return BiLmLosses(
            forward_sum=token_losses[:n_predictions].sum(),
            backward_sum=token_losses[n_predictions:].sum(),
            n_predictions=n_predictions,
        )
