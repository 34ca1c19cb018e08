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
    # Whether ``name[key=value,...]`` variants may override its component/model settings.
    accepts_settings: bool = False


SYSTEMS: Dict[str, System] = {}


def register_system(
    name: str,
    *,
    requires: Sequence[Tuple[str, str]] = (),
    description: str = "",
    prepare: Optional[Callable[[argparse.Namespace], Dict[str, Any]]] = None,
    uses_hf_model: bool = True,
    accepts_settings: bool = False,
) -> Callable[[Callable[["WorkerOptions"], Loaded]], Callable[["WorkerOptions"], Loaded]]:
    """Decorator: add a row. ``setup(opts) -> Loaded`` runs in the worker process.

    ``prepare(args) -> dict`` (optional) runs once in the parent; the worker sees
    its result as ``opts.extra[name]``. The ELMo rows below are examples.
    ``accepts_settings``: the row takes ``name[key=value,...]`` overrides (its setup
    reads ``opts.settings``).
    """

    def decorate(setup):
        SYSTEMS[name] = System(name, setup, tuple(requires), description, prepare, uses_hf_model,
                               accepts_settings)
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
    # The row's overrides from its spec (``ctx_bert[mixed_precision=bf16]``); the
    # ``system`` field holds the whole spec, :func:`parse_spec` splits it.
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)
    payload_docs: int = 0  # DocBin bytes/doc over the first N texts (0: not measured)


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
# Row specs with settings: ctx_bert[mixed_precision=bf16,store_dtype=int8]
# ---------------------------------------------------------------------------------
#: The rows of ``--systems all``, in table order: our component plain and with each
#: speed/size option, the two references, then ELMo.
DEFAULT_ROWS = [
    "ctx_bert",
    "ctx_bert[mixed_precision=bf16]",
    "ctx_bert[mixed_precision=auto]",
    "ctx_bert[quantize=int8]",
    "ctx_bert[store_dtype=int8]",
    "spacy_transformers",
    "hf_raw",
    "ctx_elmo_tiny",
    "ctx_elmo_small",
]


def split_specs(text: str) -> List[str]:
    """Comma-separated row specs; commas inside ``[...]`` belong to the spec."""
    specs, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            specs.append(current.strip())
            current = ""
        else:
            current += char
    specs.append(current.strip())
    return [spec for spec in specs if spec]


def parse_value(text: str) -> Any:
    """A setting's value: null/none, true/false, an int, a float, a JSON list, else the string."""
    lowered = text.strip().lower()
    if lowered in ("null", "none"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def parse_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """``"ctx_bert[mixed_precision=bf16,store_dtype=int8]"`` -> ("ctx_bert", {...}).

    Raises ValueError for a malformed spec, an unknown row, or settings on a row that
    takes none.
    """
    spec = spec.strip()
    base, settings = spec, {}
    if "[" in spec:
        if not spec.endswith("]"):
            raise ValueError(f"row {spec!r}: settings go in brackets at the end, e.g. ctx_bert[quantize=int8]")
        base, inner = spec[:-1].split("[", 1)
        for item in split_specs(inner):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"row {spec!r}: {item!r} is not key=value")
            settings[key.strip()] = parse_value(value)
        if not settings:
            raise ValueError(f"row {spec!r}: empty brackets")
    if base not in SYSTEMS:
        raise ValueError(f"unknown system {base!r}; choose from {list(SYSTEMS)} (optionally with [key=value,...])")
    if settings and not SYSTEMS[base].accepts_settings:
        raise ValueError(f"row {spec!r}: {base} takes no settings")
    return base, settings


def split_settings(factory: str, settings: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Component settings (arguments of the spaCy factory ``factory``) and model settings
    (everything else, or keys written ``model.key``), from a row's overrides."""
    import spacy

    component_keys = set(spacy.blank("en").get_factory_meta(factory).default_config) - {"model"}
    component: Dict[str, Any] = {}
    model: Dict[str, Any] = {}
    for key, value in settings.items():
        if key.startswith("model."):
            model[key[len("model."):]] = value
        elif key in component_keys:
            component[key] = value
        else:
            model[key] = value
    return component, model


def rejected_setting_errors() -> Tuple[type, ...]:
    """Errors meaning "this setting is not accepted here" (the row is then skipped)."""
    errors: List[type] = []
    try:
        from thinc.api import ConfigValidationError

        errors.append(ConfigValidationError)
    except ImportError:
        pass
    try:
        from spacy_ctx.errors import ConfigError

        errors.append(ConfigError)
    except ImportError:
        pass
    return tuple(errors)


def add_pipe_or_skip(nlp: Any, factory: str, config: Dict[str, Any], settings: Dict[str, Any]) -> Any:
    """``nlp.add_pipe`` + ``nlp.initialize()``; a setting the installed spacy-ctx rejects
    (unknown key, bad value, not available on this device) raises :class:`Skip`."""
    try:
        nlp.add_pipe(factory, config=config)
        nlp.initialize()
    except rejected_setting_errors() as err:
        if not settings:
            raise
        first = " ".join(str(err).split())[:160]
        raise Skip(f"setting rejected ({', '.join(f'{k}={v}' for k, v in settings.items())}): {first}")
    return nlp.get_pipe(factory)


def docbin_bytes_per_doc(docs: List[Any], chunk: int = 25) -> float:
    """``len(DocBin(store_user_data=True).to_bytes())`` per Doc (msgpack + zlib, as a
    ``.spacy`` file), summed over DocBins of ``chunk`` Docs to bound memory."""
    from spacy.tokens import DocBin

    total = 0
    for start in range(0, len(docs), chunk):
        total += len(DocBin(store_user_data=True, docs=docs[start : start + chunk]).to_bytes())
    return total / max(1, len(docs))


def measure_payload(nlp: Any, texts: List[str], opts: "WorkerOptions", info: Dict[str, Any]) -> None:
    """DocBin bytes/doc of the first ``opts.payload_docs`` texts run through ``nlp``
    (outside timing; the worker records the peak RSS before this)."""
    if opts.payload_docs <= 0 or not texts:
        return
    subset = texts[: opts.payload_docs]
    docs = list(nlp.pipe(subset, batch_size=opts.batch_size))
    info["docbin_bytes_per_doc"] = docbin_bytes_per_doc(docs)
    info["payload_docs"] = len(docs)


# ---------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------
@register_system(
    "ctx_bert",
    requires=[("spacy", "spacy"), ("torch", "torch"), ("spacy_ctx", "spacy-ctx")],
    description="spacy_ctx ctx_bert component, store='last'",
    accepts_settings=True,
)
def setup_ctx_bert(opts: WorkerOptions) -> Loaded:
    """``ctx_bert`` with ``store="last"``; ``opts.settings`` (from ``ctx_bert[k=v,...]``)
    override component settings (``store_dtype``, ``store``, ``max_batch_tokens``, ...)
    and model settings (``mixed_precision``, ``quantize``, ``window``, ...)."""
    import spacy

    component_cfg, model_overrides = split_settings("ctx_bert", opts.settings)
    nlp = spacy.blank("en")
    model_cfg: Dict[str, Any] = {"name": opts.model}
    if opts.device == "cuda":
        model_cfg["device"] = "cuda:0"
    model_cfg.update(model_overrides)
    config = {"model": model_cfg, "store": "last", "max_batch_tokens": opts.max_batch_tokens,
              **component_cfg}
    pipe = add_pipe_or_skip(nlp, "ctx_bert", config, opts.settings)
    backend = pipe.backend
    settings = {k: v for k, v in config.items() if k != "model"}
    settings.update(model_overrides)
    settings.update(window=getattr(backend, "window", None), stride=getattr(backend, "stride", None))
    if hasattr(backend, "precision_info"):  # what mixed_precision resolved to here
        settings["precision"] = backend.precision_info()
    info: Dict[str, Any] = {"settings": settings, "versions": {"spacy-ctx": pkg_version("spacy-ctx")}}
    state: Dict[str, Any] = {}

    def process(texts: List[str]) -> None:
        for _ in nlp.pipe(texts, batch_size=opts.batch_size):
            pass
        state["texts"] = texts

    def finish() -> None:
        # What went through the encoder (outside timing), as the backend plans it.
        docs = [nlp.make_doc(text) for text in state["texts"]]
        info.update(bert_window_stats(backend, docs, opts.max_batch_tokens))
        measure_payload(nlp, state["texts"], opts, info)

    return Loaded(process, info, finish)


def bert_window_stats(backend: Any, docs: List[Any], max_batch_tokens: Optional[int] = None) -> Dict[str, int]:
    """``pieces``, ``sequences`` (windows) and ``encoded_positions`` (window pieces plus
    [CLS]/[SEP]) of ``docs``: what the backend's encode_docs feeds the encoder, as the
    backend reports it without running the model (``TransformerBackend.window_stats``).
    With ``max_batch_tokens`` also ``batches`` and ``padded_positions`` (for one call
    over all ``docs``; ``nlp.pipe`` batches by ``--batch-size`` docs first)."""
    stats = backend.window_stats(docs, max_batch_tokens=max_batch_tokens)
    row = {"pieces": stats["n_pieces"], "sequences": stats["n_windows"],
           "encoded_positions": stats["n_positions"]}
    if max_batch_tokens is not None and "n_batches" in stats:
        row.update(batches=stats["n_batches"], padded_positions=stats["n_padded_positions"])
    return row


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

    state: Dict[str, Any] = {}

    def process(texts: List[str]) -> None:
        positions = 0
        sequences = 0
        for doc in nlp.pipe(texts, batch_size=opts.batch_size):
            lengths = doc._.trf_data.wordpieces.lengths
            positions += int(sum(lengths))
            sequences += len(lengths)
        info["encoded_positions"] = positions
        info["sequences"] = sequences
        state["texts"] = texts

    return Loaded(process, info, lambda: measure_payload(nlp, state["texts"], opts, info))


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
    component_cfg, model_overrides = split_settings("ctx_elmo", opts.settings)
    model_cfg.update(model_overrides)
    config = {"model": model_cfg, "store": "all", "max_batch_tokens": opts.max_batch_tokens, **component_cfg}
    backend = add_pipe_or_skip(nlp, "ctx_elmo", config, opts.settings).backend  # loads the weights
    cache = backend.word_cache
    info: Dict[str, Any] = {
        "settings": {
            **{k: v for k, v in config.items() if k != "model"},
            **model_overrides,
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
        measure_payload(nlp, state["texts"], opts, info)

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
    accepts_settings=True,
)(setup_ctx_elmo)
register_system(
    "ctx_elmo_small",
    requires=ELMO_REQUIRES,
    description="spacy_ctx ctx_elmo, store='all', sentencizer; random weights, published 'small' "
                "options (2x1024 LSTM, proj 128, 2048 filters, 1 highway)",
    prepare=prepare_elmo_small,
    uses_hf_model=False,
    accepts_settings=True,
)(setup_ctx_elmo)


def missing_requirement(system: System) -> Optional[str]:
    for module, package in system.requires:
        try:
            if importlib.util.find_spec(module) is None:
                return f"skipped: {package} not installed"
        except (ImportError, ValueError):
            return f"skipped: {package} not installed"
    return None

