#!/usr/bin/env python
"""Unlabeled in-domain text for the ``pretrain`` workflow, from the train splits only.

The text is the *train* split of both corpora, made exactly as ``scripts/preprocess.py``
makes it (same seed, same 80/10/10 split on the complete data): WNUT-16 train tweets
(tokens joined by spaces) and BBC News train articles (whitespace collapsed, whole
articles). Dev and test documents are never written, under any cap, and neither is a train
document whose text is also a dev or test document (the corpora hold a few duplicates). ``text_ner_docs`` /
``text_textcat_docs`` cap the documents taken from each source (0: the whole train split;
a capped list is the first N of the train split, a superset of what a smaller cap takes).

A held-out slice of that train text (``heldout_percent`` of the documents, chosen by a
seeded hash of the text, so the choice does not depend on the caps) goes to
``heldout.jsonl``; the rest to ``train.jsonl``. Pretraining reads ``train.jsonl`` and
reports perplexity/loss on ``heldout.jsonl``.

Writes ``OUTPUT/train.jsonl``, ``OUTPUT/heldout.jsonl`` (``{"text": ..., "source": ...}``
per line), ``OUTPUT/stats.json`` and ``OUTPUT/settings.json``: the resolved pretraining
settings of ``--setting`` (steps, batch sizes, ELMo preset) that ``scripts/pretrain_steps.py``
reads.

    python scripts/pretrain_text.py --output corpus/pretrain --seed 0 --setting short \\
        --short text_ner_docs=0 mlm_steps=300 elmo_preset=tiny ... --full ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

sys.path.insert(0, str(Path(__file__).resolve().parent))
import preprocess  # noqa: E402  (the same readers and splits as the labeled corpora)

Value = Union[int, float, str]
#: Setting keys with their defaults (``0``: "all" for caps, "the config's value" for the rest).
SETTING_DEFAULTS: Dict[str, Value] = {
    "text_ner_docs": 0,
    "text_textcat_docs": 0,
    "heldout_percent": 2,
    "mlm_steps": 300,
    "mlm_batch_size": 8,
    "mlm_seq_len": 128,
    "mlm_eval_frequency": 100,
    "mlm_learn_rate": 0.0001,
    "mlm_warmup_steps": 30,
    "mlm_heldout_sequences": 64,
    "elmo_preset": "tiny",
    "elmo_steps": 600,
    "elmo_batch_tokens": 2048,
    "elmo_eval_frequency": 200,
    "elmo_learn_rate": 0.002,
    "elmo_vocab_size": 10000,
    "elmo_heldout_sentences": 300,
    "random_seed": 1,
}
STRING_KEYS = ("elmo_preset",)
FLOAT_KEYS = ("mlm_learn_rate", "elmo_learn_rate")


def parse_setting(values: Optional[Sequence[str]]) -> Dict[str, Value]:
    """``KEY=VALUE`` pairs of one setting group (project.yml passes one group per setting)."""
    out: Dict[str, Value] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SETTING_DEFAULTS:
            raise SystemExit(f"bad setting value {item!r}; expected KEY=VALUE with KEY in "
                             f"{', '.join(SETTING_DEFAULTS)}")
        value = value.strip()
        try:
            if key in STRING_KEYS:
                out[key] = value
            elif key in FLOAT_KEYS:
                out[key] = float(value)
            else:
                out[key] = int(value)
        except ValueError:
            raise SystemExit(f"bad setting value {item!r}: {value!r} is not a number") from None
    return out


def resolve_settings(setting: str, groups: Dict[str, Dict[str, Value]]) -> Dict[str, Value]:
    """The defaults, overridden by the chosen group's values."""
    if setting not in groups:
        raise SystemExit(f"--setting must be one of {', '.join(sorted(groups))}, not {setting!r}")
    resolved = dict(SETTING_DEFAULTS)
    resolved.update(groups[setting])
    return resolved


def is_heldout(text: str, percent: int, seed: int) -> bool:
    """A seeded content hash puts ``percent``% of the documents in the held-out slice."""
    if percent <= 0:
        return False
    digest = hashlib.sha1(f"{seed}\x00{text}".encode("utf8")).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < percent * 100


def _normal(text: str) -> str:
    return " ".join(text.split())


def train_only(texts: Sequence[str], splits: Dict[str, List[int]]) -> Tuple[List[str], int]:
    """The train split's texts, less any whose text is also a dev or test document (the
    corpora hold some duplicates, e.g. retweets); returns ``(texts, n_dropped)``."""
    evaluation = {_normal(texts[i]) for split in ("dev", "test") for i in splits[split]}
    kept = [texts[i] for i in splits["train"] if _normal(texts[i]) not in evaluation]
    return kept, len(splits["train"]) - len(kept)


def ner_train_texts(seed: int) -> Tuple[List[str], int]:
    """WNUT-16 train tweets (the preprocess split), tokens joined by single spaces."""
    module, pip_spec, relative = preprocess.NER_PACKAGE
    path = preprocess.package_dir(module, pip_spec, contains=[relative]) / relative
    texts = [" ".join(words) for words, _ in preprocess.read_bio(preprocess.read_text_file(path))]
    return train_only(texts, preprocess.split_indices(len(texts), seed))


def textcat_train_texts(seed: int) -> Tuple[List[str], int]:
    """BBC News train articles (the preprocess split), whole, whitespace collapsed."""
    module, pip_spec, relative = preprocess.TEXTCAT_PACKAGE
    data_dir = preprocess.package_dir(module, pip_spec, contains=[relative]) / relative
    items = preprocess.read_bbc(data_dir)
    splits = preprocess.stratified_split([topic for topic, _, _ in items], seed)
    return train_only([text for _, _, text in items], splits)


def write_split(sources: Iterable[Tuple[str, Sequence[str]]], output: Path, heldout_percent: int,
                seed: int) -> Dict[str, Dict[str, int]]:
    """Write ``train.jsonl`` and ``heldout.jsonl``; returns docs/words per file and source."""
    output.mkdir(parents=True, exist_ok=True)
    stats: Dict[str, Dict[str, int]] = {"train": {}, "heldout": {}}
    with open(output / "train.jsonl", "w", encoding="utf8") as train_file, \
            open(output / "heldout.jsonl", "w", encoding="utf8") as heldout_file:
        for source, texts in sources:
            for text in texts:
                text = " ".join(text.split())
                if not text:
                    continue
                part = "heldout" if is_heldout(text, heldout_percent, seed) else "train"
                (heldout_file if part == "heldout" else train_file).write(
                    json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
                counts = stats[part]
                counts[f"{source}_docs"] = counts.get(f"{source}_docs", 0) + 1
                counts[f"{source}_words"] = counts.get(f"{source}_words", 0) + len(text.split())
    for part in ("train", "heldout"):
        counts = stats[part]
        counts["docs"] = sum(v for k, v in counts.items() if k.endswith("_docs"))
        counts["words"] = sum(v for k, v in counts.items() if k.endswith("_words"))
    return stats


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("corpus/pretrain"))
    parser.add_argument("--seed", type=int, default=0, help="split seed, as for preprocess (default 0)")
    parser.add_argument("--setting", default="short", help="which group's values to use (short, full)")
    parser.add_argument("--short", nargs="*", metavar="KEY=VALUE", help="values of the short setting")
    parser.add_argument("--full", nargs="*", metavar="KEY=VALUE", help="values of the full setting")
    args = parser.parse_args(argv)

    settings = resolve_settings(args.setting, {"short": parse_setting(args.short),
                                               "full": parse_setting(args.full)})
    ner, ner_dropped = ner_train_texts(args.seed)
    bbc, bbc_dropped = textcat_train_texts(args.seed)
    ner = preprocess.cap(ner, int(settings["text_ner_docs"]))
    bbc = preprocess.cap(bbc, int(settings["text_textcat_docs"]))
    stats = write_split([("wnut16_train", ner), ("bbc_train", bbc)], args.output,
                        int(settings["heldout_percent"]), args.seed)
    stats["dropped_duplicates_of_dev_test"] = {"wnut16_train": ner_dropped, "bbc_train": bbc_dropped}
    resolved = {"setting": args.setting, "seed": args.seed, **settings}
    (args.output / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf8")
    (args.output / "settings.json").write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf8")
    for part in ("train", "heldout"):
        s = stats[part]
        print(f"{args.output / (part + '.jsonl')}: {s['docs']} docs, {s['words']:,} words "
              f"(WNUT-16 train {s.get('wnut16_train_docs', 0)}, BBC train {s.get('bbc_train_docs', 0)})")
    print(f"left out {ner_dropped} WNUT-16 and {bbc_dropped} BBC train documents whose text is also "
          "a dev or test document")
    print(f"pretraining settings ({args.setting}): " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return stats


if __name__ == "__main__":
    main()
