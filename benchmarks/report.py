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


#: (row key, title, format); ratios are words/s over the reference row's words/s.
COLUMNS = [
    ("system", "system", "{}"),
    ("docs", "docs", "{}"),
    ("words", "words", "{}"),
    ("seconds", "seconds", "{:.2f}"),
    ("words_per_s", "words/s", "{:.0f}"),
    ("ratio_vs_spacy_transformers", "x spacy-trf", "{:.2f}"),
    ("ratio_vs_hf_raw", "x HF", "{:.2f}"),
    ("words_per_s_best", "best words/s", "{:.0f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
    ("docbin_bytes_per_doc", "DocBin B/doc", "{:,.0f}"),
    ("cpu_seconds", "cpu s", "{:.1f}"),
    ("torch_threads", "threads", "{}"),
    ("device", "device", "{}"),
]
#: Reference rows of the ratio columns: (row name, key suffix).
REFERENCES = [("spacy_transformers", "spacy_transformers"), ("hf_raw", "hf_raw")]


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """``ratio_vs_<ref>`` (median words/s over the reference's) and
    ``ratio_best_vs_<ref>`` (fastest pass over fastest pass) on every ok row, for each
    reference row (spacy-transformers, raw HF) that ran in this job; in place."""
    by_name = {r["system"]: r for r in rows if r.get("status") == "ok"}
    for ref_name, key in REFERENCES:
        ref = by_name.get(ref_name)
        if ref is None:
            continue
        for row in by_name.values():
            row[f"ratio_vs_{key}"] = row["words_per_s"] / ref["words_per_s"]
            row[f"ratio_best_vs_{key}"] = row["words_per_s_best"] / ref["words_per_s_best"]
            if row.get("docbin_bytes_per_doc") and ref.get("docbin_bytes_per_doc"):
                row[f"payload_ratio_vs_{key}"] = row["docbin_bytes_per_doc"] / ref["docbin_bytes_per_doc"]


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
    if row.get("batches"):
        parts.append(f"{row['batches']} batches (in one call), {row['padded_positions']} padded positions")
    if row.get("docbin_bytes_per_doc"):
        parts.append(f"DocBin {row['docbin_bytes_per_doc']:,.0f} bytes/doc over {row['payload_docs']} docs")
    if row.get("settings", {}).get("precision"):
        precision = row["settings"]["precision"]
        parts.append(f"precision {precision.get('precision')} ({precision.get('reason')})")
    if row.get("peak_gpu_mib") is not None:
        parts.append(f"peak GPU {row['peak_gpu_mib']:.0f} MiB")
    return f"{row['system']}: " + ", ".join(parts)


def format_table(rows: List[Dict[str, Any]]) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    notes = []
    for row in rows:
        if row.get("status") != "ok":
            cells.append([row["system"]] + ["-"] * (len(COLUMNS) - 2) + [row.get("device", "-")])
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
            "payload_docs": getattr(args, "payload_docs", None),
            "max_words": getattr(args, "max_words", None),
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


# -- chart -------------------------------------------------------------------------------
def write_chart(result: Dict[str, Any], path: Path) -> Path:
    """A PNG with one horizontal bar panel each for words/s (median pass; the ratios to
    spacy-transformers and raw HF written beside the bars), peak RSS and DocBin
    bytes/doc, over the rows that ran. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    skipped = [f"{r['system']}: {r.get('status')}" for r in result["rows"] if r.get("status") != "ok"]
    names = [r["system"] for r in rows][::-1]  # first row on top
    panels = [("words_per_s", "words/s (median pass)"), ("peak_rss_mib", "peak RSS (MiB)"),
              ("docbin_bytes_per_doc", "DocBin bytes/doc")]
    panels = [p for p in panels if any(r.get(p[0]) for r in rows)]
    height = 1.2 + 0.42 * max(1, len(rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), height), squeeze=False)
    colours = ["#1f77b4" if n.startswith("ctx_") else "#7f7f7f" for n in names]
    for ax, (key, title) in zip(axes[0], panels):
        values = [r.get(key) or 0 for r in rows][::-1]
        bars = ax.barh(names, values, color=colours)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.tick_params(axis="x", labelsize=8)
        top = max(values) if values else 1
        ax.set_xlim(0, top * (1.55 if key == "words_per_s" else 1.25))
        for bar, row in zip(bars, rows[::-1]):
            if key == "words_per_s":
                ratios = [f"{row[k]:.2f}x {label}" for k, label in
                          (("ratio_vs_spacy_transformers", "st"), ("ratio_vs_hf_raw", "HF")) if k in row]
                label = f"{row[key]:,.0f}" + (f"  ({', '.join(ratios)})" if ratios else "")
            else:
                label = f"{row.get(key):,.0f}" if row.get(key) else "-"
            ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, label,
                    va="center", fontsize=7)
    corpus = result.get("corpus", {})
    machine = result.get("machine", {})
    title = (f"{corpus.get('docs')} docs, {corpus.get('words')} words; "
             f"{Path(str(result.get('model') or '')).parent.name or 'model'}; "
             f"{machine.get('cpu_model') or ''} ({machine.get('cpu_count')} CPUs), "
             f"device {result.get('settings', {}).get('device')}, {result.get('timestamp', '')}")
    fig.suptitle(title, fontsize=8)
    if skipped:
        fig.text(0.01, 0.005, "not run: " + "; ".join(skipped)[:400], fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.04 if skipped else 0, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_chart_anywhere(json_path: Path, png_path: Path) -> str:
    """Write the chart of ``json_path`` with this interpreter's matplotlib, else with the
    repository's ``.venv`` (e.g. when run from a benchmark venv without matplotlib);
    returns a line saying what happened."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        venv_python = REPO_ROOT / ".venv" / "bin" / "python"
        if venv_python.is_file() and Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve():
            proc = subprocess.run([str(venv_python), str(Path(__file__).resolve()), "--chart", str(json_path),
                                   "--out", str(png_path)], capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                return f"wrote {png_path} (matplotlib of {venv_python})"
            return f"no chart: {venv_python} failed: {(proc.stderr or '').strip().splitlines()[-1:]}"
        return "no chart: matplotlib is not installed (pip install matplotlib, or run: " \
               f"python benchmarks/report.py --chart {json_path})"
    result = json.loads(Path(json_path).read_text(encoding="utf8"))
    return f"wrote {write_chart(result, png_path)}"


def main(argv: Optional[List[str]] = None) -> int:
    """``python benchmarks/report.py --chart RESULT.json [--out CHART.png]``: the chart of a
    saved result (default: beside the JSON), and its table on stdout."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--chart", type=Path, required=True, help="a throughput.py JSON result")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: the JSON's, .png)")
    args = parser.parse_args(argv)
    result = json.loads(args.chart.read_text(encoding="utf8"))
    print(format_table(result["rows"]))
    print(f"wrote {write_chart(result, args.out or args.chart.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
