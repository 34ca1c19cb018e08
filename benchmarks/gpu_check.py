"""GPU check (issue 10 part 2): one run that prints what a lent GPU should tell us.

(a) the GPU tests (``pytest -m gpu``); (b) words/s of ``ctx_bert`` vs
spacy-transformers (if importable) vs a raw Hugging Face ``AutoModel`` forward at
bert-base size (random weights with bert-base's config), fp32 and bf16, on the
BBC corpus cut to ~60 words per document; (c) model FLOP utilisation (MFU) of
the encoder forward: matmul FLOPs of the padded batches ÷ time ÷ the GPU's
dense bf16 peak; (d) ctx_elmo words/s on random weights of the published
"small" ELMo shape; (e) the saving of computing no layer above the highest one
needed (the last layer vs a middle one).

Everything runs in this one process (the GPU tests in a pytest subprocess), so
the rows share the warm device; each row is warmed up on the first documents
before it is timed. ``--cpu-smoke`` runs the same code on the CPU with a tiny
model and few documents (GPU-only parts print ``skipped: no CUDA``), to check the
script without a GPU. Results go to ``<work-dir>/gpu_check.json``.

Usage::

    bash benchmarks/gpu_check.sh                  # on a GPU machine, < 6 minutes
    bash benchmarks/gpu_check.sh --cpu-smoke      # anywhere, < 1 minute
    python benchmarks/gpu_check.py --peak-tflops 989 --n-docs 2000
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no per-load progress bars

import torch  # noqa: E402

#: Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a substring of
#: ``torch.cuda.get_device_name()``; first match wins (H100 PCIe before H100 SXM).
PEAK_BF16_TFLOPS: Tuple[Tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / HBM3
    ("A100", 312.0),
    ("L4", 121.0),
)
BERT_BASE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, max_position_embeddings=512,
)
TINY_BERT = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    intermediate_size=128, max_position_embeddings=128,
)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_STAMP = "gpu_check_model.json"


def log(message: str = "") -> None:
    print(message, flush=True)


def peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU named ``device_name`` from :data:`PEAK_BF16_TFLOPS`."""
    for key, value in PEAK_BF16_TFLOPS:
        if key == "L4" and "L40" in device_name:
            continue
        if key in device_name:
            return value
    return None


def encoder_flops(config: Any, shapes: Sequence[Tuple[int, int]]) -> float:
    """Matmul FLOPs (2 per multiply-add) of a BERT-shaped encoder forward over padded
    batches of ``(rows, positions)``: per layer and position the q/k/v/output
    projections (8·h²) and the feed-forward (4·h·i), per layer and batch the
    scores and the weighted sum (4·rows·positions²·h). Embeddings, norms and
    softmax are left out (under 1% at bert-base size)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    positions = sum(rows * length for rows, length in shapes)
    attention = sum(rows * length * length for rows, length in shapes)
    return float(n * (positions * (8 * h * h + 4 * h * i) + 4 * attention * h))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- inputs ----------------------------------------------------------------------------------
def corpus(n_docs: int, n_words: int) -> Tuple[List[str], str]:
    """The first ``n_docs`` BBC articles (synthetic text without the package), each cut to
    its first ``n_words`` whitespace words."""
    from make_corpus import build_corpus

    records, source = build_corpus(n_docs)
    texts = [" ".join(r["text"].split()[:n_words]) for r in records]
    return texts, source


def bert_model(work_dir: Path, shape: Dict[str, int]) -> Tuple[Path, str]:
    """A BERT checkpoint with random weights and ``shape``, written once into
    ``work_dir`` (reused while its stamp matches), with bert-base-uncased's vocabulary
    from the MiniLM package if installed (else the tests' tiny tokenizer)."""
    from tests.bert_utils import minilm_dir
    from tests.tiny_models import write_tiny_model

    tokenizer_dir = minilm_dir()
    vocab = "bert-base-uncased vocabulary (all-MiniLM-L6-v2's files)" if tokenizer_dir else "tiny test tokenizer"
    path = work_dir / ("bert_" + "_".join(str(shape[k]) for k in sorted(shape)))
    stamp = {"shape": shape, "vocab": vocab, "version": 1}
    try:
        if json.loads((path / MODEL_STAMP).read_text()) == stamp:
            return path, vocab
    except (OSError, ValueError):
        pass
    shutil.rmtree(path, ignore_errors=True)
    overrides = dict(shape)
    if tokenizer_dir:
        overrides["vocab_size"] = 30522
    write_tiny_model("bert", path, **overrides)
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, path / name)
    (path / MODEL_STAMP).write_text(json.dumps(stamp))
    return path, vocab


def count_words(texts: Sequence[str]) -> int:
    """Non-whitespace tokens of spaCy's blank English tokenizer (the same for every row)."""
    import spacy

    nlp = spacy.blank("en")
    return sum(sum(1 for t in doc if not t.is_space) for doc in nlp.pipe(texts))


def timed(run: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


# -- (a) -------------------------------------------------------------------------------------
def gpu_tests(args: argparse.Namespace, has_cuda: bool) -> Dict[str, Any]:
    if not has_cuda:
        log("(a) GPU tests: skipped: no CUDA")
        return {"skipped": "no CUDA"}
    log("(a) GPU tests: python -m pytest -q -m gpu tests/")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.test_timeout)
    except subprocess.TimeoutExpired:
        log(f"    timed out after {args.test_timeout} s")
        return {"timed_out": args.test_timeout}
    tail = (result.stdout + result.stderr).strip().splitlines()[-25:]
    for line in tail:
        log("    " + line)
    return {"returncode": result.returncode, "tail": tail}


# -- (b) rows --------------------------------------------------------------------------------
def setup_ctx_bert(model: Path, device: torch.device, precision: Optional[str], args) -> Callable:
    import spacy

    nlp = spacy.blank("en")
    cfg: Dict[str, Any] = {"name": str(model), "device": str(device)}
    if precision:
        cfg["mixed_precision"] = precision
    nlp.add_pipe("ctx_bert", config={"model": cfg, "store": "last", "max_batch_tokens": args.max_batch_tokens})
    nlp.initialize()

    def run(texts: List[str]) -> None:
        for _ in nlp.pipe(texts, batch_size=args.batch_size):
            pass

    return run


def setup_spacy_transformers(model: Path, device: torch.device, precision: Optional[str], args) -> Callable:
    import spacy

    if importlib.util.find_spec("spacy_transformers") is None:
        raise RuntimeError("not installed")
    if precision == "bf16":
        raise RuntimeError("n/a (spacy-transformers' mixed_precision is fp16 autocast)")
    if device.type == "cuda":
        spacy.require_gpu()
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "transformer",
        config={
            "model": {
                "@architectures": "spacy-transformers.TransformerModel.v3",
                "name": str(model),
                "tokenizer_config": {"use_fast": True},
                "mixed_precision": precision == "fp16",
            },
            "max_batch_items": args.max_batch_tokens,
        },
    )
    nlp.initialize()

    def run(texts: List[str]) -> None:
        for _ in nlp.pipe(texts, batch_size=args.batch_size):
            pass

    return run


def setup_hf_raw(model: Path, device: torch.device, precision: Optional[str], args) -> Callable:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model), use_fast=True)
    hf = AutoModel.from_pretrained(str(model)).to(device).eval()
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        if precision == "bf16" else contextlib.nullcontext
    )

    def run(texts: List[str]) -> None:
        with torch.inference_mode(), autocast():
            for start in range(0, len(texts), args.batch_size):
                batch = tokenizer(texts[start : start + args.batch_size], padding=True, truncation=True,
                                  max_length=512, return_tensors="pt")
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                hf(**batch).last_hidden_state.float().cpu()

    return run


ROWS = {"ctx_bert": setup_ctx_bert, "spacy_transformers": setup_spacy_transformers, "hf_raw": setup_hf_raw}


def throughput(args, model: Path, texts: List[str], n_words: int, device: torch.device) -> List[Dict]:
    log(f"(b) words/s on {len(texts)} docs, {n_words} words, device {device}")
    rows: List[Dict[str, Any]] = []
    for precision in (None, "bf16"):
        for name, setup in ROWS.items():
            row: Dict[str, Any] = {"system": name, "precision": precision or "fp32"}
            try:
                run = setup(model, device, precision, args)
            except Exception as err:  # a missing package, no cupy, ...
                row["skipped"] = str(err) or type(err).__name__
                rows.append(row)
                continue
            try:
                run(texts[: args.warmup])
                seconds = timed(lambda: run(texts), device)
                row.update(seconds=seconds, words_per_s=n_words / seconds)
            except Exception as err:  # report it and go on with the other rows
                row["skipped"] = f"failed: {type(err).__name__}: {err}"[:300]
            rows.append(row)
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()
    by = {(r["system"], r["precision"]): r.get("words_per_s") for r in rows}
    log(f"    {'system':<20} {'precision':<9} {'words/s':>10} {'vs hf_raw':>9} {'vs spacy-trf':>12}")
    for row in rows:
        if "skipped" in row:
            log(f"    {row['system']:<20} {row['precision']:<9} {'skipped: ' + row['skipped']}")
            continue
        hf = by.get(("hf_raw", row["precision"]))
        trf = by.get(("spacy_transformers", row["precision"])) or by.get(("spacy_transformers", "fp32"))
        ratio_hf = f"{row['words_per_s'] / hf:.2f}x" if hf else "-"
        ratio_trf = f"{row['words_per_s'] / trf:.2f}x" if trf else "-"
        log(f"    {row['system']:<20} {row['precision']:<9} {row['words_per_s']:>10,.0f} {ratio_hf:>9} {ratio_trf:>12}")
    return rows


# -- (c) MFU -----------------------------------------------------------------------------------
def mfu(args, model: Path, texts: List[str], device: torch.device, has_cuda: bool) -> Dict[str, Any]:
    """Time the encoder forward alone over the batches ctx_bert builds for ``texts``."""
    import spacy

    from spacy_ctx.backends.bert import TransformerBackend

    backend = TransformerBackend.from_pretrained(model, name=str(model)).to(device).eval()
    docs = [spacy.blank("en").make_doc(t) for t in texts]
    shapes = backend.batch_shapes(docs, max_batch_tokens=args.max_batch_tokens)
    flops = encoder_flops(backend.encoder.config, shapes)
    # The same padded batches as encode_docs (ids do not change the cost; pad id 0 rows
    # are masked like real padding would be).
    gen = torch.Generator().manual_seed(0)
    batches = []
    for rows, length in shapes:
        ids = torch.randint(1000, 2000, (rows, length), generator=gen).to(device)
        batches.append((ids, torch.ones_like(ids, dtype=torch.bool)))
    peak = args.peak_tflops
    name = torch.cuda.get_device_name(device) if has_cuda else "cpu"
    if peak is None and has_cuda:
        peak = peak_tflops(name)
    result: Dict[str, Any] = {"device_name": name, "peak_bf16_tflops": peak, "flops_per_pass": flops,
                              "batches": len(shapes), "padded_positions": sum(r * n for r, n in shapes)}
    log(f"(c) model FLOP utilisation of the encoder forward ({len(shapes)} batches, "
        f"{result['padded_positions']:,} padded positions, {flops / 1e12:.3f} TFLOP per pass)")
    for precision in (None, "bf16"):
        backend.mixed_precision = precision

        def run() -> None:
            with torch.inference_mode(), backend.autocast():
                for ids, mask in batches:
                    backend.encoder(ids, mask)

        run()  # warm-up
        seconds = min(timed(run, device) for _ in range(args.mfu_repeats))
        achieved = flops / seconds / 1e12
        key = precision or "fp32"
        result[key] = {"seconds": seconds, "achieved_tflops": achieved}
        if peak:
            result[key]["mfu"] = achieved / peak
            log(f"    {key:<5} {achieved:8.2f} TFLOP/s = {100 * achieved / peak:5.1f}% of {peak:g} "
                f"(dense bf16 peak of {name})")
        else:
            why = "no CUDA" if not has_cuda else f"unknown peak for {name!r}; pass --peak-tflops"
            log(f"    {key:<5} {achieved:8.3f} TFLOP/s; MFU skipped: {why}")
    return result


# -- (d) ELMo ------------------------------------------------------------------------------------
def elmo(args, texts: List[str], device: torch.device) -> Dict[str, Any]:
    import spacy

    import elmo_weights

    preset = "tiny" if args.cpu_smoke else "small"
    options = elmo_weights.PRESETS[preset]
    options_path, weights_path, _ = elmo_weights.ensure_random_elmo(args.work_dir / f"elmo_{preset}", options)
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.add_pipe("ctx_elmo", config={
        "model": {"options": str(options_path), "weights": str(weights_path), "device": str(device)},
        "store": "all", "max_batch_tokens": args.max_batch_tokens,
    })
    nlp.initialize()
    texts = texts[: args.elmo_docs]
    n_words = count_words(texts)

    def run(batch: List[str]) -> None:
        for _ in nlp.pipe(batch, batch_size=args.batch_size):
            pass

    run(texts[: args.warmup])
    seconds = timed(lambda: run(texts), device)
    log(f"(d) ELMo ({preset} shape, random weights): {n_words / seconds:,.0f} words/s "
        f"({len(texts)} docs, {n_words} words, {seconds:.2f} s, device {device})")
    return {"preset": preset, "docs": len(texts), "words": n_words, "seconds": seconds,
            "words_per_s": n_words / seconds}


# -- (e) stop early --------------------------------------------------------------------------------
def stop_early(args, model: Path, texts: List[str], device: torch.device) -> Dict[str, Any]:
    import spacy

    from spacy_ctx.backends.bert import TransformerBackend

    backend = TransformerBackend.from_pretrained(model, name=str(model)).to(device).eval()
    docs = [spacy.blank("en").make_doc(t) for t in texts]
    n = backend.encoder.n_layers
    result: Dict[str, Any] = {}
    for label, keep in (("last layer", [n - 1]), ("middle layer", [n // 2])):
        def run() -> None:
            with torch.inference_mode():
                backend.encode_docs(docs, max_batch_tokens=args.max_batch_tokens, keep_layers=keep)

        run()
        seconds = min(timed(run, device) for _ in range(args.mfu_repeats))
        result[label] = {"layer": backend.layer_names[keep[0]], "seconds": seconds}
    saving = 1 - result["middle layer"]["seconds"] / result["last layer"]["seconds"]
    result["saving"] = saving
    log(f"(e) stop early: encoding up to {result['middle layer']['layer']} takes "
        f"{result['middle layer']['seconds']:.3f} s vs {result['last layer']['seconds']:.3f} s up to "
        f"{result['last layer']['layer']} ({100 * saving:.0f}% less)")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny model, few docs, on the CPU: checks the script without a GPU")
    parser.add_argument("--n-docs", type=int, default=None, help="documents (default 2000; 24 with --cpu-smoke)")
    parser.add_argument("--words-per-doc", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128, help="nlp.pipe batch size / HF texts per forward")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=64, help="documents run before timing each row")
    parser.add_argument("--mfu-repeats", type=int, default=3)
    parser.add_argument("--elmo-docs", type=int, default=None, help="documents for ELMo (default 1000; 12 smoke)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU (default: from the table of known GPUs)")
    parser.add_argument("--test-timeout", type=int, default=150, help="seconds for the GPU tests")
    parser.add_argument("--skip-tests", action="store_true", help="do not run (a)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check",
                        help="random checkpoints (written once) and gpu_check.json")
    args = parser.parse_args(argv)
    if args.n_docs is None:
        args.n_docs = 24 if args.cpu_smoke else 2000
    if args.elmo_docs is None:
        args.elmo_docs = 12 if args.cpu_smoke else 1000
    if args.cpu_smoke:
        args.warmup = min(args.warmup, 4)
        args.mfu_repeats = 1
        torch.set_num_threads(1)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    has_cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = torch.device("cuda:0" if has_cuda else "cpu")
    started = time.perf_counter()
    report: Dict[str, Any] = {"argv": sys.argv, "device": str(device), "torch": torch.__version__,
                              "cuda_available": torch.cuda.is_available()}
    if has_cuda:
        report["device_name"] = torch.cuda.get_device_name(device)
        log(f"GPU: {report['device_name']}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    elif not args.cpu_smoke:
        log("no CUDA device: every GPU part is skipped; the rows run on the CPU")

    report["gpu_tests"] = {"skipped": "--skip-tests"} if args.skip_tests else gpu_tests(args, has_cuda)
    texts, source = corpus(args.n_docs, args.words_per_doc)
    n_words = count_words(texts)
    shape = TINY_BERT if args.cpu_smoke else BERT_BASE
    model, vocab = bert_model(args.work_dir, shape)
    report.update(corpus=source, docs=len(texts), words=n_words, model=str(model), model_shape=shape, vocab=vocab)
    log(f"model: random weights, {shape} ({vocab}); corpus: {source}")
    report["throughput"] = throughput(args, model, texts, n_words, device)
    # One failing part must not hide the others' numbers.
    for key, part in (
        ("mfu", lambda: mfu(args, model, texts, device, has_cuda)),
        ("elmo", lambda: elmo(args, texts, device)),
        ("stop_early", lambda: stop_early(args, model, texts, device)),
    ):
        try:
            report[key] = part()
        except Exception as err:
            log(f"({key}) failed: {type(err).__name__}: {err}")
            report[key] = {"failed": f"{type(err).__name__}: {err}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - started
    out = args.work_dir / "gpu_check.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    log(f"done in {report['seconds']:.0f} s; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
