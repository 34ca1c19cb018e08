"""Training configs for ``ner`` / ``textcat`` on ``ctx_bert`` / ``ctx_elmo`` encoders.

:func:`make_config` writes the same configs as the files in ``configs/`` (which
are generated from it), so there is one source of truth. Configs are built as
data: each section is a nested dict made by a small function, the choices
(encoder, frozen, listener, GPU) are plain arguments, and the result is a
:class:`thinc.api.Config`, written out by ``Config.to_str()`` (``init-config``
fills spaCy's defaults first). No text templates.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from thinc.api import Config

from .errors import ConfigError

PIPELINES = ("ner", "textcat", "ner+textcat")
ENCODERS = ("bert", "elmo")
LISTENERS = ("last", "scalar_mix")

Section = Dict[str, Any]

# Config variables (written unquoted: ``path = ${paths.train}``).
TRAIN_PATH = "${paths.train}"
DEV_PATH = "${paths.dev}"
ENCODER_PATH = "${paths.encoder}"
ELMO_OPTIONS_PATH = "${paths.elmo_options}"
ELMO_WEIGHTS_PATH = "${paths.elmo_weights}"

# Learning schedule of the task heads and of the (fine-tuned) encoder.
MAX_STEPS = 20000
HEAD_LEARN_RATE = 0.001
ENCODER_LEARN_RATE = 0.00005  # lower, with warm-up, for the pretrained weights
ENCODER_WARMUP_STEPS = 250


def _paths() -> Section:
    return {"train": None, "dev": None, "encoder": None, "elmo_options": None, "elmo_weights": None}


def _corpus(path: str) -> Section:
    return {"@readers": "spacy.Corpus.v1", "path": path, "max_length": 0}


def _adam(learn_rate: Any = None) -> Section:
    optimizer: Section = {
        "@optimizers": "Adam.v1",
        "beta1": 0.9,
        "beta2": 0.999,
        "L2_is_weight_decay": True,
        "L2": 0.01,
        "grad_clip": 1.0,
        "use_averages": False,
        "eps": 0.00000001,
    }
    if learn_rate is not None:
        optimizer["learn_rate"] = learn_rate
    return optimizer


def _training() -> Section:
    return {
        "seed": "${system.seed}",
        "gpu_allocator": "${system.gpu_allocator}",
        "dropout": 0.1,
        "accumulate_gradient": 1,
        "patience": 1600,
        "max_epochs": 0,
        "max_steps": MAX_STEPS,
        "eval_frequency": 200,
        "frozen_components": [],
        "annotating_components": [],
        "dev_corpus": "corpora.dev",
        "train_corpus": "corpora.train",
        "batcher": {
            "@batchers": "spacy.batch_by_words.v1",
            "discard_oversize": False,
            "tolerance": 0.2,
            "size": 2000,
        },
        "logger": {"@loggers": "spacy.ConsoleLogger.v1", "progress_bar": False},
        "optimizer": _adam(HEAD_LEARN_RATE),
    }


def _bert_encoder(frozen: bool, mixed_precision: Optional[str]) -> Section:
    component: Section = {
        "factory": "ctx_bert",
        "frozen": frozen,
        "store": "none",
        "vector_hooks": False,
        "max_batch_tokens": 4096,
        "feature_cache_mb": 6144,
        "model": {
            "@architectures": "spacy_ctx.BertEncoder.v1",
            "name": ENCODER_PATH,
            "window": None,
            "stride": None,
            "overlap": "best",
            "device": None,
            "mixed_precision": mixed_precision,
        },
    }
    if not frozen:  # its own optimizer: a lower learning rate with warm-up
        component["optimizer"] = _adam()
        component["optimizer"]["learn_rate"] = {
            "@schedules": "warmup_linear.v1",
            "warmup_steps": ENCODER_WARMUP_STEPS,
            "total_steps": MAX_STEPS,
            "initial_rate": ENCODER_LEARN_RATE,
        }
    return component


def _elmo_encoder(frozen: bool, mixed_precision: Optional[str]) -> Section:
    return {
        "factory": "ctx_elmo",
        "frozen": frozen,
        "store": "none",
        "vector_hooks": False,
        "max_batch_tokens": 4096,
        "feature_cache_mb": 6144,
        "model": {
            "@architectures": "spacy_ctx.ElmoEncoder.v1",
            "name": None,
            "options": ELMO_OPTIONS_PATH,
            "weights": ELMO_WEIGHTS_PATH,
            "chunk_size": 100,
            "cache_size": 50000,
            "device": None,
            "mixed_precision": mixed_precision,
        },
    }


def _listener(kind: str, upstream: str) -> Section:
    if kind == "last":
        listener: Section = {
            "@architectures": "spacy_ctx.LastLayerListener.v1",
            "upstream": upstream,
            "grad_factor": 1.0,
        }
    else:
        listener = {
            "@architectures": "spacy_ctx.ScalarMixListener.v1",
            "n_layers": None,
            "upstream": upstream,
            "grad_factor": 1.0,
            "layer_norm": False,
            "layer_dropout": 0.0,
        }
    listener["pooling"] = {"@layers": "reduce_mean.v1"}
    return listener


def _ner(tok2vec: Section) -> Section:
    return {
        "factory": "ner",
        "model": {
            "@architectures": "spacy.TransitionBasedParser.v2",
            "state_type": "ner",
            "extra_state_tokens": False,
            "hidden_width": 64,
            "maxout_pieces": 2,
            "use_upper": False,
            "nO": None,
            "tok2vec": tok2vec,
        },
    }


def _textcat(tok2vec: Section) -> Section:
    return {
        "factory": "textcat",
        "threshold": 0.0,
        "model": {
            "@architectures": "spacy.TextCatReduce.v1",
            "exclusive_classes": True,
            "use_reduce_first": False,
            "use_reduce_last": False,
            "use_reduce_max": True,
            "use_reduce_mean": True,
            "nO": None,
            "tok2vec": tok2vec,
        },
    }


_ENCODERS = {"bert": _bert_encoder, "elmo": _elmo_encoder}
_TASKS = {"ner": _ner, "textcat": _textcat}


def config_data(
    pipeline: str = "ner",
    encoder: str = "bert",
    *,
    frozen: Optional[bool] = None,
    listener: Optional[str] = None,
    gpu: bool = False,
) -> Dict[str, Section]:
    """The training config as nested dicts (sections), before ``[paths]`` overrides.

    See :func:`make_config` for the arguments.
    """
    if pipeline not in PIPELINES:
        raise ConfigError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    if encoder not in ENCODERS:
        raise ConfigError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    if frozen is None:
        frozen = encoder == "elmo"
    if listener is None:
        listener = "scalar_mix" if frozen or encoder == "elmo" else "last"
    if listener not in LISTENERS:
        raise ConfigError(f"listener must be one of {LISTENERS}, got {listener!r}")
    name = f"ctx_{encoder}"
    tasks: List[str] = pipeline.split("+")
    components: Section = {name: _ENCODERS[encoder](frozen, "auto")}
    for task in tasks:
        components[task] = _TASKS[task](_listener(listener, upstream=name))
    return {
        "paths": _paths(),
        "system": {"gpu_allocator": "pytorch" if gpu else None, "seed": 0},
        "nlp": {"lang": "en", "pipeline": [name, *tasks], "batch_size": 32},
        "components": components,
        "corpora": {"train": _corpus(TRAIN_PATH), "dev": _corpus(DEV_PATH)},
        "training": _training(),
        "initialize": {"vectors": None},
    }


def make_config(
    pipeline: str = "ner",
    encoder: str = "bert",
    *,
    frozen: Optional[bool] = None,
    listener: Optional[str] = None,
    gpu: bool = False,
    encoder_path: Optional[str] = None,
    elmo_options: Optional[str] = None,
    elmo_weights: Optional[str] = None,
) -> Config:
    """Build a training config.

    pipeline: ``"ner"``, ``"textcat"`` or ``"ner+textcat"`` (one shared encoder).
    encoder: ``"bert"`` (fine-tuned by default) or ``"elmo"`` (frozen, scalar mix).
    frozen: override the encoder default; a frozen BERT uses a scalar-mix listener.
    listener: ``"last"`` or ``"scalar_mix"``; default follows ``frozen``.
    gpu: the pytorch allocator for cupy. The encoder gets ``mixed_precision = "auto"``
        either way (bf16 where the device computes it natively, float32 elsewhere).
    encoder_path / elmo_options / elmo_weights: fill ``[paths]``.
    """
    data = config_data(pipeline, encoder, frozen=frozen, listener=listener, gpu=gpu)
    overrides = {"encoder": encoder_path, "elmo_options": elmo_options, "elmo_weights": elmo_weights}
    for key, value in overrides.items():
        if value is not None:
            data["paths"][key] = str(value)
    # Variables (${paths.train}) stay as they are until spaCy resolves the config.
    return Config(data, is_interpolated=False)
