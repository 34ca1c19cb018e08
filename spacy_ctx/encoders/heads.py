"""Pretraining heads in plain PyTorch: masked-LM, causal-LM and next-sentence.

Each family's masked-LM head is the same computation under different names:
``dense`` (hidden -> width), an activation, ``LayerNorm``, then a decoder whose
weight is the encoder's word-embedding table (tied: the same Parameter) plus a
per-piece bias. GPT-2's causal-LM head is the tied decoder alone. BERT's
next-sentence head pools the first position (``pooler``: dense + tanh) and
classifies it into two classes (0: B follows A, 1: B is random).

A :class:`HeadSpec` describes one head as Hugging Face stores it: ``names`` maps
checkpoint names (outside the encoder prefix, e.g. ``cls.predictions.``) to the
head module's own names, like :attr:`~.family.Family.names`; ``tied`` are the
checkpoint names of the tied decoder weight and bias, which Hugging Face 5
omits on save and older versions wrote (accepted on load, never written);
``scope`` are the name prefixes the head owns (any other name there is an
unexpected key).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import activation
from .family import Family, TransformerEncoder

NameRule = Tuple[str, str]


# -- modules ---------------------------------------------------------------------------
class TiedDecoder(nn.Module):
    """Projection onto the vocabulary with a weight that *is* the encoder's word
    embedding Parameter (registered here too, as Hugging Face does)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, hidden: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.linear(hidden, self.weight, bias)


class LMHead(nn.Module):
    """``dense -> activation -> norm -> tied decoder (+ bias)``.

    width: the decoder's input width, which must equal the embedding width
    (ELECTRA's and DeBERTa's ``embedding_size`` may be narrower than the layers).
    ``transform=False`` leaves the decoder alone (GPT-2); ``bias=False`` drops the
    vocabulary bias (GPT-2, ModernBERT with ``decoder_bias=false``).
    """

    def __init__(
        self,
        hidden_size: int,
        embedding: nn.Parameter,
        *,
        activation_name: str = "gelu",
        eps: float = 1e-12,
        transform: bool = True,
        dense_bias: bool = True,
        norm_bias: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        vocab_size, width = embedding.shape
        self.activation_name = activation_name
        self.act = activation(activation_name)
        self.dense = nn.Linear(hidden_size, width, bias=dense_bias) if transform else None
        self.norm = nn.LayerNorm(width, eps=eps, bias=norm_bias) if transform else None
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        self.decoder = TiedDecoder(embedding)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., hidden_size) -> logits (..., vocab_size)."""
        if self.dense is not None and self.norm is not None:
            hidden = self.norm(self.act(self.dense(hidden)))
        return self.decoder(hidden, self.bias)


class NSPHead(nn.Module):
    """BERT's next-sentence head: ``tanh(pooler(hidden[:, 0]))`` -> two logits."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (batch, length, hidden_size) -> (batch, 2) logits."""
        return self.classifier(torch.tanh(self.pooler(hidden[:, 0])))


# -- name tables ------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSpec:
    """A head as a checkpoint stores it (see the module docstring).

    name: a short name (``"bert-mlm"``). names: ``(checkpoint, ours)`` templates,
    checkpoint names relative to the checkpoint's outer prefix (no encoder
    prefix; NSP's pooler, which lives inside it, is written ``{encoder}pooler.``).
    tied: checkpoint names of tied tensors (accepted, not written). scope:
    checkpoint name prefixes this head owns. build(config, embedding) -> module.
    """

    name: str
    names: Tuple[NameRule, ...]
    tied: Tuple[str, ...]
    scope: Tuple[str, ...]
    build: Callable[[Any, nn.Parameter], nn.Module]

    def to_ours(self, checkpoint_name: str, encoder_prefix: str = "") -> Optional[str]:
        """The head module's name for a checkpoint name, None if no rule matches."""
        for theirs, ours in self.names:
            theirs = theirs.replace("{encoder}", encoder_prefix)
            # A rule ending in "." is a prefix; any other names one tensor.
            if checkpoint_name == theirs or (
                theirs.endswith(".") and checkpoint_name.startswith(theirs)
            ):
                return ours + checkpoint_name[len(theirs):]
        return None

    def to_checkpoint(self, our_name: str, encoder_prefix: str = "") -> Optional[str]:
        """The checkpoint name for one of the head module's names."""
        for theirs, ours in self.names:
            if our_name == ours or (ours.endswith(".") and our_name.startswith(ours)):
                return theirs.replace("{encoder}", encoder_prefix) + our_name[len(ours):]
        return None

    def owns(self, checkpoint_name: str, encoder_prefix: str = "") -> bool:
        """Is ``checkpoint_name`` inside this head's part of the checkpoint?"""
        scopes = (s.replace("{encoder}", encoder_prefix) for s in self.scope)
        return any(checkpoint_name.startswith(scope) for scope in scopes)


def _raw(config: Any) -> Dict[str, Any]:
    raw = getattr(config, "raw", None)
    return dict(raw) if isinstance(raw, dict) else {}


def _bert_like(activation_of: Callable[[Any], str]) -> Callable[[Any, nn.Parameter], nn.Module]:
    def build(config: Any, embedding: nn.Parameter) -> nn.Module:
        return LMHead(
            config.hidden_size,
            embedding,
            activation_name=activation_of(config),
            eps=config.layer_norm_eps,
        )

    return build


def _modernbert_head(config: Any, embedding: nn.Parameter) -> nn.Module:
    raw = _raw(config)
    return LMHead(
        config.hidden_size,
        embedding,
        activation_name=raw.get("classifier_activation") or "gelu",
        eps=config.norm_eps,
        dense_bias=bool(raw.get("classifier_bias", False)),
        norm_bias=bool(config.norm_bias),
        bias=bool(raw.get("decoder_bias", True)),
    )


def _gpt2_head(config: Any, embedding: nn.Parameter) -> nn.Module:
    return LMHead(config.hidden_size, embedding, transform=False, bias=False)


def _nsp_head(config: Any, embedding: nn.Parameter) -> nn.Module:
    return NSPHead(config.hidden_size)


def _rules(dense: str, norm: str, bias: str) -> Tuple[NameRule, ...]:
    """The name rules of an :class:`LMHead` whose dense, norm and bias are stored
    under these checkpoint names (the decoder is tied)."""
    return ((dense, "dense."), (norm, "norm."), (bias, "bias"))


BERT_MLM = HeadSpec(
    "bert-mlm",
    _rules(
        "cls.predictions.transform.dense.",
        "cls.predictions.transform.LayerNorm.",
        "cls.predictions.bias",
    ),
    ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
    ("cls.predictions.",),
    _bert_like(lambda c: c.hidden_act),
)
ROBERTA_MLM = HeadSpec(
    "roberta-mlm",
    _rules("lm_head.dense.", "lm_head.layer_norm.", "lm_head.bias"),
    ("lm_head.decoder.weight", "lm_head.decoder.bias"),
    ("lm_head.",),
    _bert_like(lambda c: "gelu"),  # RobertaLMHead always uses gelu
)
DISTILBERT_MLM = HeadSpec(
    "distilbert-mlm",
    _rules("vocab_transform.", "vocab_layer_norm.", "vocab_projector.bias"),
    ("vocab_projector.weight",),
    ("vocab_transform.", "vocab_layer_norm.", "vocab_projector."),
    _bert_like(lambda c: c.hidden_act),
)
ELECTRA_MLM = HeadSpec(
    "electra-mlm",
    _rules("generator_predictions.dense.", "generator_predictions.LayerNorm.", "generator_lm_head.bias"),
    ("generator_lm_head.weight",),
    ("generator_predictions.", "generator_lm_head."),
    _bert_like(lambda c: "gelu"),  # ElectraGeneratorPredictions always uses gelu
)
# DeBERTa-v2: ``legacy=true`` (the default) is BERT's layout under ``cls.``; the
# newer ``lm_predictions.lm_head.`` layout multiplies by the embeddings directly.
DEBERTA_MLM = HeadSpec(
    "deberta-v2-mlm",
    BERT_MLM.names,
    BERT_MLM.tied,
    ("cls.predictions.",),
    _bert_like(lambda c: c.hidden_act),
)
DEBERTA_MLM_NEW = HeadSpec(
    "deberta-v2-lm-predictions",
    _rules(
        "lm_predictions.lm_head.dense.",
        "lm_predictions.lm_head.LayerNorm.",
        "lm_predictions.lm_head.bias",
    ),
    (),
    ("lm_predictions.",),
    _bert_like(lambda c: c.hidden_act),
)
MODERNBERT_MLM = HeadSpec(
    "modernbert-mlm",
    (("head.dense.", "dense."), ("head.norm.", "norm."), ("decoder.bias", "bias")),
    ("decoder.weight",),
    ("head.", "decoder."),
    _modernbert_head,
)
GPT2_LM = HeadSpec("gpt2-lm", (), ("lm_head.weight",), ("lm_head.",), _gpt2_head)
BERT_NSP = HeadSpec(
    "bert-nsp",
    (("{encoder}pooler.dense.", "pooler."), ("cls.seq_relationship.", "classifier.")),
    (),
    ("{encoder}pooler.", "cls.seq_relationship."),
    _nsp_head,
)

#: Masked/causal-LM head layouts per family name, the one to export first.
LM_HEADS: Dict[str, Tuple[HeadSpec, ...]] = {
    "bert": (BERT_MLM,),
    "roberta": (ROBERTA_MLM,),
    "electra": (ELECTRA_MLM,),
    "distilbert": (DISTILBERT_MLM,),
    "deberta-v2": (DEBERTA_MLM, DEBERTA_MLM_NEW),
    "modernbert": (MODERNBERT_MLM,),
    "gpt2": (GPT2_LM,),
}
#: Families with a next-sentence head.
NSP_HEADS: Dict[str, HeadSpec] = {"bert": BERT_NSP}
#: The transformers class of the exported folder, per ``model_type``.
ARCHITECTURES: Dict[str, str] = {
    "bert": "BertForMaskedLM",
    "roberta": "RobertaForMaskedLM",
    "xlm-roberta": "XLMRobertaForMaskedLM",
    "camembert": "CamembertForMaskedLM",
    "electra": "ElectraForMaskedLM",
    "distilbert": "DistilBertForMaskedLM",
    "deberta-v2": "DebertaV2ForMaskedLM",
    "modernbert": "ModernBertForMaskedLM",
    "gpt2": "GPT2LMHeadModel",
}
NSP_ARCHITECTURE = "BertForPreTraining"


def word_embedding(encoder: TransformerEncoder) -> nn.Parameter:
    """The encoder's word-embedding Parameter: the first 2-d parameter (module
    order: every family builds its word embeddings first) with one row per
    vocabulary entry."""
    vocab_size = encoder.config.vocab_size
    for _, param in encoder.named_parameters():
        if param.dim() == 2 and param.shape[0] == vocab_size:
            return param
    raise ValueError(f"{type(encoder).__name__}: no word-embedding table of {vocab_size} rows")


def init_head(module: nn.Module, std: float, generator: torch.Generator) -> None:
    """Initialise a new head as Hugging Face does: Linear weights normal(0, std),
    biases zero, LayerNorm ones/zeros, the vocabulary bias zero. The tied decoder
    (the encoder's embeddings) is left alone."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) * std)
                if sub.bias is not None:
                    sub.bias.zero_()
            elif isinstance(sub, nn.LayerNorm):
                if sub.weight is not None:
                    sub.weight.fill_(1.0)
                if sub.bias is not None:
                    sub.bias.zero_()
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            bias.zero_()


# -- the model --------------------------------------------------------------------------
class PretrainingModel(nn.Module):
    """An encoder with its LM head (masked, or causal for GPT-2) and, for BERT,
    an optional next-sentence head.

    ``lm_head.decoder.weight`` is the encoder's word-embedding Parameter.
    ``family``, ``config`` (the encoder's validated config, ``config.raw`` the
    original dict) and ``lm_spec`` (the head layout, used to export it) are plain
    attributes. ``loaded_heads``: names of the heads read from the checkpoint
    (``"lm"``, ``"nsp"``); the others were created.
    """

    def __init__(
        self,
        encoder: TransformerEncoder,
        family: Family,
        config: Any,
        lm_spec: HeadSpec,
        lm_head: nn.Module,
        nsp_head: Optional[nn.Module] = None,
        loaded_heads: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.lm_head = lm_head
        self.nsp_head = nsp_head
        self.family = family
        self.config = config
        self.lm_spec = lm_spec
        self.loaded_heads: List[str] = list(loaded_heads)
        self._takes_types = "token_type_ids" in inspect.signature(encoder.forward).parameters

    @property
    def causal(self) -> bool:
        """True for causal-LM models (GPT-2): predict the next piece, not masked ones."""
        return self.family.causal

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        *,
        predict: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """input_ids, attention_mask, token_type_ids: (batch, length). Returns the LM
        logits (batch, length, vocab) and the NSP logits (batch, 2), or None
        without an NSP head. For a causal model, position i predicts piece i+1.

        predict: optional bool (batch, length); the LM head then runs at those
        positions only and the logits are (n_true, vocab), in row-major order
        (an MLM loss needs only the masked pieces; the vocabulary projection
        is most of a small model's cost).
        """
        if token_type_ids is not None:
            if not self._takes_types:
                raise ValueError(f"the {self.family.name} encoder takes no token_type_ids")
            outputs = self.encoder(input_ids, attention_mask, token_type_ids=token_type_ids)
        else:
            outputs = self.encoder(input_ids, attention_mask)
        hidden = outputs[-1]
        nsp = self.nsp_head(hidden) if self.nsp_head is not None else None
        if predict is not None:
            if predict.shape != input_ids.shape:
                raise ValueError(
                    f"predict must have input_ids' shape {tuple(input_ids.shape)}, "
                    f"got {tuple(predict.shape)}"
                )
            return self.lm_head(hidden[predict.bool()]), nsp
        return self.lm_head(hidden), nsp


def strip_tf_names(name: str) -> str:
    """Old TF-converted checkpoints call LayerNorm parameters gamma/beta."""
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
