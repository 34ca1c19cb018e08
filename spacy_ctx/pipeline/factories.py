"""Registered component factories: ``ctx_bert`` and ``ctx_elmo``, one component class."""

from __future__ import annotations

from typing import List, Optional, Union

from spacy.language import Language
from thinc.api import Model, Optimizer

from .component import CtxComponent

DEFAULT_BERT_MODEL = {
    "@architectures": "spacy_ctx.BertEncoder.v1",
    "name": "sentence-transformers/all-MiniLM-L6-v2",
    "window": None,
    "stride": None,
    "overlap": "best",
    "device": None,
    "mixed_precision": None,
}


@Language.factory(
    "ctx_bert",
    default_config={
        "model": DEFAULT_BERT_MODEL,
        "frozen": False,
        "store": "last",
        "store_dtype": "float32",
        "store_layers": None,
        "vector_hooks": True,
        "max_batch_tokens": 4096,
        "feature_cache_mb": 6144,
        "optimizer": None,
    },
)
def make_ctx_bert(
    nlp: Language,
    name: str,
    model: Model,
    frozen: bool,
    store: str,
    store_dtype: str,
    store_layers: Optional[List[Union[int, str]]],
    vector_hooks: bool,
    max_batch_tokens: int,
    feature_cache_mb: float,
    optimizer: Optional[Optimizer],
) -> CtxComponent:
    """A transformer encoder whose layers, pooled to tokens, land on ``doc._.ctx``.

    Any supported family: BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT, ELECTRA,
    DeBERTa-v2/v3, ModernBERT, GPT-2 (chosen by the checkpoint's ``model_type``).

    model: a ``spacy_ctx.BertEncoder.v1`` block (checkpoint ``name``, windowing,
        device, mixed precision). frozen: no gradients into the encoder.
    store: ``"none"``, ``"last"`` or ``"all"`` layers kept on the Doc.
    store_dtype: ``"float32"``, ``"float16"`` or ``"int8"`` (each token row quantized
        with its own scale, dequantized to float32 on read) for the stored arrays.
    store_layers: layer indices (negative count from the last) or names, e.g.
        ``[-1]`` or ``["layer_4", "layer_6"]``, stored instead of ``store``'s choice.
    vector_hooks: make ``.vector``/``.similarity()`` use the contextual vectors.
    max_batch_tokens: padded pieces per encoder batch at inference.
    feature_cache_mb: memory for per-Doc outputs reused across epochs when the
        encoder runs without gradients (frozen), stored as float16 and capped at
        half the available RAM; 0 turns the cache off.
    optimizer: an optimizer for the encoder weights only (e.g. a lower learning
        rate than the task heads); None uses the training optimizer.
    """
    settings = dict(locals())  # the factory arguments, passed on by name
    return CtxComponent(settings.pop("nlp").vocab, vector_mode="last", **settings)


DEFAULT_ELMO_MODEL = {
    "@architectures": "spacy_ctx.ElmoEncoder.v1",
    "name": "elmo-original",
    "options": None,
    "weights": None,
    "chunk_size": 100,
    "cache_size": 50000,
    "device": None,
    "mixed_precision": None,
}


@Language.factory(
    "ctx_elmo",
    default_config={
        "model": DEFAULT_ELMO_MODEL,
        "frozen": True,
        "store": "all",
        "store_dtype": "float32",
        "store_layers": None,
        "vector_hooks": True,
        "max_batch_tokens": 4096,
        "feature_cache_mb": 6144,
        "optimizer": None,
    },
)
def make_ctx_elmo(
    nlp: Language,
    name: str,
    model: Model,
    frozen: bool,
    store: str,
    store_dtype: str,
    store_layers: Optional[List[Union[int, str]]],
    vector_hooks: bool,
    max_batch_tokens: int,
    feature_cache_mb: float,
    optimizer: Optional[Optimizer],
) -> CtxComponent:
    """An ELMo biLM whose three layers (token, lstm_1, lstm_2) land on ``doc._.ctx``.

    Same settings as ``ctx_bert``; frozen by default. Token vectors are the average
    of the stored layers. max_batch_tokens counts padded tokens per batch.
    """
    settings = dict(locals())  # the factory arguments, passed on by name
    return CtxComponent(settings.pop("nlp").vocab, vector_mode="mean", **settings)
