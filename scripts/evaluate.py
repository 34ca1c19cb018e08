#!/usr/bin/env python
"""Evaluate trained variants on the test split; write metrics and the results table.

For each variant NAME: loads ``training/NAME/model-best``, runs it on
``corpus/TASK/test.spacy`` (raw test texts through the whole pipeline, tokenizer included,
aligned to the gold tokens by spaCy's ``Example``, as ``spacy evaluate`` does), and writes
``metrics/eval_NAME.json``: P/R/F overall and per entity type (NER), accuracy, macro
P/R/F and per-class F (textcat), words per second, gold counts. Then writes
``metrics/results.md`` (and ``metrics/results.json``) from every evaluated variant of the
current ``corpus/settings.json`` and prints the table.

    python scripts/evaluate.py ner_bert textcat_bert [--gpu-id 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_table import write_results  # noqa: E402

KEEP_SCORES = ("ents_p", "ents_r", "ents_f", "ents_per_type", "cats_score", "cats_micro_p",
               "cats_micro_r", "cats_micro_f", "cats_macro_p", "cats_macro_r", "cats_macro_f",
               "cats_macro_auc", "cats_f_per_type")


def task_of(pipe_names: List[str]) -> str:
    if "ner" in pipe_names:
        return "ner"
    if any(name.startswith("textcat") for name in pipe_names):
        return "textcat"
    raise SystemExit(f"cannot tell the task of a pipeline with components {pipe_names}")


def textcat_accuracy(examples) -> Optional[float]:
    pairs = [(eg.predicted.cats, eg.reference.cats) for eg in examples if eg.reference.cats]
    if not pairs:
        return None
    hits = sum(max(pred, key=pred.get) == max(gold, key=gold.get) for pred, gold in pairs)
    return hits / len(pairs)


def evaluate_variant(name: str, model_dir: Path, corpus_dir: Path, batch_size: int,
                     warmup_docs: int = 8) -> dict:
    import spacy
    from spacy.scorer import Scorer
    from spacy.training import Corpus, Example

    if not (model_dir / "config.cfg").exists():
        raise SystemExit(f"{model_dir} is not a trained pipeline: run the train step for {name} first")
    t0 = time.perf_counter()
    nlp = spacy.load(model_dir)
    load_seconds = time.perf_counter() - t0
    task = task_of(nlp.pipe_names)
    test_path = corpus_dir / task / "test.spacy"
    if not test_path.exists():
        raise SystemExit(f"{test_path} is missing: run the preprocess step first")
    references = [eg.reference for eg in Corpus(test_path, gold_preproc=False)(nlp)]
    texts = [doc.text for doc in references]
    # one small warm-up batch (first-call allocations, thread pools) before the timed pass
    list(nlp.pipe(texts[:warmup_docs]))
    start = time.perf_counter()  # raw text in: tokenizer + every pipeline component
    predicted = list(nlp.pipe(texts, batch_size=batch_size))
    seconds = time.perf_counter() - start
    examples = [Example(pred, ref) for pred, ref in zip(predicted, references)]
    scores = Scorer(nlp=nlp).score(examples)
    scores["speed"] = sum(len(doc) for doc in predicted) / max(seconds, 1e-9)
    gold_counts = Counter(ent.label_ for eg in examples for ent in eg.reference.ents)
    record = {
        "name": name,
        "task": task,
        "model": str(model_dir),
        "pipeline": nlp.pipe_names,
        "encoder": "elmo" if "ctx_elmo" in nlp.pipe_names else "bert",
        "frozen": bool(nlp.config["components"].get("ctx_elmo", nlp.config["components"].get("ctx_bert", {})).get("frozen")),
        "test_path": str(test_path),
        "test_docs": len(examples),
        "test_words": sum(len(eg.predicted) for eg in examples),
        "words_per_second": round(float(scores["speed"]), 1),
        "predict_seconds": round(seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "scores": {k: scores[k] for k in KEEP_SCORES if k in scores},
        "accuracy": textcat_accuracy(examples) if task == "textcat" else None,
        "gold_counts": dict(sorted(gold_counts.items())) if task == "ner" else
        dict(sorted(Counter(max(eg.reference.cats, key=eg.reference.cats.get)
                            for eg in examples if eg.reference.cats).items())),
    }
    return record


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help="training/NAME folders to evaluate")
    parser.add_argument("--corpus", type=Path, default=Path("corpus"))
    parser.add_argument("--training", type=Path, default=Path("training"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gpu-id", type=int, default=-1)
    parser.add_argument("--table-only", action="store_true", help="only rewrite metrics/results.md")
    args = parser.parse_args(argv)

    settings_path = args.corpus / "settings.json"
    settings = json.loads(settings_path.read_text(encoding="utf8")) if settings_path.exists() else None
    args.metrics.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        if not args.variants:
            parser.error("name at least one variant (or --table-only)")
        if args.gpu_id >= 0:
            import spacy

            spacy.require_gpu(args.gpu_id)
        for name in args.variants:
            record = evaluate_variant(name, args.training / name / "model-best", args.corpus, args.batch_size)
            record["settings"] = settings
            out = args.metrics / f"eval_{name}.json"
            out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf8")
            main_score = record["scores"].get("ents_f" if record["task"] == "ner" else "cats_macro_f")
            print(f"{name}: test {record['task']} F {100 * (main_score or 0):.1f}, "
                  f"{record['words_per_second']:,.0f} words/s -> {out}", flush=True)
    table = write_results(args.metrics, settings_path, args.corpus / "stats.json")
    print()
    print(table)


if __name__ == "__main__":
    main()
