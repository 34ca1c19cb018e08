"""The throughput benchmark's report: rows merged over rounds, the table printed on
stdout, and the JSON results file (rows, settings, corpus and machine)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from systems import pkg_version  # noqa: E402


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
            name: pkg_version(name)
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


def finish_row(row: Dict[str, Any], words: int) -> Dict[str, Any]:
    """Add the per-word and per-doc rates to a merged row (in place; returned)."""
    if row.get("status") == "ok":
        row["words"] = words
        row["words_per_s"] = words / row["seconds"]
        row["docs_per_s"] = row["docs"] / row["seconds"]
        # The fastest pass: the least disturbed by other load on a shared machine.
        row["seconds_best"] = min(row["seconds_all"])
        row["words_per_s_best"] = words / row["seconds_best"]
    return row


def build_result(
    args: argparse.Namespace,
    *,
    model: Optional[Path],
    source: str,
    n_docs: int,
    words: int,
    n_warmup: int,
    rows: List[Dict[str, Any]],
) -> Dict[str, Any]:
    """The JSON document of one benchmark run."""
    return {
        "benchmark": "throughput",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.executable).name] + sys.argv,
        "model": str(model) if model is not None else None,
        "corpus": {"source": source, "docs": n_docs, "words": words,
                   "word_definition": "non-whitespace tokens of spacy.blank('en')"},
        "settings": {
            "batch_size": args.batch_size,
            "max_batch_tokens": args.max_batch_tokens,
            "device": args.device,
            "warmup_docs": n_warmup,
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


def write_result(result: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2), encoding="utf8")
