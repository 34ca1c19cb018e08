"""Registered, versioned model builders (declared as entry points in setup.cfg)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from spacy.tokens import Doc
from thinc.api import Model, Ragged, reduce_mean
from thinc.types import Floats2d

from .backends import CtxOutput
from .backends.precision import check_quantize
from .errors import ConfigError
from .thinc_layers.backend_layer import build_backend_layer
from .thinc_layers.listeners import build_head, build_listener, build_standalone
from .thinc_layers.scalar_mix import ScalarMix


def build_bert_encoder(
    *,
    name: Optional[str],
    window: Optional[int] = None,
    stride: Optional[int] = None,
    overlap: str = "best",
    device: Optional[str] = None,
    mixed_precision: Optional[str] = None,
    quantize: Optional[str] = None,
) -> Model[List[Doc], List[CtxOutput]]:
    """``spacy_ctx.BertEncoder.v1``: a transformer encoder of any supported family (chosen by
    ``config.json``'s ``model_type``), loaded on initialize/first use.

    name: local Hugging Face-format directory, or a hub id (needs the ``hub`` extra
        and a network connection or a filled hub cache).
    window: pieces per window, without the specials ([CLS]/[SEP], <s>/</s>; none for
        GPT-2); None = the family's usable positions minus the specials.
    stride: pieces between window starts; None = 3/4 of the window.
    overlap: ``"best"`` (each piece from the window where it has most context) or
        ``"mean"`` (average over windows).
    device: torch device (``"cuda:0"``); None = follow spaCy's ops (GPU if active).
    mixed_precision: None (float32), ``"auto"`` (bf16 where the device computes it
        natively: CUDA compute capability >= 8.0, CPUs with AVX-512 BF16 or AMX;
        float32 elsewhere), ``"bf16"`` or ``"fp16"`` autocast.
    quantize: None, or ``"int8"``: dynamic int8 quantization of the Linear layers,
        for CPU inference with a frozen encoder (``frozen = true``); refused on CUDA
        and when fine-tuning. The saved weights stay float32.
    """
    check_quantize(quantize)
    if quantize is not None and device is not None and not str(device).startswith("cpu"):
        raise ConfigError(
            f"quantize = {quantize!r} runs on CPU only, but device = {device!r}. Remove "
            "quantize (mixed_precision = \"auto\" gives bf16 on recent GPUs) or set device = null."
        )

    def load():
        from .backends.bert import TransformerBackend
        from .loaders import resolve_bert_dir

        return TransformerBackend.from_pretrained(
            resolve_bert_dir(name),
            name=name,
            window=window,
            stride=stride,
            overlap=overlap,
            mixed_precision=mixed_precision,
            quantize=quantize,
        )

    return build_backend_layer(
        load,
        device=device,
        runtime_settings={"mixed_precision": mixed_precision, "quantize": quantize},
    )


def build_elmo_encoder(
    *,
    name: Optional[str] = "elmo-original",
    options: Optional[str] = None,
    weights: Optional[str] = None,
    chunk_size: int = 100,
    cache_size: int = 50_000,
    device: Optional[str] = None,
    mixed_precision: Optional[str] = None,
) -> Model[List[Doc], List[CtxOutput]]:
    """``spacy_ctx.ElmoEncoder.v1``: an ELMo biLM, loaded on initialize/first use.

    options, weights: AllenNLP ``options.json`` and ``weights.hdf5`` paths (they win).
    name: without paths, a published model (``elmo-original``, ``elmo-medium``,
        ``elmo-small``, ``elmo-original-5.5B``) downloaded once when online.
    chunk_size: tokens per chunk when a Doc has no sentence boundaries (and the
        longest piece of a sentence the model sees at once).
    cache_size: words whose context-independent embeddings are cached (LRU).
    device: torch device; None = follow spaCy's ops. mixed_precision: None, ``"auto"``
        (bf16 where native, else float32), ``"bf16"`` or ``"fp16"``.
    """

    def load():
        from .backends.elmo import ElmoBackend
        from .loaders import resolve_elmo_files

        options_path, weights_path = resolve_elmo_files(name, options, weights)
        label = name if options is None else str(Path(weights_path).name)
        return ElmoBackend.from_pretrained(
            options_path,
            weights_path,
            name=label,
            chunk_size=chunk_size,
            cache_size=cache_size,
            mixed_precision=mixed_precision,
        )

    return build_backend_layer(
        load, device=device, runtime_settings={"mixed_precision": mixed_precision}
    )


def _pooling_or_default(pooling: Optional[Model[Ragged, Floats2d]]) -> Model[Ragged, Floats2d]:
    return reduce_mean() if pooling is None else pooling


def build_last_layer_listener(
    *,
    upstream: str = "*",
    grad_factor: float = 1.0,
    pooling: Optional[Model[Ragged, Floats2d]] = None,
) -> Model[List[Doc], List[Floats2d]]:
    """``spacy_ctx.LastLayerListener.v1``: the encoder's last layer, pooled to tokens.

    upstream: name of the ctx_bert/ctx_elmo component, or ``"*"`` for any.
    grad_factor: scale of the gradient sent into the encoder (0: none, and no
        autograd graph is built through the encoder).
    pooling: a Thinc reduce layer over each token's pieces (``reduce_mean.v1``
        default; ``reduce_first.v1``, ``reduce_last.v1``, ``reduce_max.v1`` too).
    Returns one (n_tokens, width) array per Doc.
    """
    head = build_head(_pooling_or_default(pooling), None)
    return build_listener(head, upstream=upstream, grad_factor=grad_factor)


def build_scalar_mix_listener(
    *,
    n_layers: Optional[int] = None,
    upstream: str = "*",
    grad_factor: float = 1.0,
    pooling: Optional[Model[Ragged, Floats2d]] = None,
    layer_norm: bool = False,
    layer_dropout: float = 0.0,
) -> Model[List[Doc], List[Floats2d]]:
    """``spacy_ctx.ScalarMixListener.v1``: ``gamma * sum_k softmax(s)_k * h_k`` over all layers.

    n_layers: layers the encoder returns (BERT: hidden layers + 1; ELMo: 3);
        None takes the number from the upstream encoder at initialization.
    upstream, grad_factor, pooling: as for ``LastLayerListener.v1``.
    layer_norm: normalise each layer (per Doc) before mixing.
    layer_dropout: probability of dropping a layer from the mix in training.
    """
    mix = ScalarMix(n_layers, layer_norm=layer_norm, layer_dropout=layer_dropout)
    head = build_head(_pooling_or_default(pooling), mix)
    return build_listener(head, upstream=upstream, grad_factor=grad_factor)


def build_standalone_encoder(
    *,
    encoder: Model[List[Doc], List[CtxOutput]],
    listener: Model[List[Doc], List[Floats2d]],
    frozen: bool = False,
    max_batch_tokens: int = 4096,
) -> Model[List[Doc], List[Floats2d]]:
    """``spacy_ctx.StandaloneEncoder.v1``: an encoder with a listener's head, as one model.

    Written into configs by ``nlp.replace_listeners``; the component then owns its
    own copy of the encoder. frozen, max_batch_tokens: the settings of the encoder
    component it was copied from (no gradients into a frozen encoder).
    """
    return build_standalone(
        encoder, listener.layers[0], frozen=frozen, max_batch_tokens=max_batch_tokens
    )
