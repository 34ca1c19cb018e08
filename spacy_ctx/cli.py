"""``python -m spacy_ctx``: the project's command-line tools."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .assets import embedded_model_dir
from .errors import ConfigError, SpacyCtxError

DEMO_TEXTS = [
    "The bank raised interest rates again this quarter.",
    "We sat on the river bank and watched the boats.",
    "Apple is looking at buying U.K. startup for $1 billion.",
    "She ate an apple and a banana after lunch.",
]


def demo(model: Optional[str], output: Path) -> None:
    """Annotate sample texts, print contextual token similarities, save and reload."""
    import numpy as np
    import spacy

    name = model or str(embedded_model_dir())
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": name}})
    start = time.perf_counter()
    docs = list(nlp.pipe(DEMO_TEXTS))
    elapsed = time.perf_counter() - start
    n_words = sum(len(d) for d in docs)
    print(f"model: {name}")
    print(f"annotated {len(docs)} docs / {n_words} tokens in {elapsed:.2f}s (incl. loading)")
    ctx = docs[0]._.ctx
    print(f"doc._.ctx: layers {ctx.layers.shape} {ctx.layers.dtype}, names {ctx.layer_names}")

    def find(doc, text):
        return next(t for t in doc if t.lower_ == text)

    bank_money, bank_river = find(docs[0], "bank"), find(docs[1], "bank")
    apple_company, apple_fruit = find(docs[2], "apple"), find(docs[3], "apple")
    rows = [
        ("bank (money) ~ bank (river)", bank_money.similarity(bank_river)),
        ("bank (money) ~ rates", bank_money.similarity(find(docs[0], "rates"))),
        ("bank (river) ~ river", bank_river.similarity(find(docs[1], "river"))),
        ("apple (company) ~ apple (fruit)", apple_company.similarity(apple_fruit)),
        ("apple (fruit) ~ banana", apple_fruit.similarity(find(docs[3], "banana"))),
        ("doc 0 ~ doc 1", docs[0].similarity(docs[1])),
        ("doc 2 ~ doc 3", docs[2].similarity(docs[3])),
    ]
    print("\ncontextual similarities (cosine)")
    for label, value in rows:
        print(f"  {label:<34} {value:6.3f}")
    nlp.to_disk(output)
    reloaded = spacy.load(output)
    again = reloaded(DEMO_TEXTS[0])
    same = np.allclose(again._.ctx.layers, docs[0]._.ctx.layers, atol=1e-5)
    print(f"\nsaved to {output}; reloaded pipeline gives identical vectors: {same}")
    if not same:
        raise SpacyCtxError(f"the pipeline reloaded from {output} gives different vectors")


def init_config(args: argparse.Namespace) -> None:
    """Write a complete, validated training config."""
    import spacy

    from .training_config import make_config

    print(f"[1/3] building a {args.pipeline} config on the {args.encoder} encoder", flush=True)
    config = make_config(
        args.pipeline,
        args.encoder,
        frozen=args.frozen,
        listener=args.listener,
        gpu=args.gpu,
        encoder_path=args.encoder_path,
        elmo_options=args.elmo_options,
        elmo_weights=args.elmo_weights,
    )
    print("[2/3] filling spaCy defaults and validating (no weights are loaded)", flush=True)
    nlp = spacy.util.load_model_from_config(config, auto_fill=True, validate=True)
    filled = nlp.config
    args.output.parent.mkdir(parents=True, exist_ok=True)
    filled.to_disk(args.output, interpolate=False)
    print(f"[3/3] wrote {args.output}", flush=True)
    print(f"train with: python -m spacy train {args.output} --paths.train TRAIN.spacy "
          "--paths.dev DEV.spacy" + (" --paths.encoder MODEL_DIR" if args.encoder == "bert" else
          " --paths.elmo_options OPTIONS.json --paths.elmo_weights WEIGHTS.hdf5")
          + (" --gpu-id 0" if args.gpu else ""))


def info(model_dir: Path, *, as_json: bool = False) -> None:
    """Print what ``ctx_bert`` would load from a checkpoint directory (no weights read)."""
    import json

    from .model_info import describe_checkpoint, format_description

    description = describe_checkpoint(model_dir)
    if as_json:
        print(json.dumps(description, indent=2))
    else:
        print("\n".join(format_description(description)))


def parse_overrides(extra: List[str]) -> Dict[str, Any]:
    """``--section.key value`` (or ``--section.key=value``) pairs as spaCy parses them."""
    from spacy.cli._util import parse_config_overrides

    for word in extra:
        if word.startswith("--") and "." not in word.split("=", 1)[0]:
            raise ConfigError(
                f"unknown option {word!r}; config overrides look like --section.key value, "
                "e.g. --pretraining.max_steps 100"
            )
    if extra and not extra[0].startswith("--"):
        raise ConfigError(f"unexpected argument {extra[0]!r}; config overrides look like --section.key value")
    return parse_config_overrides(list(extra))


def pretrain_command(args: argparse.Namespace, extra: List[str]) -> None:
    """Run a pretraining config (MLM/NSP, causal LM or ELMo) into an output folder."""
    from .training.pretrain import pretrain

    overrides = parse_overrides(extra)
    result = pretrain(args.config, args.output, overrides=overrides, gpu_id=args.gpu_id, resume=args.resume)
    if isinstance(result, dict) and "model_last" in result:
        best = result.get("best_loss")
        print(
            f"done: step {result['step']}; model-last: {result['model_last']}"
            + (f"; model-best (held-out loss {best:.4f} at step {result['best_step']}): {result['model_best']}"
               if best is not None else "")
        )


def fill_mask_command(args: argparse.Namespace) -> None:
    """Print the top-k pieces for each mask token of a text."""
    from .training.fill_mask import fill_mask, format_fill_mask

    print(format_fill_mask(fill_mask(args.model, args.text, top_k=args.top_k)))


def next_sentence_command(args: argparse.Namespace) -> None:
    """Print the probability that sentence B follows sentence A."""
    from .training.fill_mask import next_sentence

    probability = next_sentence(args.model, args.first, args.second)
    print(f"P(B follows A) = {probability:.4f}")


def evaluate_lm_command(args: argparse.Namespace) -> None:
    """Perplexity of a pretrained model folder on held-out raw text."""
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} is not a folder; pass a pretraining output such as OUTPUT/model-best")
    if (model_dir / "config.json").is_file():
        from .training.pretrain import evaluate_transformer_lm

        scores = evaluate_transformer_lm(model_dir, args.heldout, seq_len=args.seq_len, gpu_id=args.gpu_id)
        kind = "causal LM" if scores["objective"] == "clm" else "masked LM (15% of pieces, fixed masks)"
        print(f"{kind} on {args.heldout}: {scores['sequences']} sequences")
        print(f"  loss        {scores['loss']:.4f}" if scores["loss"] is not None else "  loss        -")
        if scores["perplexity"] is not None:
            print(f"  perplexity  {scores['perplexity']:.2f}")
        if scores["accuracy"] is not None:
            print(f"  accuracy    {scores['accuracy']:.4f}")
        return
    from .training.elmo_pretrain import evaluate_lm

    scores = evaluate_lm(model_dir, args.heldout, gpu_id=args.gpu_id)
    print(f"ELMo biLM on {args.heldout}: {scores.get('n_tokens')} predictions per direction")
    print(f"  forward perplexity   {scores['forward_ppl']:.2f}")
    print(f"  backward perplexity  {scores['backward_ppl']:.2f}")


def annotate_command(args: argparse.Namespace) -> None:
    """Annotate a corpus into DocBin shards (local engine or Ray), resumably."""
    from .annotate.local import annotate_corpus

    summary = annotate_corpus(
        args.model,
        args.inputs,
        args.output,
        engine=args.engine,
        n_process=args.n_process,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        address=args.address,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        store=args.store,
        store_dtype=args.store_dtype,
        gpu_id=args.gpu_id,
        lang=args.lang,
        text_key=args.text_key,
        id_key=args.id_key,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"{summary['documents']} documents in {summary['shards']} shard(s) in {summary['output']} "
        f"({summary['shards_written']} written now, {summary['shards_skipped']} already done); "
        f"{summary['skipped_inputs']} input line(s) skipped (listed in manifest.json); "
        f"{summary['docs_per_s']:.1f} docs/s, {summary['words_per_s']:.0f} words/s"
    )


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 a spacy-ctx error, printed on stderr).

    Usage errors exit through argparse as usual (code 2).
    """
    parser = argparse.ArgumentParser(
        prog="python -m spacy_ctx", description="spacy-ctx command-line tools"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo", help="annotate sample texts with the embedded default model and print similarities"
    )
    demo_parser.add_argument("--model", help="checkpoint dir or hub id (default: embedded MiniLM)")
    demo_parser.add_argument("--output", type=Path, default=Path("demo_out"), help="where to save the pipeline")
    commands.add_parser("model-path", help="print the embedded default model's directory")
    cfg = commands.add_parser("init-config", help="write a training config for ner/textcat on ctx_bert/ctx_elmo")
    cfg.add_argument("output", type=Path, help="where to write the .cfg file")
    cfg.add_argument("--pipeline", choices=["ner", "textcat", "ner+textcat"], default="ner")
    cfg.add_argument("--encoder", choices=["bert", "elmo"], default="bert")
    frozen = cfg.add_mutually_exclusive_group()
    frozen.add_argument("--frozen", dest="frozen", action="store_true", default=None,
                        help="no gradients into the encoder (default for elmo)")
    frozen.add_argument("--fine-tune", dest="frozen", action="store_false",
                        help="train the encoder weights (default for bert)")
    cfg.add_argument("--listener", choices=["last", "scalar_mix"], default=None,
                     help="default: last for fine-tuned bert, scalar_mix otherwise")
    cfg.add_argument("--gpu", action="store_true", help="the pytorch allocator for cupy (the encoder runs with mixed_precision = \"auto\" either way)")
    cfg.add_argument("--encoder-path", help="transformer checkpoint dir or hub id (any supported family) for [paths] encoder")
    cfg.add_argument("--elmo-options", help="ELMo options.json for [paths]")
    cfg.add_argument("--elmo-weights", help="ELMo weights.hdf5 for [paths]")
    info_parser = commands.add_parser(
        "info", help="describe a transformer checkpoint directory (family, tokenizer, shape)"
    )
    info_parser.add_argument("model_dir", type=Path, help="Hugging Face-format checkpoint directory")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pre = commands.add_parser(
        "pretrain",
        help="continue MLM/NSP (or GPT-2 causal-LM) pretraining of a checkpoint, or train an ELMo biLM, "
        "from a config; overrides as --section.key value",
        epilog="config overrides follow the positional arguments, as in spaCy: --paths.raw_text FILE "
        "--paths.encoder MODEL_DIR --pretraining.max_steps 1000 (any [section] key of the config)",
    )
    pre.add_argument("config", type=Path, help="pretraining config, e.g. configs/pretrain_mlm.cfg")
    pre.add_argument("output", type=Path, help="output folder (model-last, model-best, metrics.jsonl, checkpoint/)")
    pre.add_argument("--gpu-id", type=int, default=-1, help="CUDA device (default -1: CPU)")
    pre.add_argument("--resume", action="store_true", help="continue the run in OUTPUT from its checkpoint")
    fill = commands.add_parser("fill-mask", help="top-k pieces for each mask token of a text")
    fill.add_argument("model", type=Path, help="checkpoint folder with a masked-LM head")
    fill.add_argument("text", help="text with the tokenizer's mask token ([MASK], <mask>)")
    fill.add_argument("--top-k", type=int, default=5)
    nsp = commands.add_parser("next-sentence", help="probability that B follows A (BERT next-sentence head)")
    nsp.add_argument("model", type=Path, help="checkpoint folder saved as BertForPreTraining")
    nsp.add_argument("first", metavar="A")
    nsp.add_argument("second", metavar="B")
    evl = commands.add_parser(
        "evaluate-lm", help="held-out perplexity of a pretrained model (ELMo: forward/backward; transformer: MLM/CLM)"
    )
    evl.add_argument("model_dir", type=Path, help="a pretraining output folder such as OUTPUT/model-best")
    evl.add_argument("heldout", type=Path, help="raw text: .jsonl, .txt or .spacy")
    evl.add_argument("--seq-len", type=int, default=128, help="transformers: pieces per sequence")
    evl.add_argument("--gpu-id", type=int, default=-1)
    ann = commands.add_parser(
        "annotate",
        help="annotate a corpus (JSONL/.txt/Parquet) into DocBin shards with contextual vectors; resumable",
        description="Annotate MODEL over INPUTS into OUTPUT/shard-NNNNN.spacy + manifest.json. Rerun the "
        "same command to resume after a crash; read with spacy_ctx.read_shards(OUTPUT).",
    )
    ann.add_argument("model", help="spaCy pipeline dir or package, or a transformer/ELMo checkpoint dir")
    ann.add_argument("inputs", nargs="+", help="input files, folders or globs (.jsonl, .txt, .parquet)")
    ann.add_argument("output", type=Path, help="output folder for the shards and manifest.json")
    ann.add_argument("--engine", choices=["local", "ray"], default="local")
    ann.add_argument("--workers", type=int, default=1, help="ray: actors (default 1)")
    ann.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per actor (default 0)")
    ann.add_argument("--address", default=None, help="ray: cluster address ('auto'); default: a local Ray")
    ann.add_argument("--n-process", type=int, default=1, help="local: forked CPU processes (default 1)")
    ann.add_argument("--batch-size", type=int, default=64, help="documents per pipeline batch (default 64)")
    ann.add_argument("--shard-size", type=int, default=1000, help="documents per shard (default 1000)")
    ann.add_argument("--store", choices=["none", "last", "all"], default=None,
                     help="ctx layers kept on the Docs (default: the pipeline's setting)")
    ann.add_argument("--store-dtype", default=None,
                     help="dtype of the stored layers, e.g. float16 (default: the pipeline's setting)")
    ann.add_argument("--gpu-id", type=int, default=None, help="CUDA device for the encoder (-1: CPU)")
    ann.add_argument("--lang", default=None, help="language of the blank pipeline for a checkpoint dir")
    ann.add_argument("--text-key", default="text", help="JSONL key / Parquet column of the text")
    ann.add_argument("--id-key", default=None, help="JSONL key / Parquet column of an id (doc.user_data['id'])")
    ann.add_argument("--overwrite", action="store_true", help="replace OUTPUT's shards made with other settings")
    ann.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "pretrain":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 1 if argv else 0
    try:
        if args.command == "demo":
            demo(args.model, args.output)
        elif args.command == "model-path":
            print(embedded_model_dir())
        elif args.command == "init-config":
            init_config(args)
        elif args.command == "info":
            info(args.model_dir, as_json=args.json)
        elif args.command == "pretrain":
            pretrain_command(args, extra)
        elif args.command == "fill-mask":
            fill_mask_command(args)
        elif args.command == "next-sentence":
            next_sentence_command(args)
        elif args.command == "evaluate-lm":
            evaluate_lm_command(args)
        elif args.command == "annotate":
            annotate_command(args)
    except SpacyCtxError as err:
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        # fill-mask/next-sentence refuse bad input (no mask token, too long) with ValueError.
        if args.command not in ("fill-mask", "next-sentence"):
            raise
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0
