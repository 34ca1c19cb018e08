"""Training configs for ``ner`` / ``textcat`` on ``ctx_bert`` / ``ctx_elmo`` encoders.

:func:`make_config` writes the same configs as the files in ``configs/`` (which
are generated from it), so there is one source of truth.
"""

from __future__ import annotations

from typing import Dict, Optional

from thinc.api import Config

PIPELINES = ("ner", "textcat", "ner+textcat")
ENCODERS = ("bert", "elmo")
LISTENERS = ("last", "scalar_mix")

_BASE = """
[paths]
train = null
dev = null
encoder = null
elmo_options = null
elmo_weights = null

[system]
gpu_allocator = {gpu_allocator}
seed = 0

[nlp]
lang = "en"
pipeline = {pipeline}
batch_size = 32

[components]

[corpora]

[corpora.train]
@readers = "spacy.Corpus.v1"
path = ${{paths.train}}
max_length = 0

[corpora.dev]
@readers = "spacy.Corpus.v1"
path = ${{paths.dev}}
max_length = 0

[training]
seed = ${{system.seed}}
gpu_allocator = ${{system.gpu_allocator}}
dropout = 0.1
accumulate_gradient = 1
patience = 1600
max_epochs = 0
max_steps = 20000
eval_frequency = 200
frozen_components = []
annotating_components = []
dev_corpus = "corpora.dev"
train_corpus = "corpora.train"

[training.batcher]
@batchers = "spacy.batch_by_words.v1"
discard_oversize = false
tolerance = 0.2
size = 2000

[training.logger]
@loggers = "spacy.ConsoleLogger.v1"
progress_bar = false

[training.optimizer]
@optimizers = "Adam.v1"
beta1 = 0.9
beta2 = 0.999
L2_is_weight_decay = true
L2 = 0.01
grad_clip = 1.0
use_averages = false
eps = 0.00000001
learn_rate = 0.001

[initialize]
vectors = null
"""

_BERT = """
[components.{name}]
factory = "ctx_bert"
frozen = {frozen}
store = "none"
vector_hooks = false
max_batch_tokens = 4096
feature_cache_mb = 1024

[components.{name}.model]
@architectures = "spacy_ctx.BertEncoder.v1"
name = ${{paths.encoder}}
window = null
stride = null
overlap = "best"
device = null
mixed_precision = {mixed_precision}
"""

# A lower learning rate with warm-up for the pretrained weights than for the heads.
_BERT_OPTIMIZER = """
[components.{name}.optimizer]
@optimizers = "Adam.v1"
beta1 = 0.9
beta2 = 0.999
L2_is_weight_decay = true
L2 = 0.01
grad_clip = 1.0
use_averages = false
eps = 0.00000001

[components.{name}.optimizer.learn_rate]
@schedules = "warmup_linear.v1"
warmup_steps = 250
total_steps = 20000
initial_rate = 0.00005
"""

_ELMO = """
[components.{name}]
factory = "ctx_elmo"
frozen = true
store = "none"
vector_hooks = false
max_batch_tokens = 4096
feature_cache_mb = 2048

[components.{name}.model]
@architectures = "spacy_ctx.ElmoEncoder.v1"
name = null
options = ${{paths.elmo_options}}
weights = ${{paths.elmo_weights}}
chunk_size = 100
cache_size = 50000
device = null
mixed_precision = {mixed_precision}
"""

_LISTENER_LAST = """
[components.{pipe}.model.tok2vec]
@architectures = "spacy_ctx.LastLayerListener.v1"
upstream = "{upstream}"
grad_factor = 1.0

[components.{pipe}.model.tok2vec.pooling]
@layers = "reduce_mean.v1"
"""

_LISTENER_MIX = """
[components.{pipe}.model.tok2vec]
@architectures = "spacy_ctx.ScalarMixListener.v1"
n_layers = null
upstream = "{upstream}"
grad_factor = 1.0
layer_norm = false
layer_dropout = 0.0

[components.{pipe}.model.tok2vec.pooling]
@layers = "reduce_mean.v1"
"""

_NER = """
[components.ner]
factory = "ner"

[components.ner.model]
@architectures = "spacy.TransitionBasedParser.v2"
state_type = "ner"
extra_state_tokens = false
hidden_width = 64
maxout_pieces = 2
use_upper = false
nO = null
"""

_TEXTCAT = """
[components.textcat]
factory = "textcat"
threshold = 0.0

[components.textcat.model]
@architectures = "spacy.TextCatReduce.v1"
exclusive_classes = true
use_reduce_first = false
use_reduce_last = false
use_reduce_max = true
use_reduce_mean = true
nO = null
"""


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
    gpu: bf16 autocast on the encoder and the pytorch allocator for cupy.
    encoder_path / elmo_options / elmo_weights: fill ``[paths]``.
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    if frozen is None:
        frozen = encoder == "elmo"
    if listener is None:
        listener = "scalar_mix" if frozen or encoder == "elmo" else "last"
    if listener not in LISTENERS:
        raise ValueError(f"listener must be one of {LISTENERS}, got {listener!r}")
    name = f"ctx_{encoder}"
    tasks = pipeline.split("+")
    mixed_precision = '"bf16"' if gpu else "null"
    parts = [_BASE.format(pipeline=_list([name, *tasks]), gpu_allocator='"pytorch"' if gpu else "null")]
    if encoder == "bert":
        parts.append(_BERT.format(name=name, frozen=_bool(frozen), mixed_precision=mixed_precision))
        if not frozen:
            parts.append(_BERT_OPTIMIZER.format(name=name))
    else:
        parts.append(_ELMO.format(name=name, mixed_precision=mixed_precision))
        if not frozen:
            parts[-1] = parts[-1].replace("frozen = true", "frozen = false")
    listener_block = _LISTENER_LAST if listener == "last" else _LISTENER_MIX
    for task in tasks:
        parts.append(_NER if task == "ner" else _TEXTCAT)
        parts.append(listener_block.format(pipe=task, upstream=name))
    config = Config().from_str("\n".join(parts), interpolate=False)
    overrides: Dict[str, Optional[str]] = {
        "encoder": encoder_path,
        "elmo_options": elmo_options,
        "elmo_weights": elmo_weights,
    }
    for key, value in overrides.items():
        if value is not None:
            config["paths"][key] = str(value)
    return config


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _list(items) -> str:
    return "[" + ",".join(f'"{item}"' for item in items) + "]"
