"""The throughput benchmark's rows: what each system loads and runs.

A row ("system") is registered with :func:`register_system`; its ``setup(opts)``
runs inside the row's worker subprocess (``benchmarks/worker.py``), loads the
model and returns a :class:`Loaded` whose ``process(texts)`` the worker times.
An optional ``prepare(args)`` runs once in the parent (e.g. to write random
ELMo weights). Rows: ``ctx_bert``, ``spacy_transformers``, ``hf_raw``,
``ctx_elmo_tiny``, ``ctx_elmo_small`` (see ``benchmarks/throughput.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import elmo_weights  # noqa: E402  (benchmarks/elmo_weights.py, beside this file)


class Skip(Exception):
    """Raised by a setup when its row cannot run here (reported, not an error)."""


# ---------------------------------------------------------------------------------
# The system registry
# ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Loaded:
    """What a system's setup returns (inside its worker subprocess).

    ``process(texts)`` runs the whole system over a list of texts; the worker
    times it. ``info`` is merged into the row (settings, versions, ...);
    ``process`` may add counters to it, e.g. ``encoded_positions``.
    """

    process: Callable[[List[str]], None]
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)
    finish: Optional[Callable[[], None]] = None  # called once after timing


@dataclasses.dataclass
class System:
    name: str
    setup: Callable[["WorkerOptions"], Loaded]
    requires: Tuple[Tuple[str, str], ...]  # (import name, pip package name)
    description: str = ""
    # Runs once in the parent before the row's workers (e.g. to write weight
    # files); gets the parsed arguments, returns a JSON-able dict that the
    # worker finds in ``opts.extra[name]``. Its time is not part of the row.
    prepare: Optional[Callable[[argparse.Namespace], Dict[str, Any]]] = None
    uses_hf_model: bool = True  # whether the row reads --model


SYSTEMS: Dict[str, System] = {}


def register_system(
    name: str,
    *,
    requires: Sequence[Tuple[str, str]] = (),
    description: str = "",
    prepare: Optional[Callable[[argparse.Namespace], Dict[str, Any]]] = None,
    uses_hf_model: bool = True,
) -> Callable[[Callable[["WorkerOptions"], Loaded]], Callable[["WorkerOptions"], Loaded]]:
    """Decorator: add a row. ``setup(opts) -> Loaded`` runs in the worker process.

    ``prepare(args) -> dict`` (optional) runs once in the parent; the worker sees
    its result as ``opts.extra[name]``. The ELMo rows below are examples.
    """

    def decorate(setup):
        SYSTEMS[name] = System(name, setup, tuple(requires), description, prepare, uses_hf_model)
        return setup

    return decorate


@dataclasses.dataclass
class WorkerOptions:
    """Everything a worker needs; sent as JSON to the subprocess."""

    system: str
    model: str
    texts_path: str
    n_warmup: int
    batch_size: int
    max_batch_tokens: int
    device: str
    threads: Optional[int]
    repeats: int
    trf_window: int
    trf_stride: int
    hf_max_length: int
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


def consume(docs) -> int:
    """Run a generator of Docs to the end (for ``process`` functions); returns the count."""
    n = 0
    for _ in docs:
        n += 1
    return n


def pkg_version(dist: str) -> Optional[str]:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------
@register_system(
    "ctx_bert",
    requires=[("spacy", "spacy"), ("torch", "torch"), ("spacy_ctx", "spacy-ctx")],
    description="spacy_ctx ctx_bert component, store='last'",
)
def setup_ctx_bert(opts: WorkerOptions) -> Loaded:
    import spacy

    nlp = spacy.blank("en")
    model_cfg: Dict[str, Any] = {"name": opts.model}
    if opts.device == "cuda":
        model_cfg["device"] = "cuda:0"
    nlp.add_pipe(
        "ctx_bert",
        config={"model": model_cfg, "store": "last", "max_batch_tokens": opts.max_batch_tokens},
    )
    nlp.initialize()
    backend = nlp.get_pipe("ctx_bert").backend
    info: Dict[str, Any] = {
        "settings": {
            "store": "last",
            "max_batch_tokens": opts.max_batch_tokens,
            "window": getattr(backend, "window", None),
            "stride": getattr(backend, "stride", None),
        },
        "versions": {"spacy-ctx": pkg_version("spacy-ctx")},
    }
    state: Dict[str, Any] = {}

    def process(texts: List[str]) -> None:
        for _ in nlp.pipe(texts, batch_size=opts.batch_size):
            pass
        state["texts"] = texts

    def finish() -> None:
        # What went through the encoder (outside timing), as the backend plans it.
        docs = [nlp.make_doc(text) for text in state["texts"]]
        info.update(bert_window_stats(backend, docs))

    return Loaded(process, info, finish)


def bert_window_stats(backend: Any, docs: List[Any]) -> Dict[str, int]:
    """``pieces``, ``sequences`` (windows) and ``encoded_positions`` (window pieces plus
    [CLS]/[SEP]) of ``docs``: what the backend's encode_docs feeds the encoder, as the
    backend reports it without running the model (``TransformerBackend.window_stats``)."""
    stats = backend.window_stats(docs)
    return {"pieces": stats["n_pieces"], "sequences": stats["n_windows"],
            "encoded_positions": stats["n_positions"]}


@register_system(
    "spacy_transformers",
    requires=[("spacy", "spacy"), ("torch", "torch"), ("transformers", "transformers"),
              ("spacy_transformers", "spacy-transformers")],
    description="spacy-transformers 'transformer' component, TransformerModel.v3 on the same model dir",
)
def setup_spacy_transformers(opts: WorkerOptions) -> Loaded:
    import spacy

    if opts.device == "cuda":
        try:
            spacy.require_gpu()
        except Exception as err:  # cupy missing, or no GPU for thinc
            raise Skip(f"spaCy GPU ops unavailable ({err}); spacy-transformers needs cupy on GPU")
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "transformer",
        config={
            "model": {
                "@architectures": "spacy-transformers.TransformerModel.v3",
                "name": opts.model,
                "tokenizer_config": {"use_fast": True},
                "get_spans": {
                    "@span_getters": "spacy-transformers.strided_spans.v1",
                    "window": opts.trf_window,
                    "stride": opts.trf_stride,
                },
            },
            "max_batch_items": opts.max_batch_tokens,
        },
    )
    nlp.initialize()
    info: Dict[str, Any] = {
        "settings": {
            "span_getter": f"strided_spans.v1 window={opts.trf_window} stride={opts.trf_stride} (spaCy tokens)",
            "max_batch_items": opts.max_batch_tokens,
        },
        "versions": {
            "spacy-transformers": pkg_version("spacy-transformers"),
            "transformers": pkg_version("transformers"),
        },
    }

    def process(texts: List[str]) -> None:
        positions = 0
        sequences = 0
        for doc in nlp.pipe(texts, batch_size=opts.batch_size):
            lengths = doc._.trf_data.wordpieces.lengths
            positions += int(sum(lengths))
            sequences += len(lengths)
        info["encoded_positions"] = positions
        info["sequences"] = sequences

    return Loaded(process, info)


@register_system(
    "hf_raw",
    requires=[("torch", "torch"), ("transformers", "transformers")],
    description="transformers.AutoModel forward, fast tokenizer, truncation at 512",
)
def setup_hf_raw(opts: WorkerOptions) -> Loaded:
    import torch
    from transformers import AutoModel, AutoTokenizer

    device = torch.device("cuda:0" if opts.device == "cuda" else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(opts.model, use_fast=True)
    model = AutoModel.from_pretrained(opts.model).to(device).eval()
    max_length = min(opts.hf_max_length, int(getattr(model.config, "max_position_embeddings", 512)))
    info: Dict[str, Any] = {
        "settings": {
            "max_length": max_length,
            "batching": f"{opts.batch_size} texts per forward, corpus order, padded to longest",
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        },
        "versions": {"transformers": pkg_version("transformers")},
    }

    def process(texts: List[str]) -> None:
        positions = padded = truncated = 0
        with torch.inference_mode():
            for start in range(0, len(texts), opts.batch_size):
                batch = tokenizer(
                    texts[start : start + opts.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                truncated += sum(1 for enc in batch.encodings if enc.overflowing)
                mask = batch["attention_mask"]
                positions += int(mask.sum())
                padded += mask.numel()
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden = model(**batch).last_hidden_state
                hidden.float().cpu()
        info["encoded_positions"] = positions
        info["padded_positions"] = padded
        info["sequences"] = len(texts)
        info["truncated_docs"] = truncated

    return Loaded(process, info)


ELMO_REQUIRES = [("spacy", "spacy"), ("torch", "torch"), ("spacy_ctx", "spacy-ctx"), ("h5py", "h5py")]


def _elmo_summary(options_path: Path) -> Dict[str, Any]:
    options = json.loads(Path(options_path).read_text(encoding="utf8"))
    lstm, cnn = options["lstm"], options["char_cnn"]
    return {
        "n_layers": lstm["n_layers"],
        "lstm_dim": lstm["dim"],
        "projection_dim": lstm["projection_dim"],
        "n_filters_total": sum(n for _, n in cnn["filters"]),
        "n_highway": cnn["n_highway"],
        "char_embedding_dim": cnn["embedding"]["dim"],
        "n_parameters": elmo_weights.n_parameters(options),
    }


def _random_elmo(args: argparse.Namespace, preset: str) -> Dict[str, Any]:
    directory = Path(args.elmo_cache) / f"elmo_{preset}"
    start = time.perf_counter()
    options_path, weights_path, generated = elmo_weights.ensure_random_elmo(
        directory, elmo_weights.PRESETS[preset], seed=args.elmo_seed
    )
    if generated:
        print(f"  wrote random ELMo '{preset}' to {directory} ({time.perf_counter() - start:.1f} s)", flush=True)
    return {
        "options": str(options_path),
        "weights": str(weights_path),
        "weights_source": f"random (benchmarks/elmo_weights.py preset '{preset}', seed {args.elmo_seed}, "
                          f"scale {elmo_weights.DEFAULT_SCALE})",
    }


def prepare_elmo_tiny(args: argparse.Namespace) -> Dict[str, Any]:
    fixture = Path(args.elmo_fixture)
    # Like tests/elmo_utils.py: the fixture folder itself or a folder holding it.
    for folder in (fixture, fixture / "elmo-allennlp-fixture"):
        options, weights = folder / "options.json", folder / "lm_weights.hdf5"
        if options.is_file() and weights.is_file():
            return {"options": str(options), "weights": str(weights),
                    "weights_source": f"AllenNLP ELMo test fixture ({folder})"}
    print(f"  no ELMo fixture at {fixture}: using random weights of its shapes", flush=True)
    return _random_elmo(args, "tiny")


def prepare_elmo_small(args: argparse.Namespace) -> Dict[str, Any]:
    return _random_elmo(args, "small")


def setup_ctx_elmo(opts: WorkerOptions) -> Loaded:
    """``spacy.blank("en")`` + ``sentencizer`` + ``ctx_elmo`` (store="all") on the files
    that the row's ``prepare`` put in ``opts.extra[opts.system]``."""
    import spacy

    files = opts.extra[opts.system]
    try:  # registered through spacy-ctx's entry points
        spacy.registry.architectures.get("spacy_ctx.ElmoEncoder.v1")
    except Exception:
        raise Skip("spacy_ctx.ElmoEncoder.v1 is not registered: this environment's spacy-ctx install "
                   f"has stale entry points; run pip install -e {REPO_ROOT} --no-deps")
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    model_cfg: Dict[str, Any] = {"options": files["options"], "weights": files["weights"]}
    if opts.device == "cuda":
        model_cfg["device"] = "cuda:0"
    nlp.add_pipe(
        "ctx_elmo",
        config={"model": model_cfg, "store": "all", "max_batch_tokens": opts.max_batch_tokens},
    )
    nlp.initialize()
    backend = nlp.get_pipe("ctx_elmo").backend  # loads the weights if still lazy
    cache = backend.word_cache
    info: Dict[str, Any] = {
        "settings": {
            "store": "all",
            "max_batch_tokens": opts.max_batch_tokens,
            "chunk_size": backend.chunk_size,
            "cache_size": backend.cache_size,
            "sentences": "sentencizer",
        },
        "elmo": {**_elmo_summary(Path(files["options"])), "weights_source": files["weights_source"],
                 "options_path": files["options"], "weights_path": files["weights"]},
        "versions": {"spacy-ctx": pkg_version("spacy-ctx"), "h5py": pkg_version("h5py")},
        "position_unit": "tokens incl. <S>/</S>",
    }
    passes: List[Dict[str, int]] = []  # one per process() call: warm-up (if any), then timed passes
    state: Dict[str, Any] = {}

    def process(texts: List[str]) -> None:
        hits, misses = cache.hits, cache.misses
        for _ in nlp.pipe(texts, batch_size=opts.batch_size):
            pass
        passes.append({"docs": len(texts), "hits": cache.hits - hits, "misses": cache.misses - misses})
        state["texts"] = texts

    def finish() -> None:
        # Word-embedding cache: lookups count once per distinct word per encoder batch.
        timed = passes[-max(1, opts.repeats):]
        hits, misses = sum(p["hits"] for p in timed), sum(p["misses"] for p in timed)
        info["word_cache"] = {
            "timed_hits": hits,
            "timed_misses": misses,
            "timed_hit_rate": hits / (hits + misses) if hits + misses else None,
            "per_pass": passes[:],
            "cumulative": cache.stats,  # warm-up included
        }
        # What the biLM ran over (outside timing): sentences/chunks and their tokens.
        with nlp.select_pipes(enable=["sentencizer"]):
            docs = list(nlp.pipe(state["texts"], batch_size=opts.batch_size))
        info.update(elmo_segment_stats(backend, docs))

    return Loaded(process, info, finish)


def elmo_segment_stats(backend: Any, docs: List[Any]) -> Dict[str, int]:
    """``sequences`` (sentences/chunks) and ``encoded_positions`` (their tokens plus
    <S> and </S> each) of ``docs``, as the ELMo backend itself counts them."""
    stats = backend.segment_stats(docs)
    return {"sequences": stats["n_segments"], "encoded_positions": stats["n_positions"]}


register_system(
    "ctx_elmo_tiny",
    requires=ELMO_REQUIRES,
    description="spacy_ctx ctx_elmo, store='all', sentencizer; AllenNLP test fixture (proj 16, LSTM 64) or random of its shapes",
    prepare=prepare_elmo_tiny,
    uses_hf_model=False,
)(setup_ctx_elmo)
register_system(
    "ctx_elmo_small",
    requires=ELMO_REQUIRES,
    description="spacy_ctx ctx_elmo, store='all', sentencizer; random weights, published 'small' "
                "options (2x1024 LSTM, proj 128, 2048 filters, 1 highway)",
    prepare=prepare_elmo_small,
    uses_hf_model=False,
)(setup_ctx_elmo)


def missing_requirement(system: System) -> Optional[str]:
    for module, package in system.requires:
        try:
            if importlib.util.find_spec(module) is None:
                return f"skipped: {package} not installed"
        except (ImportError, ValueError):
            return f"skipped: {package} not installed"
    return None

