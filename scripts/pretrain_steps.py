#!/usr/bin/env python
"""The pretraining steps of the ``pretrain`` workflow, timed and recorded.

    python scripts/pretrain_steps.py mlm          [--gpu-id N]   # continue MLM on the embedded MiniLM
    python scripts/pretrain_steps.py elmo         [--gpu-id N]   # train an ELMo biLM from scratch
    python scripts/pretrain_steps.py random-elmo                 # the control: random ELMo, same shape

Each reads the resolved pretraining settings (``corpus/pretrain/settings.json``, written by
``scripts/pretrain_text.py``) and the unlabeled train text (``corpus/pretrain/train.jsonl``;
``heldout.jsonl`` is the held-out slice of the train text), runs
``python -m spacy_ctx pretrain`` with ``configs/pretrain_mlm.cfg`` or
``configs/pretrain_elmo.cfg`` into ``training/pretrain/{mlm,elmo}``, then measures the
held-out score of ``model-last`` (``evaluate-lm``: MLM loss and pseudo-perplexity; ELMo
forward and backward perplexity) and writes ``metrics/pretrain_NAME.json``. Records carry
``corpus/settings.json`` so that ``scripts/results_table.py`` uses only those of the current
settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
MODES = ("mlm", "elmo", "random-elmo")
RECORD_NAMES = {"mlm": "mlm", "elmo": "elmo", "random-elmo": "elmo_random"}


def _read_json(path: Path, what: str) -> Dict[str, Any]:
    if not path.exists():
        raise SystemExit(f"{path} is missing: {what}")
    return json.loads(path.read_text(encoding="utf8"))


def mlm_command(settings: Dict[str, Any], text_dir: Path, output: Path, encoder: str,
                gpu_id: int = -1) -> List[str]:
    """``python -m spacy_ctx pretrain configs/pretrain_mlm.cfg ...`` for these settings."""
    steps = int(settings["mlm_steps"])
    cmd = [sys.executable, "-m", "spacy_ctx", "pretrain", str(ROOT / "configs" / "pretrain_mlm.cfg"), str(output),
           "--paths.raw_text", str(text_dir / "train.jsonl"), "--paths.heldout", str(text_dir / "heldout.jsonl"),
           "--paths.encoder", encoder, "--gpu-id", str(gpu_id),
           "--pretraining.max_steps", str(steps), "--pretraining.seed", str(settings.get("seed", 0))]
    optional = {"mlm_batch_size": "batch_size", "mlm_seq_len": "seq_len", "mlm_eval_frequency": "eval_frequency",
                "mlm_learn_rate": "learn_rate", "mlm_warmup_steps": "warmup_steps",
                "mlm_heldout_sequences": "heldout_max_sequences"}
    for key, name in optional.items():
        if settings.get(key):  # 0: the config's value
            cmd += [f"--pretraining.{name}", str(settings[key])]
    # one checkpoint at the end (a resumable state every N steps costs time on short runs)
    cmd += ["--pretraining.checkpoint_frequency", str(max(steps, 1))]
    return cmd


def elmo_command(settings: Dict[str, Any], text_dir: Path, output: Path, gpu_id: int = -1) -> List[str]:
    """``python -m spacy_ctx pretrain configs/pretrain_elmo.cfg ...`` for these settings."""
    steps = int(settings["elmo_steps"])
    cmd = [sys.executable, "-m", "spacy_ctx", "pretrain", str(ROOT / "configs" / "pretrain_elmo.cfg"), str(output),
           "--paths.raw_text", str(text_dir / "train.jsonl"), "--paths.heldout", str(text_dir / "heldout.jsonl"),
           "--gpu-id", str(gpu_id), "--pretraining.preset", str(settings["elmo_preset"]),
           "--pretraining.max_steps", str(steps), "--pretraining.seed", str(settings.get("seed", 0))]
    optional = {"elmo_batch_tokens": "batch_tokens", "elmo_eval_frequency": "eval_frequency",
                "elmo_learn_rate": "learn_rate", "elmo_vocab_size": "vocab_max_size",
                "elmo_heldout_sentences": "heldout_max_sentences"}
    for key, name in optional.items():
        if settings.get(key):
            cmd += [f"--pretraining.{name}", str(settings[key])]
    cmd += ["--pretraining.checkpoint_frequency", str(max(steps, 1))]
    return cmd


def read_metrics_rows(path: Path) -> List[Dict[str, Any]]:
    """The rows of a pretraining run's ``metrics.jsonl`` (empty when it is missing)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf8").splitlines() if line.strip()]


def _run(cmd: List[str]) -> float:
    print("+ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def run_mlm(settings: Dict[str, Any], text_dir: Path, out_dir: Path, encoder: str, gpu_id: int) -> Dict[str, Any]:
    """Continue MLM pretraining; held-out MLM loss before (step 0) and after."""
    from spacy_ctx.training.pretrain import evaluate_transformer_lm

    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = mlm_command(settings, text_dir, out_dir, encoder, gpu_id)
    seconds = _run(cmd)
    rows = read_metrics_rows(out_dir / "metrics.jsonl")
    model = out_dir / "model-last"
    scores = evaluate_transformer_lm(model, text_dir / "heldout.jsonl", seq_len=int(settings.get("mlm_seq_len") or 128),
                                     seed=int(settings.get("seed", 0)), gpu_id=gpu_id)
    first = rows[0] if rows else {}
    return {"kind": "mlm", "label": "MiniLM + in-domain MLM", "encoder": encoder, "model": str(model.relative_to(ROOT))
            if model.is_relative_to(ROOT) else str(model),
            "pretrain_seconds": round(seconds, 2), "steps": int(settings["mlm_steps"]),
            "heldout": {"loss": scores.get("loss"), "perplexity": scores.get("perplexity"),
                        "accuracy": scores.get("accuracy"), "sequences": scores.get("sequences"),
                        "loss_at_step_0": first.get("heldout_loss")},
            "curve": [{"step": r.get("step"), "heldout_loss": r.get("heldout_loss"), "loss": r.get("loss")} for r in rows],
            "command": " ".join(cmd)}


def run_elmo(settings: Dict[str, Any], text_dir: Path, out_dir: Path, gpu_id: int) -> Dict[str, Any]:
    """Train an ELMo biLM from scratch; held-out forward/backward perplexity."""
    from spacy_ctx.training.elmo_pretrain import evaluate_lm

    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = elmo_command(settings, text_dir, out_dir, gpu_id)
    seconds = _run(cmd)
    rows = read_metrics_rows(out_dir / "metrics.jsonl")
    model = out_dir / "model-last"
    scores = evaluate_lm(model, text_dir / "heldout.jsonl", gpu_id=gpu_id)
    info = json.loads((model / "lm.json").read_text(encoding="utf8")) if (model / "lm.json").exists() else {}
    return {"kind": "elmo", "label": "ELMo trained here", "preset": settings["elmo_preset"],
            "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model),
            "options": str(model / "options.json"), "weights": str(model / "weights.hdf5"),
            "pretrain_seconds": round(seconds, 2), "steps": int(settings["elmo_steps"]),
            "softmax": info.get("softmax"),
            "heldout": {"forward_ppl": scores.get("forward_ppl"), "backward_ppl": scores.get("backward_ppl"),
                        "tokens": scores.get("n_tokens")},
            "curve": [{"step": r.get("step"), "forward_ppl": r.get("forward_ppl"), "backward_ppl": r.get("backward_ppl"),
                       "train_loss": r.get("train_loss")} for r in rows],
            "command": " ".join(cmd)}


def write_random_like(options_path: Path, out_dir: Path, seed: int) -> Dict[str, Any]:
    """A random ELMo with the options (shape) of ``options_path`` -> ``out_dir``."""
    sys.path.insert(0, str(ROOT))
    from tests.elmo_utils import write_random_elmo

    options = json.loads(options_path.read_text(encoding="utf8"))
    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    # fan_in_scaling: activations of a trained model's size (as benchmarks/elmo_weights.py)
    opts, weights = write_random_elmo(out_dir, options, seed=seed, fan_in_scaling=True)
    seconds = time.perf_counter() - start
    return {"kind": "elmo_random", "label": "ELMo, random weights", "shape_of": str(options_path),
            "model": str(out_dir), "options": str(opts), "weights": str(weights), "seed": seed,
            "pretrain_seconds": round(seconds, 2), "heldout": None}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--text", type=Path, default=ROOT / "corpus" / "pretrain",
                        help="folder of train.jsonl, heldout.jsonl, settings.json")
    parser.add_argument("--settings", type=Path, default=ROOT / "corpus" / "settings.json",
                        help="the labeled corpora's settings (stamped on the record)")
    parser.add_argument("--training", type=Path, default=ROOT / "training" / "pretrain")
    parser.add_argument("--metrics", type=Path, default=ROOT / "metrics")
    parser.add_argument("--encoder", default="", help="MLM: the checkpoint to continue (default: the embedded MiniLM)")
    parser.add_argument("--gpu-id", type=int, default=-1)
    args = parser.parse_args(argv)

    pre = _read_json(args.text / "settings.json", "run scripts/pretrain_text.py (the pretrain-text step) first")
    corpus_settings = json.loads(args.settings.read_text(encoding="utf8")) if args.settings.exists() else None
    for name in ("train.jsonl", "heldout.jsonl"):
        if args.mode != "random-elmo" and not (args.text / name).exists():
            raise SystemExit(f"{args.text / name} is missing: run scripts/pretrain_text.py first")
    if args.mode == "mlm":
        encoder = args.encoder or (corpus_settings or {}).get("encoder") or ""
        if not encoder:
            from spacy_ctx.assets import embedded_model_dir

            encoder = str(embedded_model_dir())
        record = run_mlm(pre, args.text, args.training / "mlm", encoder, args.gpu_id)
    elif args.mode == "elmo":
        record = run_elmo(pre, args.text, args.training / "elmo", args.gpu_id)
    else:
        options = args.training / "elmo" / "model-last" / "options.json"
        if not options.exists():
            raise SystemExit(f"{options} is missing: the random control copies the trained ELMo's shape; "
                             "run `scripts/pretrain_steps.py elmo` (the pretrain-elmo step) first")
        record = write_random_like(options, args.training / "elmo_random", int(pre.get("random_seed", 1)))
    name = RECORD_NAMES[args.mode]
    record = {"name": name, **record, "pretrain_settings": pre, "settings": corpus_settings}
    args.metrics.mkdir(parents=True, exist_ok=True)
    out = args.metrics / f"pretrain_{name}.json"
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf8")
    held = record.get("heldout") or {}
    if "forward_ppl" in held:
        print(f"{name}: held-out perplexity forward {held['forward_ppl']:.1f}, backward {held['backward_ppl']:.1f}")
    elif held.get("loss") is not None:
        ppl = held.get("perplexity") or math.exp(held["loss"])
        print(f"{name}: held-out MLM loss {held['loss']:.3f} (pseudo-perplexity {ppl:.1f})")
    print(f"{name}: {record['pretrain_seconds']:.1f}s -> {out}")
    return record


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
