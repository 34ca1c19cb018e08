"""The word vocabulary of an ELMo language model (the softmax classes).

Built from the training sentences (spaCy tokens), kept in bilm-tf's ``vocab.txt``
order: ``<S>``, ``</S>``, ``<UNK>``, then the words by decreasing count (ties by
first occurrence, so the order is deterministic). The frequency order matters:
sampled softmax draws candidates from a log-uniform distribution over ids, which
assumes that small ids are frequent words.

The char CNN reads every word's characters whatever the vocabulary holds; the
vocabulary only decides what the softmax predicts (rare words become ``<UNK>``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from ..errors import ConfigError
from ..pieces.chars import BOS_TOKEN, EOS_TOKEN

__all__ = ["UNK_TOKEN", "SPECIAL_TOKENS", "LmVocab", "build_vocab"]

UNK_TOKEN = "<UNK>"
#: The first three lines of every ``vocab.txt``, in bilm-tf's order.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

VOCAB_FILE = "vocab.txt"


class LmVocab:
    """Words <-> ids, ``<S>`` = 0, ``</S>`` = 1, ``<UNK>`` = 2, then by frequency."""

    def __init__(self, words: Sequence[str], *, source: str = "vocabulary") -> None:
        words = list(words)
        if tuple(words[:3]) != SPECIAL_TOKENS:
            raise ConfigError(
                f"{source}: a language-model vocabulary starts with {list(SPECIAL_TOKENS)}, "
                f"found {words[:3]}. Write it with LmVocab.to_file (bilm-tf's vocab.txt order)."
            )
        index: Dict[str, int] = {}
        for i, word in enumerate(words):
            if not word or any(c in word for c in "\n\r"):
                raise ConfigError(f"{source}: line {i + 1} is empty or contains a line break.")
            if word in index:
                raise ConfigError(f"{source}: '{word}' appears twice (lines {index[word] + 1} and {i + 1}).")
            index[word] = i
        self.words: List[str] = words
        self.index = index

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self.index

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def unk_id(self) -> int:
        return 2

    def id_of(self, word: str) -> int:
        """The id of ``word``, ``<UNK>``'s for words not in the vocabulary."""
        return self.index.get(word, 2)

    def to_file(self, path: Union[str, Path]) -> Path:
        """Write ``vocab.txt`` (one word per line, UTF-8); ``path`` may be a folder."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        path.write_text("".join(word + "\n" for word in self.words), encoding="utf-8")
        return path

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "LmVocab":
        """Read a ``vocab.txt`` written by :meth:`to_file` (or bilm-tf's)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Could not read the vocabulary '{path}' ({exc}).") from exc
        # split("\n"), not splitlines(): a word may contain U+2028 and friends.
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls(lines, source=str(path))


def build_vocab(
    sentences: Iterable[Sequence[str]],
    *,
    min_count: int = 1,
    max_size: Optional[int] = None,
) -> LmVocab:
    """Count the words of ``sentences`` and keep the frequent ones.

    Args:
        sentences: tokenized sentences (without ``<S>``/``</S>``).
        min_count: words seen fewer times become ``<UNK>``.
        max_size: most entries, the three special tokens included (None: no limit).
    """
    if min_count < 1:
        raise ConfigError(f"vocab min_count must be >= 1, got {min_count}")
    if max_size is not None and max_size < len(SPECIAL_TOKENS) + 1:
        raise ConfigError(f"vocab max_size must be at least {len(SPECIAL_TOKENS) + 1}, got {max_size}")
    counts: Counter = Counter()
    for sentence in sentences:
        counts.update(sentence)
    for special in SPECIAL_TOKENS:
        counts.pop(special, None)  # a literal "<S>" in the text is the boundary token anyway
    # Counter keeps first-occurrence order; sorted() is stable, so ties keep it.
    ranked = [w for w, c in sorted(counts.items(), key=lambda item: -item[1]) if c >= min_count]
    if max_size is not None:
        ranked = ranked[: max_size - len(SPECIAL_TOKENS)]
    return LmVocab([*SPECIAL_TOKENS, *ranked])
