"""Training an ELMo biLM from raw text (``pretrain`` with ``objective = "elmo"``).

The model is :class:`~spacy_ctx.encoders.elmo.ElmoBiLM` (char CNN, highway,
projection, projection LSTMs with clipping and the residual connection) with the
shared softmax of :class:`~spacy_ctx.encoders.elmo_lm.ElmoLanguageModel`. Training
is sentence-level from a zero LSTM state, exactly how ``ctx_elmo`` runs inference:

1. raw text (``.jsonl``/``.txt``/``.spacy``) is split into sentences with spaCy's
   tokenizer for ``lang`` and the rule-based sentencizer; whitespace tokens are
   dropped (``ctx_elmo`` does not feed them either) and sentences longer than
   ``max_sentence_length`` tokens are cut;
2. the vocabulary (the softmax classes, :mod:`~spacy_ctx.training.lm_vocab`) is
   counted on the training sentences;
3. sentences framed as ``<S> ... </S>`` are packed into batches of at most
   ``batch_tokens`` padded positions, reshuffled every epoch (seeded);
4. each step embeds every distinct word of the batch once with the char CNN, runs
   both LSTM directions and takes the mean of the forward and backward token
   losses (full softmax up to ``full_softmax_max_vocab`` words, sampled softmax
   with ``n_samples`` log-uniform candidates above), clips the gradient norm and
   updates.

Optimizer: Adam with ``learn_rate`` 0.001 by default, which trains the tiny model
in a few hundred steps; ``optimizer = "adagrad"`` gives bilm-tf's choice (Adagrad,
learning rate 0.2, initial accumulator 1.0) for the large presets.

The table (and ``metrics.jsonl``) reports the training loss (with sampled
softmax: the sampled loss, lower than the full one), the forward and backward
held-out perplexity (always the full softmax) and training words/s.

Output (``OUTPUT/model-last`` after every evaluation, ``OUTPUT/model-best`` when
the held-out perplexity improved): ``options.json`` + ``weights.hdf5`` (the
bilm-tf/AllenNLP layout that ``ctx_elmo`` and AllenNLP read), ``vocab.txt``,
``softmax.safetensors`` (``softmax/W`` (vocab, projection_dim), ``softmax/b``)
and ``lm.json`` (tokenization settings and the held-out scores), so that
:func:`evaluate_lm` can compute perplexities on new text. ``OUTPUT/metrics.jsonl``
gets one line per evaluation; ``OUTPUT/checkpoint/state.pt`` (every
``checkpoint_frequency`` steps and at the end) lets ``resume=True`` continue
exactly where a run stopped (model, optimizer, random states, data position).
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..encoders.elmo import ElmoBiLM
from ..encoders.elmo_checkpoint import load_elmo, write_elmo_weights
from ..encoders.elmo_lm import ElmoLanguageModel
from ..encoders.elmo_options import ElmoOptions
from ..errors import CheckpointError, ConfigError
from ..pieces.chars import BOS_TOKEN, EOS_TOKEN, elmo_char_ids
from .corpus import is_heldout
from .lm_vocab import LmVocab, build_vocab

__all__ = [
    "ELMO_PRESETS",
    "ELMO_DEFAULTS",
    "ElmoPretrainSettings",
    "read_elmo_settings",
    "preset_options",
    "pretrain_elmo",
    "evaluate_lm",
    "load_language_model",
    "save_language_model",
]

PathLike = Union[str, Path]

_PUBLISHED_FILTERS = [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]]


def _options(dim: int, proj: int, filters: List[List[int]], n_highway: int, char_dim: int) -> Dict[str, Any]:
    return {
        "lstm": {
            "dim": dim,
            "projection_dim": proj,
            "n_layers": 2,
            "cell_clip": 3,
            "proj_clip": 3,
            "use_skip_connections": True,
        },
        "char_cnn": {
            "embedding": {"dim": char_dim},
            "filters": filters,
            "n_highway": n_highway,
            "activation": "relu",
            "n_characters": 262,
            "max_characters_per_token": 50,
        },
    }


#: ``options.json`` contents of every preset. ``small``, ``medium`` and ``original``
#: are the shapes of the published AllenNLP models (elmo_2x1024_128_2048cnn_1xhighway,
#: elmo_2x2048_256_2048cnn_1xhighway, elmo_2x4096_512_2048cnn_2xhighway); ``tiny``
#: trains on a CPU in minutes (tests, smoke runs).
ELMO_PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": _options(64, 16, [[1, 8], [2, 16], [3, 32]], 1, 8),
    "small": _options(1024, 128, _PUBLISHED_FILTERS, 1, 16),
    "medium": _options(2048, 256, _PUBLISHED_FILTERS, 1, 16),
    "original": _options(4096, 512, _PUBLISHED_FILTERS, 2, 16),
}

#: Every ``[pretraining]`` key an ELMo config may set, with its default.
ELMO_DEFAULTS: Dict[str, Any] = {
    "objective": "elmo",
    "preset": "small",
    "options": None,  # an options.json path or dict, merged over the preset
    "lang": "en",
    "text_key": "text",
    "max_chars": 1_000_000,
    "max_sentence_length": 100,
    "heldout_fraction": 0.05,
    "heldout_max_sentences": 2000,
    "vocab_min_count": 1,
    "vocab_max_size": 1_000_000,
    "full_softmax_max_vocab": 50_000,
    "n_samples": 8192,
    "batch_tokens": 4096,
    "max_steps": 10_000,
    "max_epochs": 0,
    "optimizer": "adam",
    "learn_rate": 0.001,
    "grad_clip": 10.0,
    "dropout": 0.1,
    "eval_frequency": 200,
    "checkpoint_frequency": 1000,
    "seed": 0,
}
_OPTIMIZERS = ("adam", "adagrad")
_PATH_KEYS = ("raw_text", "heldout")

SOFTMAX_FILE = "softmax.safetensors"
LM_FILE = "lm.json"
STATE_FILE = "state.pt"


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ElmoPretrainSettings:
    """Validated settings of an ELMo pretraining run (see :data:`ELMO_DEFAULTS`)."""

    raw_text: List[Path]
    heldout: Optional[List[Path]]
    options: Dict[str, Any]
    preset: str
    lang: str
    text_key: str
    max_chars: int
    max_sentence_length: int
    heldout_fraction: float
    heldout_max_sentences: int
    vocab_min_count: int
    vocab_max_size: int
    full_softmax_max_vocab: int
    n_samples: int
    batch_tokens: int
    max_steps: int
    max_epochs: int
    optimizer: str
    learn_rate: float
    grad_clip: Optional[float]
    dropout: float
    eval_frequency: int
    checkpoint_frequency: int
    seed: int

    def to_json(self) -> Dict[str, Any]:
        """JSON-friendly dict (paths as strings)."""
        data = asdict(self)
        data["raw_text"] = [str(p) for p in self.raw_text]
        data["heldout"] = None if self.heldout is None else [str(p) for p in self.heldout]
        return data


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def preset_options(preset: str, overrides: Union[None, PathLike, Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ``options.json`` dict of ``preset``, with ``overrides`` (a dict or an options
    file) merged over it, validated with :class:`ElmoOptions` (nothing allocated)."""
    if preset not in ELMO_PRESETS:
        raise ConfigError(f"[pretraining] preset must be one of {sorted(ELMO_PRESETS)}, got {preset!r}")
    extra: Mapping[str, Any] = {}
    source = f"preset {preset!r}"
    if isinstance(overrides, (str, Path)):
        path = Path(overrides)
        try:
            extra = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"[pretraining] options = {str(path)!r}: cannot read it as JSON ({exc})") from None
        if not isinstance(extra, Mapping):
            raise ConfigError(f"[pretraining] options = {str(path)!r} is not a JSON object")
        source = f"{path} (over preset {preset!r})"
    elif isinstance(overrides, Mapping):
        extra = overrides
        source = f"[pretraining] options (over preset {preset!r})"
    elif overrides is not None:
        raise ConfigError(f"[pretraining] options must be null, a path or a dict, got {overrides!r}")
    options = _deep_merge(ELMO_PRESETS[preset], extra)
    try:
        ElmoOptions.from_dict(options, source=source)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    return options


def _int(section: Mapping[str, Any], key: str, minimum: int) -> int:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"[pretraining] {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _float(section: Mapping[str, Any], key: str, low: float, high: float, *, open_low: bool = False) -> float:
    value = section[key]
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise ConfigError(f"[pretraining] {key} must be a number in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def _paths(value: Any, key: str) -> Optional[List[Path]]:
    if value is None or value == "":
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    paths: List[Path] = []
    for item in items:
        if not isinstance(item, (str, Path)):
            raise ConfigError(f"[paths] {key} must be a path or a list of paths, got {item!r}")
        paths.extend(Path(part.strip()) for part in str(item).split(",") if part.strip())
    for path in paths:
        if not path.exists():
            raise ConfigError(f"[paths] {key} = {str(path)!r} does not exist; pass --paths.{key} FILE")
    return paths or None


def read_elmo_settings(config: Mapping[str, Any]) -> ElmoPretrainSettings:
    """Validate a pretraining config (``[paths]`` + ``[pretraining]``) for ELMo.

    Every key is checked (type, range, unknown keys, the model options against
    :class:`ElmoOptions`' limits) before any text is read or tensor allocated.
    """
    if "pretraining" not in config:
        raise ConfigError("an ELMo pretraining config needs a [pretraining] section (see configs/pretrain_elmo.cfg)")
    paths = dict(config.get("paths") or {})
    section = dict(config["pretraining"])
    unknown = sorted(set(section) - set(ELMO_DEFAULTS) - set(_PATH_KEYS))
    if unknown:
        raise ConfigError(f"[pretraining] has unknown keys {unknown} for objective \"elmo\"; known: {sorted(ELMO_DEFAULTS)}")
    # Paths may sit in [paths] (the usual place) or in [pretraining].
    for key in _PATH_KEYS:
        if section.get(key) not in (None, ""):
            paths[key] = section.pop(key)
        section.pop(key, None)
    section = {**ELMO_DEFAULTS, **section}
    if section["objective"] != "elmo":
        raise ConfigError(f"[pretraining] objective must be \"elmo\" here, got {section['objective']!r}")
    preset = section["preset"]
    options = preset_options(preset, section["options"])
    lang = section["lang"]
    if not isinstance(lang, str) or not lang:
        raise ConfigError(f"[pretraining] lang must be a spaCy language code, got {lang!r}")
    text_key = section["text_key"]
    if not isinstance(text_key, str) or not text_key:
        raise ConfigError(f"[pretraining] text_key must be a non-empty string, got {text_key!r}")
    optimizer = section["optimizer"]
    if optimizer not in _OPTIMIZERS:
        raise ConfigError(f"[pretraining] optimizer must be one of {list(_OPTIMIZERS)}, got {optimizer!r}")
    grad_clip = section["grad_clip"]
    if grad_clip is not None:
        grad_clip = _float(section, "grad_clip", 0.0, float("inf")) or None
    dropout = section["dropout"]
    dropout = 0.0 if dropout is False else _float({"dropout": dropout}, "dropout", 0.0, 0.9)
    raw_text = _paths(paths.get("raw_text"), "raw_text")
    if raw_text is None:
        raise ConfigError("[paths] raw_text is not set; pass --paths.raw_text FILE (.jsonl, .txt or .spacy)")
    settings = ElmoPretrainSettings(
        raw_text=raw_text,
        heldout=_paths(paths.get("heldout"), "heldout"),
        options=options,
        preset=preset,
        lang=lang,
        text_key=text_key,
        max_chars=_int(section, "max_chars", 1),
        max_sentence_length=_int(section, "max_sentence_length", 1),
        heldout_fraction=_float(section, "heldout_fraction", 0.0, 0.5),
        heldout_max_sentences=_int(section, "heldout_max_sentences", 1),
        vocab_min_count=_int(section, "vocab_min_count", 1),
        vocab_max_size=_int(section, "vocab_max_size", 4),
        full_softmax_max_vocab=_int(section, "full_softmax_max_vocab", 1),
        n_samples=_int(section, "n_samples", 1),
        batch_tokens=_int(section, "batch_tokens", 2),
        max_steps=_int(section, "max_steps", 1),
        max_epochs=_int(section, "max_epochs", 0),
        optimizer=optimizer,
        learn_rate=_float(section, "learn_rate", 0.0, 10.0, open_low=True),
        grad_clip=grad_clip,
        dropout=dropout,
        eval_frequency=_int(section, "eval_frequency", 1),
        checkpoint_frequency=_int(section, "checkpoint_frequency", 1),
        seed=_int(section, "seed", 0),
    )
    if settings.batch_tokens < settings.max_sentence_length + 2:
        raise ConfigError(
            f"[pretraining] batch_tokens ({settings.batch_tokens}) must hold one sentence of "
            f"max_sentence_length ({settings.max_sentence_length}) plus <S> and </S>"
        )
    return settings


# --------------------------------------------------------------------------
# Text -> sentences
# --------------------------------------------------------------------------


def _read_texts(paths: Sequence[Path], text_key: str, max_chars: int) -> Iterable[str]:
    """Document texts of ``paths`` (:func:`spacy_ctx.training.corpus.read_raw_texts`:
    bad lines skipped and counted, over-long lines cut at whitespace)."""
    from wasabi import msg

    from .corpus import read_raw_texts

    raw = read_raw_texts(list(paths), text_key=text_key, max_chars=max_chars)
    if raw.stats.skipped or raw.stats.chunked_lines:
        msg.warn(f"{', '.join(str(p) for p in paths)}: {raw.stats.summary()}")
    return raw.texts()


def split_sentences(texts: Iterable[str], lang: str, max_length: int,
                    max_chars: int = 1_000_000) -> Iterator[List[str]]:
    """Tokenized sentences of ``texts`` (spaCy tokenizer for ``lang`` + sentencizer).

    Whitespace tokens are dropped and sentences longer than ``max_length`` tokens are
    cut into pieces of at most ``max_length``. Texts may be up to ``max_chars``
    long (the reader cuts longer ones), even above spaCy's default ``max_length``.
    """
    import spacy

    try:
        nlp = spacy.blank(lang)
    except Exception:
        raise ConfigError(f"[pretraining] lang = {lang!r} is not a language spaCy knows (e.g. \"en\", \"xx\")") from None
    nlp.max_length = max(nlp.max_length, max_chars + 1)
    nlp.add_pipe("sentencizer")
    for doc in nlp.pipe(texts, batch_size=64):
        for sent in doc.sents:
            words = [token.text for token in sent if not token.is_space]
            for start in range(0, len(words), max_length):
                yield words[start : start + max_length]


# --------------------------------------------------------------------------
# Encoded data
# --------------------------------------------------------------------------


class WordTable:
    """Distinct word strings -> char ids and vocabulary ids; sentences as word-type ids.

    Types 0 and 1 are ``<S>`` and ``</S>``. The char CNN reads every type's own
    characters; the softmax target is the type's vocabulary id (``<UNK>`` for rare words).
    """

    def __init__(self, vocab: LmVocab) -> None:
        self.vocab = vocab
        self.index: Dict[str, int] = {}
        self.words: List[str] = []
        for word in (BOS_TOKEN, EOS_TOKEN):
            self.add(word)

    def add(self, word: str) -> int:
        index = self.index.get(word)
        if index is None:
            index = self.index[word] = len(self.words)
            self.words.append(word)
        return index

    def encode(self, sentence: Sequence[str]) -> np.ndarray:
        """``<S> sentence </S>`` as int32 type ids."""
        return np.array([0, *(self.add(w) for w in sentence), 1], dtype=np.int32)

    def freeze(self) -> None:
        """Build the char-id and vocabulary-id tables once every word was added."""
        self.char_ids = elmo_char_ids(self.words).astype(np.int16)  # ids < 262
        self.vocab_ids = np.array([self.vocab.id_of(w) for w in self.words], dtype=np.int64)


@dataclass
class Batch:
    """One padded batch: char ids of its distinct words and (B, T) rows into them."""

    char_ids: torch.Tensor  # (W, 50)
    rows: torch.Tensor  # (B, T) index into char_ids
    lengths: torch.Tensor  # (B,)
    token_ids: torch.Tensor  # (B, T) vocabulary ids (targets)
    n_words: int  # words without the boundaries


def make_batch(table: WordTable, sentences: Sequence[np.ndarray], device: torch.device) -> Batch:
    """Pad ``sentences`` (type ids) into a :class:`Batch`."""
    lengths = np.array([len(s) for s in sentences], dtype=np.int64)
    types = np.zeros((len(sentences), int(lengths.max())), dtype=np.int64)
    for row, sentence in enumerate(sentences):
        types[row, : len(sentence)] = sentence
    distinct, rows = np.unique(types, return_inverse=True)
    rows = rows.reshape(types.shape)
    return Batch(
        char_ids=torch.from_numpy(table.char_ids[distinct].astype(np.int64)).to(device),
        rows=torch.from_numpy(rows).to(device),
        lengths=torch.from_numpy(lengths).to(device),
        token_ids=torch.from_numpy(table.vocab_ids[types]).to(device),
        n_words=int(lengths.sum()) - 2 * len(sentences),
    )


def pack_batches(lengths: Sequence[int], batch_tokens: int, order: Sequence[int]) -> List[List[int]]:
    """Batches of sentence indices (taken in ``order``, then sorted by length so
    padding is small) whose padded size ``len(batch) * longest`` fits ``batch_tokens``."""
    by_length = sorted(order, key=lambda i: -lengths[i])  # stable: ties keep ``order``
    batches: List[List[int]] = []
    current: List[int] = []
    longest = 0
    for index in by_length:
        size = lengths[index]
        if current and (len(current) + 1) * max(longest, size) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


def _epoch_batches(lengths: Sequence[int], batch_tokens: int, seed: int, epoch: int) -> List[List[int]]:
    """The batches of one epoch: composition and order both reshuffled with (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = pack_batches(lengths, batch_tokens, order)
    rng.shuffle(batches)
    return batches


def batch_losses(model: ElmoLanguageModel, batch: Batch, *, full: bool = False,
                 generator: Optional[torch.Generator] = None):
    """Forward and backward summed losses of ``batch`` (each distinct word embedded once)."""
    table = model.bilm.token_embeddings(batch.char_ids)
    return model.losses(table[batch.rows], batch.lengths, batch.token_ids, full=full, generator=generator)


@torch.no_grad()
def perplexities(model: ElmoLanguageModel, table: WordTable, sentences: Sequence[np.ndarray],
                 batch_tokens: int, device: torch.device) -> Dict[str, float]:
    """Forward and backward perplexity (full softmax) of ``sentences``.

    Every sentence contributes its words and ``</S>`` (forward) or ``<S>``
    (backward): ``n_tokens`` predictions per direction.
    """
    was_training = model.training
    model.eval()
    forward = backward = 0.0
    n_tokens = 0
    lengths = [len(s) for s in sentences]
    for indices in pack_batches(lengths, batch_tokens, range(len(sentences))):
        losses = batch_losses(model, make_batch(table, [sentences[i] for i in indices], device), full=True)
        forward += float(losses.forward_sum)
        backward += float(losses.backward_sum)
        n_tokens += losses.n_predictions
    model.train(was_training)
    if n_tokens == 0:
        return {"forward_ppl": float("nan"), "backward_ppl": float("nan"), "n_tokens": 0}
    return {
        "forward_ppl": math.exp(forward / n_tokens),
        "backward_ppl": math.exp(backward / n_tokens),
        "n_tokens": n_tokens,
    }


# --------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------


def save_language_model(model: ElmoLanguageModel, vocab: LmVocab, options: Mapping[str, Any],
                        directory: PathLike, info: Mapping[str, Any]) -> Path:
    """Write ``options.json``, ``weights.hdf5``, ``vocab.txt``, ``softmax.safetensors`` and
    ``lm.json`` into ``directory`` (replaced atomically enough: a temporary folder is
    written first, then renamed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "options.json").write_text(json.dumps(options, indent=2) + "\n", encoding="utf-8")
    write_elmo_weights(model.bilm, options, tmp / "weights.hdf5")
    vocab.to_file(tmp / "vocab.txt")
    save_file(
        {
            "softmax/W": model.softmax.weight.detach().cpu().contiguous(),
            "softmax/b": model.softmax.bias.detach().cpu().contiguous(),
        },
        str(tmp / SOFTMAX_FILE),
        metadata={"format": "spacy_ctx.elmo_softmax.v1"},
    )
    (tmp / LM_FILE).write_text(json.dumps(dict(info), indent=2) + "\n", encoding="utf-8")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def load_language_model(model_dir: PathLike, device: Union[str, torch.device, None] = None
                        ) -> Tuple[ElmoLanguageModel, LmVocab, Dict[str, Any]]:
    """Load a folder written by :func:`save_language_model`: (model, vocab, lm.json)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    for name in ("options.json", "weights.hdf5", "vocab.txt", SOFTMAX_FILE):
        if not (model_dir / name).is_file():
            raise CheckpointError(
                f"{model_dir}: '{name}' is missing. evaluate-lm needs a folder written by "
                "ELMo pretraining (OUTPUT/model-last or model-best)."
            )
    bilm = load_elmo(model_dir / "options.json", model_dir / "weights.hdf5")
    vocab = LmVocab.from_file(model_dir / "vocab.txt")
    source = str(model_dir / SOFTMAX_FILE)
    expected = {"softmax/W": (len(vocab), bilm.options.projection_dim), "softmax/b": (len(vocab),)}
    with safe_open(source, framework="pt") as handle:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        for name, shape in expected.items():
            if shapes.get(name) != shape:
                raise CheckpointError(
                    f"{source}: tensor '{name}' has shape {shapes.get(name)}, expected {shape} "
                    f"(vocab.txt has {len(vocab)} words, projection_dim {bilm.options.projection_dim})."
                )
        weight, bias = handle.get_tensor("softmax/W"), handle.get_tensor("softmax/b")
    info: Dict[str, Any] = {}
    if (model_dir / LM_FILE).is_file():
        info = json.loads((model_dir / LM_FILE).read_text(encoding="utf-8"))
    model = ElmoLanguageModel(bilm, len(vocab))
    with torch.no_grad():
        model.softmax.weight.copy_(weight)
        model.softmax.bias.copy_(bias)
    if device is not None:
        model.to(device)
    return model.eval(), vocab, info


def _device(gpu_id: int) -> torch.device:
    if gpu_id is None or gpu_id < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--gpu-id {gpu_id}: no CUDA device is available; use --gpu-id -1 for the CPU")
    return torch.device(f"cuda:{gpu_id}")


def evaluate_lm(model_dir: PathLike, heldout_path: PathLike, *, gpu_id: int = -1,
                batch_tokens: int = 4096) -> Dict[str, float]:
    """Forward and backward perplexity of an ELMo LM folder on held-out text.

    ``heldout_path`` is raw text like the training input (``.jsonl``, ``.txt``,
    ``.spacy``), split into sentences with the run's ``lang`` and
    ``max_sentence_length`` (from ``lm.json``). Returns ``forward_ppl``,
    ``backward_ppl`` (full softmax) and ``n_tokens`` (predictions per direction:
    the words plus ``</S>`` or ``<S>`` of every sentence).
    """
    device = _device(gpu_id)
    model, vocab, info = load_language_model(model_dir, device)
    heldout_path = Path(heldout_path)
    if not heldout_path.exists():
        raise ConfigError(f"held-out text {str(heldout_path)!r} does not exist")
    lang = info.get("lang", "en")
    max_length = int(info.get("max_sentence_length", 100))
    max_chars = int(info.get("max_chars", 1_000_000))
    texts = _read_texts([heldout_path], info.get("text_key", "text"), max_chars)
    table = WordTable(vocab)
    sentences = [table.encode(s) for s in split_sentences(texts, lang, max_length, max_chars) if s]
    if not sentences:
        raise ConfigError(f"{heldout_path}: no sentences (the file has no text)")
    table.freeze()
    return perplexities(model, table, sentences, max(batch_tokens, max_length + 2), device)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def _options_json(settings: ElmoPretrainSettings, vocab_size: int, n_samples: Optional[int],
                  n_train_tokens: int) -> Dict[str, Any]:
    """options.json: the model options plus bilm-tf's training keys (readers ignore them)."""
    options = copy.deepcopy(settings.options)
    options["lstm"]["use_skip_connections"] = True
    options.update(
        {
            "bidirectional": True,
            "n_tokens_vocab": vocab_size,
            "dropout": settings.dropout,
            "all_clip_norm_val": settings.grad_clip,
            "n_train_tokens": n_train_tokens,
            "share_embedding_softmax": False,
        }
    )
    if n_samples is not None:
        options["n_negative_samples_batch"] = n_samples
    return options


def _make_optimizer(model: torch.nn.Module, settings: ElmoPretrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adagrad":
        # bilm-tf: Adagrad with initial accumulator 1.0 (lr 0.2 for the published models).
        return torch.optim.Adagrad(model.parameters(), lr=settings.learn_rate, initial_accumulator_value=1.0)
    return torch.optim.Adam(model.parameters(), lr=settings.learn_rate)


class _Log:
    """The table printed every ``eval_frequency`` steps (like ``spacy pretrain``)."""

    COLUMNS = ("Step", "Epoch", "Train loss", "Fwd ppl", "Bwd ppl", "Words/s")
    WIDTHS = (8, 6, 11, 10, 10, 9)

    def __init__(self) -> None:
        from wasabi import Printer

        self.msg = Printer()
        self.started = False

    def row(self, values: Sequence[Any]) -> None:
        if not self.started:
            self.msg.row(self.COLUMNS, widths=self.WIDTHS)
            self.msg.row(["-" * w for w in self.WIDTHS], widths=self.WIDTHS)
            self.started = True
        self.msg.row([str(v) for v in values], widths=self.WIDTHS)


def pretrain_elmo(config: Mapping[str, Any], output: PathLike, *, resume: bool = False,
                  gpu_id: int = -1) -> Dict[str, Any]:
    """Train an ELMo biLM from raw text and write ``output/model-last`` and ``model-best``.

    Args:
        config: the loaded pretraining config (``[paths]`` and ``[pretraining]``,
            interpolated), e.g. ``configs/pretrain_elmo.cfg`` with overrides.
        output: the run's folder (created).
        resume: continue from ``output/checkpoint/state.pt`` (same config and
            text): the result equals an uninterrupted run's on CPU.
        gpu_id: CUDA device, -1 for the CPU.

    Returns:
        A summary: ``step``, ``best`` (held-out scores of model-best), ``last``
        (latest evaluation), ``vocab_size``, ``n_train_sentences``,
        ``n_heldout_sentences``, ``softmax`` ("full" or "sampled") and ``model``
        (the trained :class:`ElmoLanguageModel`, in eval mode: what model-last holds).
    """
    settings = read_elmo_settings(config)  # everything checked before reading data
    device = _device(gpu_id)
    output = Path(output)
    state_path = output / "checkpoint" / STATE_FILE
    if resume and not state_path.is_file():
        raise ConfigError(f"--resume: {state_path} does not exist; start the run without --resume")
    output.mkdir(parents=True, exist_ok=True)
    metrics_path = output / "metrics.jsonl"
    if not resume and metrics_path.exists():
        metrics_path.unlink()  # a fresh run in an old folder: its rows only

    # -- data ------------------------------------------------------------------
    texts = _read_texts(settings.raw_text, settings.text_key, settings.max_chars)
    train_words = [
        s for s in split_sentences(texts, settings.lang, settings.max_sentence_length, settings.max_chars) if s
    ]
    if settings.heldout is not None:
        heldout_texts = _read_texts(settings.heldout, settings.text_key, settings.max_chars)
        heldout_words = [
            s
            for s in split_sentences(heldout_texts, settings.lang, settings.max_sentence_length, settings.max_chars)
            if s
        ]
    else:
        # Split by a seeded hash of each sentence (corpus.is_heldout): identical
        # sentences land on the same side, so repeated text does not leak.
        keep, heldout_words = [], []
        for words in train_words:
            side = heldout_words if is_heldout(" ".join(words), settings.heldout_fraction, settings.seed) else keep
            side.append(words)
        # Held-out sentences beyond the cap go back to training.
        keep.extend(heldout_words[settings.heldout_max_sentences :])
        train_words = keep
    heldout_words = heldout_words[: settings.heldout_max_sentences]
    if not train_words:
        raise ConfigError(
            f"[paths] raw_text {[str(p) for p in settings.raw_text]}: no training sentences "
            "(the files are empty or hold no text)"
        )
    vocab = build_vocab(train_words, min_count=settings.vocab_min_count, max_size=settings.vocab_max_size)
    table = WordTable(vocab)
    train = [table.encode(s) for s in train_words]
    heldout = [table.encode(s) for s in heldout_words]
    del train_words, heldout_words
    table.freeze()
    lengths = [len(s) for s in train]
    n_train_tokens = sum(lengths) - 2 * len(train)

    n_samples = settings.n_samples if len(vocab) > settings.full_softmax_max_vocab else None
    options = _options_json(settings, len(vocab), n_samples, n_train_tokens)
    info_base = {
        "lang": settings.lang,
        "max_sentence_length": settings.max_sentence_length,
        "text_key": settings.text_key,
        "max_chars": settings.max_chars,
        "preset": settings.preset,
        "softmax": "full" if n_samples is None else "sampled",
    }

    # -- model -----------------------------------------------------------------
    torch.manual_seed(settings.seed)
    bilm = ElmoBiLM(ElmoOptions.from_dict(options, source=f"preset {settings.preset!r}"))
    model = ElmoLanguageModel(bilm, len(vocab), n_samples=n_samples, dropout=settings.dropout).to(device)
    optimizer = _make_optimizer(model, settings)
    sampler_rng = torch.Generator().manual_seed(settings.seed)

    step, epoch, position = 0, 0, 0
    best: Optional[Dict[str, Any]] = None
    if resume:
        # On the CPU: random states must stay CPU tensors; load_state_dict moves the rest.
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["vocab"] != vocab.words or _resumable(state["settings"]) != _resumable(settings.to_json()):
            raise ConfigError(
                f"--resume: {state_path} was written with other settings or text; resume with the "
                "same config and raw text, or start a new run in another folder"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler_rng.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, epoch, position, best = state["step"], state["epoch"], state["position"], state["best"]

    def save_state() -> None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sampler_rng": sampler_rng.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "step": step,
                "epoch": epoch,
                "position": position,
                "best": best,
                "vocab": vocab.words,
                "settings": settings.to_json(),
            },
            tmp,
        )
        tmp.replace(state_path)

    # -- loop ------------------------------------------------------------------
    from tqdm import tqdm

    log = _Log()
    batches = _epoch_batches(lengths, settings.batch_tokens, settings.seed, epoch)
    loss_sum, loss_steps, words, train_seconds = 0.0, 0, 0, 0.0
    last: Optional[Dict[str, Any]] = None
    model.train()
    progress = tqdm(total=settings.max_steps, initial=step, desc="ELMo", leave=False, disable=None,
                    file=sys.stderr)

    def evaluate_and_save() -> Dict[str, Any]:
        nonlocal best, loss_sum, loss_steps, words, train_seconds
        scores = perplexities(model, table, heldout, settings.batch_tokens, device) if heldout else {}
        row = {
            "step": step,
            "epoch": epoch,
            "train_loss": loss_sum / max(loss_steps, 1),
            "forward_ppl": scores.get("forward_ppl"),
            "backward_ppl": scores.get("backward_ppl"),
            "heldout_tokens": scores.get("n_tokens", 0),
            "words_per_second": words / train_seconds if train_seconds > 0 else 0.0,
        }
        with open(metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        log.row([step, epoch, f"{row['train_loss']:.4f}", fmt(row["forward_ppl"]),
                 fmt(row["backward_ppl"]), f"{row['words_per_second']:.0f}"])
        save_language_model(model, vocab, options, output / "model-last", {**info_base, **row})
        score, best_score = _mean_ppl(row), None if best is None else _mean_ppl(best)
        # Without held-out text there is nothing to compare: model-best follows model-last.
        if score is None or best_score is None or score < best_score:
            best = dict(row)
            save_language_model(model, vocab, options, output / "model-best", {**info_base, **row})
        loss_sum, loss_steps, words, train_seconds = 0.0, 0, 0, 0.0
        return row

    def out_of_epochs() -> bool:
        return settings.max_epochs > 0 and epoch >= settings.max_epochs

    while step < settings.max_steps and not out_of_epochs():
        if position >= len(batches):
            epoch, position = epoch + 1, 0
            if out_of_epochs():
                break
            batches = _epoch_batches(lengths, settings.batch_tokens, settings.seed, epoch)
        started = time.perf_counter()
        batch = make_batch(table, [train[i] for i in batches[position]], device)
        losses = batch_losses(model, batch, generator=sampler_rng)
        loss = losses.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        loss_value = float(loss.detach())
        train_seconds += time.perf_counter() - started
        if not math.isfinite(loss_value):
            raise ConfigError(
                f"ELMo training diverged at step {step + 1} (loss {loss_value}); lower "
                "[pretraining] learn_rate or set grad_clip"
            )
        step, position = step + 1, position + 1
        loss_sum, loss_steps, words = loss_sum + loss_value, loss_steps + 1, words + batch.n_words
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.3f}")
        final = step >= settings.max_steps
        if step % settings.eval_frequency == 0 or final:
            last = evaluate_and_save()
        if step % settings.checkpoint_frequency == 0 or final:
            save_state()
    progress.close()
    if step > 0 and (last is None or last["step"] != step):
        # Stopped by max_epochs between two evaluations.
        last = evaluate_and_save()
        save_state()
    return {
        "step": step,
        "best": best,
        "last": last,
        "vocab_size": len(vocab),
        "n_train_sentences": len(train),
        "n_heldout_sentences": len(heldout),
        "softmax": info_base["softmax"],
        "model": model.eval(),
    }


def _resumable(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings a resumed run must share with the run it continues (it may run
    longer, evaluate or checkpoint at other intervals)."""
    free = ("max_steps", "max_epochs", "eval_frequency", "checkpoint_frequency")
    return {k: v for k, v in settings.items() if k not in free}


def _mean_ppl(scores: Mapping[str, Any]) -> Optional[float]:
    """Geometric mean of the two perplexities (exp of the mean loss), None without held-out text."""
    forward, backward = scores.get("forward_ppl"), scores.get("backward_ppl")
    if forward is None or backward is None:
        return None
    return math.sqrt(forward * backward)
