"""Input documents for ``annotate``: JSONL, plain text and Parquet, streamed in order.

:func:`iter_records` yields one :class:`Record` per valid document, numbered
``0, 1, 2, ...`` in input order over all files (files in the order given, a glob's
matches sorted by name, a directory's ``*.jsonl``/``*.txt``/``*.parquet`` files
sorted by name). Only valid documents get a number, so the numbering (and with it
the shard layout) is the same on every run over the same files.

Formats, by suffix:

``.jsonl``
    one JSON object per line; the text is ``obj[text_key]``; ``obj["meta"]`` (any
    JSON value) and ``obj[id_key]`` (as a string) are kept when present.
``.txt``
    one document per line (the line without its line break).
``.parquet``
    a text column ``text_key``, optional ``meta`` and ``id_key`` columns (needs
    ``pyarrow``).

Lines (Parquet rows) that give no document are skipped and recorded in
:class:`InputStats` as ``(file, line, reason)``, never stopping the run: not
UTF-8, invalid JSON, not a JSON object, a missing or non-string text, a lone
surrogate escape (not encodable Unicode), an empty or whitespace-only text.
Texts are kept as they are otherwise (not stripped), so ``nlp(text)`` on the
same string gives the same Doc.
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from ..errors import ConfigError
from ..training.corpus import RawTexts, Skipped

__all__ = [
    "INPUT_SUFFIXES",
    "InputError",
    "InputStats",
    "Record",
    "Skipped",
    "count_rows",
    "expand_inputs",
    "iter_records",
]

INPUT_SUFFIXES = (".jsonl", ".txt", ".parquet")
# Skipped lines kept with their details (all are counted).
MAX_RECORDED_SKIPS = 10_000
PARQUET_BATCH_ROWS = 4096


class InputError(ConfigError):
    """An input file is missing, unreadable or of an unknown kind."""


@dataclass(frozen=True)
class Record:
    """One input document: its number in input order, the text, ``meta`` (any JSON
    value or None) and ``id`` (a string or None)."""

    index: int
    text: str
    meta: Any = None
    id: Optional[str] = None


@dataclass
class InputStats:
    """Counts of one pass over the inputs, filled while :func:`iter_records` runs."""

    documents: int = 0
    skipped: int = 0
    skipped_lines: List[Skipped] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    per_file: Dict[str, int] = field(default_factory=dict)

    def skip(self, file: str, line: int, reason: str) -> None:
        """Count one skipped line (details kept for the first ``MAX_RECORDED_SKIPS``)."""
        self.skipped += 1
        self.reasons[reason.split(" (")[0]] += 1
        if len(self.skipped_lines) < MAX_RECORDED_SKIPS:
            self.skipped_lines.append(Skipped(file, line, reason))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary for the manifest."""
        return {
            "documents": self.documents,
            "skipped": self.skipped,
            "reasons": dict(self.reasons),
            "per_file": dict(self.per_file),
            "skipped_lines": [
                {"file": s.file, "line": s.line, "reason": s.reason} for s in self.skipped_lines
            ],
            "skipped_lines_truncated": self.skipped > len(self.skipped_lines),
        }


def expand_inputs(paths_or_globs: Union[str, Path, Sequence[Union[str, Path]]]) -> List[Path]:
    """Input files in order: paths as given, globs sorted, directories' input files sorted."""
    if isinstance(paths_or_globs, (str, Path)):
        paths_or_globs = [paths_or_globs]
    files: List[Path] = []
    for entry in paths_or_globs:
        text = str(entry)
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in INPUT_SUFFIXES)
            if not found:
                raise InputError(f"{path}: the directory holds no {', '.join(INPUT_SUFFIXES)} files.")
            files.extend(found)
            continue
        if not path.exists() and glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(str(path)) if Path(m).is_file())
            if not matches:
                raise InputError(f"{text}: the pattern matches no file.")
            candidates = matches
        else:
            candidates = [path]
        for candidate in candidates:
            if not candidate.exists():
                raise InputError(f"{candidate}: input file not found.")
            if candidate.suffix not in INPUT_SUFFIXES:
                raise InputError(
                    f"{candidate}: unknown input format {candidate.suffix!r}; use .jsonl "
                    '({"text": ..., "meta": ...} per line), .txt (one document per line) or .parquet '
                    "(a text column)."
                )
            files.append(candidate)
    if not files:
        raise InputError("No input files given.")
    return files


def iter_records(
    paths_or_globs: Union[str, Path, Sequence[Union[str, Path]]],
    *,
    text_key: str = "text",
    id_key: Optional[str] = None,
    meta_key: str = "meta",
    stats: Optional[InputStats] = None,
) -> Iterator[Record]:
    """Valid documents of the input files as :class:`Record`, numbered in input order.

    ``stats`` (optional) is filled as the records are read: skipped lines with
    file, line and reason, documents per file. Missing files and unknown suffixes
    fail before the first record.
    """
    files = expand_inputs(paths_or_globs)
    stats = stats if stats is not None else InputStats()
    index = 0
    for path in files:
        before = stats.documents
        if path.suffix == ".parquet":
            rows = _parquet_rows(path, text_key, id_key, meta_key, stats)
        else:
            rows = _line_rows(path, text_key, id_key, meta_key, stats)
        for text, meta, ident in rows:
            yield Record(index, text, meta, ident)
            index += 1
            stats.documents += 1
        stats.per_file[str(path)] = stats.documents - before


def count_rows(paths_or_globs: Union[str, Path, Sequence[Union[str, Path]]]) -> int:
    """An upper bound on the number of documents (lines, Parquet rows), for progress/ETA.

    Reads the files as raw bytes (much faster than parsing them).
    """
    total = 0
    for path in expand_inputs(paths_or_globs):
        if path.suffix == ".parquet":
            pq = _import_parquet(path)
            total += pq.ParquetFile(str(path)).metadata.num_rows
            continue
        with path.open("rb") as handle:
            last = b""
            while True:
                chunk = handle.read(1 << 20)
                if not chunk:
                    break
                total += chunk.count(b"\n")
                last = chunk
            if last and not last.endswith(b"\n"):
                total += 1
    return total


# -- readers ------------------------------------------------------------------------------------
Row = tuple  # (text, meta, id)


def _check_text(value: Any, what: str, skip: Callable[[str], None]) -> Optional[str]:
    """The text, or None after recording why it is not usable."""
    if value is None:
        skip(f"missing text key (no {what})")
        return None
    if not isinstance(value, str):
        skip(f"text is not a string ({what} is {type(value).__name__})")
        return None
    try:  # JSON escapes can spell lone surrogates ("\ud83d" of a cut emoji)
        value.encode("utf8")
    except UnicodeEncodeError as err:
        skip(f"invalid Unicode (lone surrogate U+{ord(value[err.start]):04X} at {err.start})")
        return None
    if not value.strip():
        skip("empty text")
        return None
    return value


def _line_rows(
    path: Path, text_key: str, id_key: Optional[str], meta_key: str, stats: InputStats
) -> Iterator[Row]:
    number = 0

    def skip_line(line: int, reason: str) -> None:
        stats.skip(str(path), line, reason)

    def skip(reason: str) -> None:
        stats.skip(str(path), number, reason)

    try:
        lines = RawTexts._lines(path, skip_line)  # per-line UTF-8 decoding, BOM handled
        for number, line in lines:
            if line is None:  # not UTF-8, already recorded
                continue
            if path.suffix == ".txt":
                text = _check_text(line, "text", skip)
                if text is not None:
                    yield text, None, None
                continue
            if not line.strip():
                skip("empty line")
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                skip(f"invalid JSON ({err})")
                continue
            if not isinstance(obj, dict):
                skip(f"not a JSON object ({type(obj).__name__})")
                continue
            text = _check_text(obj.get(text_key), repr(text_key), skip)
            if text is None:
                continue
            ident = obj.get(id_key) if id_key is not None else None
            yield text, obj.get(meta_key), None if ident is None else str(ident)
    except ConfigError as err:  # RawTextError of an unreadable file
        raise InputError(str(err)) from err


def _import_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise InputError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert the file "
            "to .jsonl."
        ) from err
    return pq


def _parquet_rows(
    path: Path, text_key: str, id_key: Optional[str], meta_key: str, stats: InputStats
) -> Iterator[Row]:
    pq = _import_parquet(path)
    try:
        handle = pq.ParquetFile(str(path))
    except Exception as err:  # pyarrow's errors of a damaged or foreign file
        raise InputError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err}).") from err
    names = handle.schema_arrow.names
    if text_key not in names:
        raise InputError(
            f"{path}: no column {text_key!r} (columns: {names[:10]}); name the text column with "
            "--text-key."
        )
    columns = [text_key] + [c for c in (meta_key, id_key) if c is not None and c in names and c != text_key]
    number = 0

    def skip(reason: str) -> None:
        stats.skip(str(path), number, reason)

    for batch in handle.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        data = batch.to_pydict()
        texts = data[text_key]
        metas = data.get(meta_key, [None] * len(texts))
        idents = data.get(id_key, [None] * len(texts)) if id_key is not None else [None] * len(texts)
        for text, meta, ident in zip(texts, metas, idents):
            number += 1  # 1-based row number, as lines are
            text = _check_text(text, f"value in column {text_key!r}", skip)
            if text is not None:
                yield text, meta, None if ident is None else str(ident)
