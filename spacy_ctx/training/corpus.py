"""Raw text for pretraining: JSONL, plain text and DocBin files, streamed and checked.

Formats, by file suffix (a directory stands for its ``*.jsonl``, ``*.txt`` and
``*.spacy`` files, sorted by name):

``.jsonl``
    one JSON object per line; the document is ``obj[text_key]`` (``"text"``).
``.txt``
    one document per line.
``.spacy``
    a spaCy ``DocBin``; the document is ``doc.text``.

Lines are read as bytes and decoded one at a time, so a line that is not UTF-8
costs only that line. Bad lines are skipped and recorded (:class:`Skipped`:
file, line, reason): not UTF-8, invalid JSON, not a JSON object, a missing or
non-string text key, a JSON string with a lone surrogate escape (invalid
Unicode), an empty or whitespace-only text. A text longer than
``max_chars`` characters is cut at whitespace into chunks of at most
``max_chars`` (hard cuts where a stretch has no whitespace) and counted in
:attr:`RawStats.chunked_lines`; nothing is dropped silently.

A file that does not exist, has an unknown suffix, cannot be read, or yields no
document at all is a :class:`RawTextError` naming the file and its counts.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from ..errors import ConfigError

__all__ = [
    "RAW_SUFFIXES",
    "RawStats",
    "RawText",
    "RawTextError",
    "RawTexts",
    "Skipped",
    "TextSplit",
    "chunk_text",
    "is_heldout",
    "read_raw_texts",
    "split_heldout",
]

RAW_SUFFIXES = (".jsonl", ".txt", ".spacy")
# At most this many skipped lines are kept with their details; all are counted.
MAX_RECORDED_SKIPS = 1000


class RawTextError(ConfigError):
    """A raw-text file is missing, unreadable, of an unknown kind, or holds no document."""


class RawText(NamedTuple):
    """One document: ``source`` is ``"file:line"`` (``"file:line#k"`` for the k-th
    chunk of a long line; for ``.spacy``, the Doc's index instead of a line)."""

    source: str
    text: str


class Skipped(NamedTuple):
    """A line that gave no document: file, 1-based line (Doc index for .spacy), reason."""

    file: str
    line: int
    reason: str


@dataclass
class RawStats:
    """Counts of one full pass over the files."""

    documents: int = 0
    skipped: int = 0
    chunked_lines: int = 0
    chunks: int = 0
    per_file: Dict[str, int] = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """One line for logs: documents, chunked long lines, skips by reason."""
        text = f"{self.documents} documents from {len(self.per_file)} file(s)"
        if self.chunked_lines:
            text += f"; {self.chunked_lines} long line(s) cut into {self.chunks} chunks"
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())
            text += f"; {self.skipped} line(s) skipped ({reasons})"
        return text


class RawTexts:
    """Re-iterable raw documents, streamed from disk.

    Iterating yields :class:`RawText` ``(source, text)`` tuples in file order
    and line order (the same order every time, so a training run can resume at
    a position). :meth:`texts` yields the strings alone. After each complete
    pass, :attr:`stats` holds the counts and :attr:`skipped` the skipped lines
    (the first :data:`MAX_RECORDED_SKIPS` with details).
    """

    def __init__(self, paths: Sequence[Path], *, text_key: str = "text", max_chars: int = 100_000) -> None:
        if max_chars < 1:
            raise ConfigError(f"max_chars must be at least 1; got {max_chars}.")
        self.paths: List[Path] = _expand(paths)
        self.text_key = text_key
        self.max_chars = max_chars
        self.stats = RawStats()
        self.skipped: List[Skipped] = []

    def __iter__(self) -> Iterator[RawText]:
        stats = RawStats()
        skipped: List[Skipped] = []
        for path in self.paths:
            before = stats.documents
            for item in self._read_file(path, stats, skipped):
                stats.documents += 1
                yield item
            stats.per_file[str(path)] = stats.documents - before
            if stats.documents == before:
                bad = sum(1 for s in skipped if s.file == str(path))
                detail = f"; {bad}+ line(s) skipped, e.g. line {_first_skip(skipped, path)}" if bad else ""
                raise RawTextError(f"{path}: no document in this file (0 documents{detail}).")
        self.stats, self.skipped = stats, skipped

    def texts(self) -> Iterator[str]:
        """The document strings alone."""
        for item in self:
            yield item.text

    def scan(self) -> RawStats:
        """Read everything once (checks every file, fills :attr:`stats`)."""
        for _ in self:
            pass
        return self.stats

    # -- per file -------------------------------------------------------------------------
    def _read_file(self, path: Path, stats: RawStats, skipped: List[Skipped]) -> Iterator[RawText]:
        def skip(line: int, reason: str) -> None:
            stats.skipped += 1
            stats.reasons[reason.split(" (")[0]] += 1
            if len(skipped) < MAX_RECORDED_SKIPS:
                skipped.append(Skipped(str(path), line, reason))

        if path.suffix == ".spacy":
            lines: Iterable[Tuple[int, Optional[str]]] = self._docbin_texts(path)
        else:
            lines = self._lines(path, skip)
        for number, text in lines:
            if text is None:
                continue
            if path.suffix == ".jsonl":
                text = self._json_text(text, number, skip)
                if text is None:
                    continue
            text = text.strip()
            if not text:
                skip(number, "empty line")
                continue
            if len(text) <= self.max_chars:
                yield RawText(f"{path}:{number}", text)
                continue
            chunks = chunk_text(text, self.max_chars)
            stats.chunked_lines += 1
            stats.chunks += len(chunks)
            for k, chunk in enumerate(chunks):
                yield RawText(f"{path}:{number}#{k}", chunk)

    @staticmethod
    def _lines(path: Path, skip) -> Iterator[Tuple[int, Optional[str]]]:
        try:
            handle = path.open("rb")
        except OSError as err:
            raise RawTextError(f"{path}: cannot open ({err.strerror or err}).") from err
        with handle:
            for number, raw in enumerate(handle, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark
                try:
                    yield number, raw.decode("utf8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    skip(number, f"not UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start})")
                    yield number, None

    def _json_text(self, line: str, number: int, skip) -> Optional[str]:
        if not line.strip():
            skip(number, "empty line")
            return None
        try:
            obj = json.loads(line)
        except ValueError as err:
            skip(number, f"invalid JSON ({err})")
            return None
        if not isinstance(obj, dict):
            skip(number, f"not a JSON object ({type(obj).__name__})")
            return None
        if self.text_key not in obj:
            skip(number, f"missing text key (no {self.text_key!r}; keys: {sorted(obj)[:5]})")
            return None
        value = obj[self.text_key]
        if not isinstance(value, str):
            skip(number, f"text is not a string ({self.text_key!r} is {type(value).__name__})")
            return None
        try:  # JSON escapes can spell lone surrogates ("\ud83d" of a cut emoji)
            value.encode("utf8")
        except UnicodeEncodeError as err:
            skip(number, f"invalid Unicode (lone surrogate U+{ord(value[err.start]):04X} at {err.start})")
            return None
        return value

    @staticmethod
    def _docbin_texts(path: Path) -> Iterator[Tuple[int, Optional[str]]]:
        from spacy.tokens import DocBin
        from spacy.vocab import Vocab

        try:
            doc_bin = DocBin().from_disk(path)
        except Exception as err:  # msgpack/zlib errors of a damaged or foreign file
            raise RawTextError(
                f"{path}: not a readable spaCy DocBin ({type(err).__name__}: {err}); write .spacy "
                "files with spacy.tokens.DocBin, or use .jsonl/.txt."
            ) from err
        for number, doc in enumerate(doc_bin.get_docs(Vocab()), start=1):
            yield number, doc.text


def _first_skip(skipped: List[Skipped], path: Path) -> str:
    for item in skipped:
        if item.file == str(path):
            return f"{item.line}: {item.reason}"
    return "?"


def _expand(paths: Sequence[Union[str, Path]]) -> List[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: List[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in RAW_SUFFIXES)
            if not found:
                raise RawTextError(f"{path}: the directory holds no {', '.join(RAW_SUFFIXES)} files.")
            files.extend(found)
        elif not path.exists():
            raise RawTextError(f"{path}: raw-text file not found.")
        elif path.suffix not in RAW_SUFFIXES:
            raise RawTextError(
                f"{path}: unknown raw-text format {path.suffix!r}; use .jsonl ({{\"text\": ...}} per "
                "line), .txt (one document per line) or .spacy (DocBin)."
            )
        else:
            files.append(path)
    if not files:
        raise RawTextError("No raw-text files given.")
    return files


def read_raw_texts(
    paths: Union[Path, str, Sequence[Union[Path, str]]],
    *,
    text_key: str = "text",
    max_chars: int = 100_000,
    scan: bool = True,
) -> RawTexts:
    """Raw documents of JSONL/.txt/.spacy files (see the module docstring).

    Missing files and unknown suffixes are refused at once; with ``scan`` (the
    default) every file is also read once, so a file with no document fails
    here, and :attr:`RawTexts.stats` has the counts for the log.
    """
    texts = RawTexts(paths, text_key=text_key, max_chars=max_chars)  # type: ignore[arg-type]
    if scan:
        texts.scan()
    return texts


def chunk_text(text: str, max_chars: int) -> List[str]:
    """Cut ``text`` into stripped chunks of at most ``max_chars``, at the last
    whitespace in each window (a hard cut where the window has none)."""
    chunks: List[str] = []
    start, n = 0, len(text)
    while start < n:
        while start < n and text[start].isspace():
            start += 1
        if start >= n:
            break
        end = start + max_chars
        if end >= n:
            end = n
        else:
            cut = max(text.rfind(" ", start + 1, end + 1), text.rfind("\n", start + 1, end + 1),
                      text.rfind("\t", start + 1, end + 1))
            if cut > start:
                end = cut
        chunk = text[start:end].strip()
        if chunk:
            chunks.append(chunk)
        start = end
    return chunks


# -- held-out split -------------------------------------------------------------------------------
def is_heldout(text: str, fraction: float, seed: int = 0) -> bool:
    """Whether a text belongs to the held-out part: a hash of the seed and the
    text's content, so the split does not depend on order or on the other texts."""
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode("utf8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


class TextSplit:
    """One side of :func:`split_heldout`: a re-iterable filtered view of the texts."""

    def __init__(self, texts: Iterable, fraction: float, seed: int, heldout: bool) -> None:
        self.source, self.fraction, self.seed, self.heldout = texts, fraction, seed, heldout

    def __iter__(self) -> Iterator:
        for item in self.source:
            text = item.text if isinstance(item, RawText) else item
            if is_heldout(text, self.fraction, self.seed) == self.heldout:
                yield item


def split_heldout(texts: Iterable, fraction: float, seed: int = 0) -> Tuple[TextSplit, TextSplit]:
    """``(train, heldout)`` views of ``texts`` (strings or :class:`RawText`), split by
    :func:`is_heldout`: deterministic per text, about ``fraction`` held out. Both
    views stream from ``texts`` again on every pass (it must be re-iterable, as
    :class:`RawTexts` and lists are). Identical texts always land on the same side.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"held-out fraction must be in [0, 1); got {fraction}.")
    if iter(texts) is texts:  # a generator or iterator: the two views would share one pass
        raise ConfigError("split_heldout needs re-iterable texts (a list or RawTexts), not an iterator.")
    return TextSplit(texts, fraction, seed, False), TextSplit(texts, fraction, seed, True)
