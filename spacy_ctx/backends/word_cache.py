"""Context-independent word embeddings, computed once per distinct word and cached.

ELMo's token layer depends only on a word's characters, so a backend can embed
each distinct word of a call once, and reuse rows across calls through a bounded
LRU cache. Used by :class:`spacy_ctx.backends.elmo.ElmoBackend`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["WordEmbeddingCache", "embed_distinct_words"]


class WordEmbeddingCache:
    """Bounded LRU cache from word string to its context-independent embedding row.

    Rows are stored detached, on the device they were computed on. The cache
    belongs to one model with frozen weights: call :meth:`clear` after changing or
    reloading the weights, and do not use it when training the char CNN (cached
    rows carry no gradient).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._rows: "OrderedDict[str, Tensor]" = OrderedDict()
        #: Lookups that found the word / did not.
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, word: object) -> bool:
        return word in self._rows

    def get(self, word: str) -> Optional[Tensor]:
        """The cached row of ``word`` (marked most recently used), or None; counts hit/miss."""
        row = self._rows.get(word)
        if row is None:
            self.misses += 1
            return None
        self._rows.move_to_end(word)
        self.hits += 1
        return row

    def put(self, word: str, row: Tensor) -> None:
        """Store ``row`` (width,) for ``word``, evicting least recently used entries."""
        if self.max_entries == 0:
            return
        self._rows[word] = row.detach()
        self._rows.move_to_end(word)
        while len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        self._rows.clear()
        self.hits = 0
        self.misses = 0

    @property
    def stats(self) -> Dict[str, int]:
        """``{"hits", "misses", "size", "max_entries"}``."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "size": len(self),
            "max_entries": self.max_entries,
        }


def embed_distinct_words(
    words: Sequence[str],
    embed: Callable[[List[str]], Tensor],
    cache: Optional[WordEmbeddingCache] = None,
    device: Optional[torch.device] = None,
) -> Tuple[Tensor, np.ndarray]:
    """Embed each distinct word of ``words`` once.

    Args:
        words: words, repeats allowed.
        embed: maps a list of distinct words to their rows, shape (n, width).
        cache: when given, rows it holds are reused and new rows are stored in it
            (each distinct word counts one hit or miss per call). Without a cache
            the rows keep their autograd graph.
        device: where the table goes (cached rows may live elsewhere); default:
            where ``embed`` puts its rows.

    Returns:
        ``(table, index)``: ``table`` (n_distinct, width) and the int64 array
        ``index`` (len(words),), so that ``table[index[i]]`` embeds ``words[i]``.
        Rows are in order of first occurrence.
    """
    position_of: Dict[str, int] = {}
    index = np.fromiter(
        (position_of.setdefault(word, len(position_of)) for word in words),
        dtype=np.int64,
        count=len(words),
    )
    distinct = list(position_of)
    if cache is None:
        return embed(distinct), index
    rows: List[Optional[Tensor]] = [cache.get(word) for word in distinct]
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
        computed = embed([distinct[i] for i in missing])
        for i, row in zip(missing, computed.unbind(0)):
            # clone: a view would keep the whole computed batch alive in the cache.
            row = row.detach().clone()
            rows[i] = row
            cache.put(distinct[i], row)
    if not rows:
        return embed([]), index
    if device is None:
        device = rows[missing[0] if missing else 0].device  # type: ignore[union-attr]
    return torch.stack([row.to(device) for row in rows]), index  # type: ignore[union-attr]
