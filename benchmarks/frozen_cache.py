#!/usr/bin/env python
"""Frozen-encoder feature cache: epoch 1 (encoder runs, cache fills) vs epoch 2 (cache hits).

For each task (``textcat``: ``configs/textcat_bert_frozen.cfg`` on ``corpus/textcat``;
``ner``: ``configs/ner_bert_frozen.cfg`` on ``corpus/ner``), the pipeline is built with
spaCy's ``init_nlp`` on the embedded all-MiniLM-L6-v2 (or ``--encoder``), the cache is
emptied, and ``--epochs`` epochs of ``nlp.update`` run over the first ``--docs`` training
Docs, shuffled each epoch, in batches of ``--batch-docs``. The table gives each epoch's
wall time and words/s, the speed-up of the last epoch over the first, the cache's bytes
and hits. Writes ``benchmarks/results/frozen_cache.json``.

Example::

    python benchmarks/frozen_cache.py --threads 1 --docs 200
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TASKS = {"textcat": "configs/textcat_bert_frozen.cfg", "ner": "configs/ner_bert_frozen.cfg"}


def run_task(task: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Time ``args.epochs`` frozen epochs of ``task``; returns one result row."""
    from spacy.tokens import DocBin
    from spacy.training import Example
    from spacy.training.initialize import init_nlp
    from spacy.util import fix_random_seed, load_config, minibatch

    corpus = Path(args.corpus) / task
    config = load_config(
        REPO_ROOT / TASKS[task],
        overrides={
            "paths.train": str(corpus / "train.spacy"),
            "paths.dev": str(corpus / "dev.spacy"),
            "paths.encoder": args.encoder,
            "components.ctx_bert.model.mixed_precision": None,
        },
    )
    nlp = init_nlp(config)
    encoder = nlp.get_pipe("ctx_bert")
    encoder.feature_cache.clear()
    hits0, misses0 = encoder.feature_cache.hits, encoder.feature_cache.misses  # initialization's
    gold = list(DocBin().from_disk(corpus / "train.spacy").get_docs(nlp.vocab))[: args.docs]
    examples = [Example(nlp.make_doc(doc.text), doc) for doc in gold]
    n_words = sum(len(eg.reference) for eg in examples)
    optimizer = nlp.resume_training()
    fix_random_seed(0)
    rng = random.Random(0)
    epochs: List[Dict[str, float]] = []
    for _ in range(args.epochs):
        rng.shuffle(examples)
        start = time.perf_counter()
        for batch in minibatch(examples, args.batch_docs):
            nlp.update(batch, sgd=optimizer, losses={})
        seconds = time.perf_counter() - start
        epochs.append({"seconds": seconds, "words_per_s": n_words / seconds})
    cache = encoder.feature_cache
    return {
        "task": task,
        "docs": len(examples),
        "words": n_words,
        "epochs": epochs,
        "speedup_last_vs_first": epochs[0]["seconds"] / epochs[-1]["seconds"],
        "cache_bytes": cache.n_bytes,
        "cache_entries": len(cache),
        "cache_hits": cache.hits - hits0,
        "cache_misses": cache.misses - misses0,
    }


def main() -> int:
    """Parse arguments, run the tasks, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--corpus", default=str(REPO_ROOT / "corpus"))
    parser.add_argument("--encoder", default=None, help="model folder (default: the embedded MiniLM)")
    parser.add_argument("--docs", type=int, default=200, help="training Docs per epoch (a slice)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-docs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "frozen_cache.json"))
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.encoder is None:
        from spacy_ctx.assets import embedded_model_dir

        args.encoder = str(embedded_model_dir())
    rows = [run_task(task, args) for task in args.tasks]
    header = f"{'task':8} {'docs':>5} {'words':>7} " + " ".join(
        f"{'ep' + str(i + 1) + ' s':>8} {'ep' + str(i + 1) + ' w/s':>9}" for i in range(args.epochs)
    ) + f" {'speed-up':>8} {'cache MB':>8} {'hits':>6}"
    print(header)
    for row in rows:
        cells = " ".join(f"{e['seconds']:8.2f} {e['words_per_s']:9.0f}" for e in row["epochs"])
        print(
            f"{row['task']:8} {row['docs']:5d} {row['words']:7d} {cells} "
            f"{row['speedup_last_vs_first']:7.1f}x {row['cache_bytes'] / 2**20:8.1f} {row['cache_hits']:6d}"
        )
    result = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
