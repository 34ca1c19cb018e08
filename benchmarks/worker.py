"""The throughput benchmark's worker: one subprocess per row, which loads, warms up,
times and measures one system.

The parent calls :func:`run_row`, which writes the row's :class:`WorkerOptions` as
JSON and starts ``python benchmarks/worker.py JOB.json RESULT.json`` with the same
interpreter, offline. The subprocess (:func:`worker_main`) runs the system's setup
(``benchmarks/systems.py``), a warm-up on the first ``n_warmup`` texts (not timed),
then ``repeats`` timed passes over all texts, and writes the row as JSON: wall and
CPU seconds of each pass, load and warm-up times, its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``), RSS after loading, load average, and on
CUDA the peak GPU memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from systems import SYSTEMS, Skip, WorkerOptions, missing_requirement, parse_spec  # noqa: E402

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
MIB = 1024 * 1024


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
    """Load, warm up, time and measure one row; ``opts.system`` is its spec
    (``ctx_bert`` or ``ctx_bert[mixed_precision=bf16]``)."""
    row: Dict[str, Any] = {"system": opts.system, "device": opts.device}
    base, settings = parse_spec(opts.system)
    if settings:
        row["overrides"] = settings
    opts = dataclasses.replace(opts, system=base, settings=settings)
    system = SYSTEMS[base]
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
    # Peak RSS of loading and the timed passes, before finish() (its payload
    # measurement holds many Docs at once).
    peak_rss = _peak_rss_mib()
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
        peak_rss_mib=peak_rss,
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


def run_row(name: str, opts: WorkerOptions, timeout: float, tmp: Path, verbose: bool) -> Dict[str, Any]:
    """Run one row (``name`` is its spec) in a fresh subprocess (in the parent); returns
    its row dict."""
    missing = missing_requirement(SYSTEMS[parse_spec(name)[0]])
    if missing:
        return {"system": name, "device": opts.device, "status": missing}
    slug = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
    job = tmp / f"{slug}.job.json"
    result = tmp / f"{slug}.result.json"
    job.write_text(json.dumps(dataclasses.asdict(dataclasses.replace(opts, system=name))), encoding="utf8")
    env = {**os.environ, **OFFLINE_ENV}
    cmd = [sys.executable, str(Path(__file__).resolve()), str(job), str(result)]
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


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: worker.py JOB.json RESULT.json (started by benchmarks/throughput.py)")
    worker_main(Path(sys.argv[1]), Path(sys.argv[2]))
