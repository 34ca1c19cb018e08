"""ELMo backend: sentences (or bounded chunks) of non-space tokens, batched by length."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..encoders.elmo import ElmoBiLM, WordEmbeddingCache
from ..encoders.elmo_checkpoint import load_elmo_safetensors, save_elmo_options, save_elmo_safetensors
from ..errors import ConfigError
from .batching import pack_by_length
from .base import CtxOutput, Backend, register_backend

WEIGHTS_FILE = "model.safetensors"
N_BOUNDARIES = 2  # <S> and </S>, added inside the model


@register_backend
class ElmoBackend(Backend):
    """An :class:`ElmoBiLM` run per sentence.

    Docs with sentence boundaries are encoded sentence by sentence; others in
    consecutive chunks of ``chunk_size`` tokens (sentences longer than that are
    cut the same way). Whitespace tokens are not fed to the model: they get zero
    rows, as in ``ctx_bert``. Context-independent word embeddings are cached
    (``cache_size`` words, LRU) whenever no gradients are needed.
    """

    family = "elmo"

    def __init__(
        self,
        bilm: ElmoBiLM,
        *,
        name: str,
        chunk_size: int = 100,
        cache_size: int = 50_000,
        mixed_precision: Optional[str] = None,
    ) -> None:
        super().__init__(name, mixed_precision)
        if int(chunk_size) < 1:
            raise ConfigError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
        self.bilm = bilm
        self.chunk_size = int(chunk_size)
        self.cache_size = int(cache_size)
        self.word_cache = WordEmbeddingCache(max_entries=self.cache_size)

    @property
    def layer_names(self) -> List[str]:
        return self.bilm.layer_names

    @property
    def width(self) -> int:
        return self.bilm.output_dim

    def settings(self) -> Dict:
        return {**super().settings(), "chunk_size": self.chunk_size, "cache_size": self.cache_size}

    def _segments(self, doc) -> List[List[int]]:
        """Token indices of each sentence/chunk of ``doc``, whitespace tokens left out."""
        if doc.has_annotation("SENT_START"):
            spans = [(sent.start, sent.end) for sent in doc.sents]
        else:
            spans = [(0, len(doc))]
        segments = []
        for start, end in spans:
            kept = [i for i in range(start, end) if not doc[i].is_space]
            for offset in range(0, len(kept), self.chunk_size):
                segments.append(kept[offset : offset + self.chunk_size])
        return segments

    def encode_docs(
        self,
        docs: Sequence,
        *,
        max_batch_tokens: int,
        keep_layers: Optional[Sequence[int]] = None,
    ) -> List[CtxOutput]:
        keep = list(range(len(self.layer_names))) if keep_layers is None else list(keep_layers)
        # (doc index, words) for every segment, in doc order.
        segments: List[Tuple[int, List[str]]] = []
        counts_per_doc = []
        for d, doc in enumerate(docs):
            counts_per_doc.append(np.array([0 if t.is_space else 1 for t in doc], dtype=np.int32))
            for indices in self._segments(doc):
                segments.append((d, [doc[i].text for i in indices]))
        # Cached rows carry no gradient, so the cache only serves gradient-free runs.
        cache = None if torch.is_grad_enabled() else self.word_cache
        results: List[Optional[torch.Tensor]] = [None] * len(segments)
        sizes = [len(words) + N_BOUNDARIES for _, words in segments]
        for batch in pack_by_length(sizes, max_batch_tokens):
            with self.autocast():
                layers, _ = self.bilm.encode_words([segments[i][1] for i in batch], cache=cache)
            layers = layers[keep].float()
            for row, index in enumerate(batch):
                results[index] = layers[:, row, : len(segments[index][1])]
        per_doc: List[List[torch.Tensor]] = [[] for _ in docs]
        for (d, _), result in zip(segments, results):
            per_doc[d].append(result)
        outputs = []
        for parts, piece_counts in zip(per_doc, counts_per_doc):
            if parts:
                stacked = torch.cat(parts, dim=1)
            else:
                stacked = torch.zeros((len(keep), 0, self.width), device=self.device)
            outputs.append(CtxOutput(stacked, piece_counts))
        return outputs

    def weights_changed(self) -> None:
        self.word_cache.clear()  # cached word embeddings came from the old weights

    def save_files(self, path: Path) -> None:
        save_elmo_safetensors(self.bilm, path / WEIGHTS_FILE)
        save_elmo_options(self.bilm, path / "options.json")  # for people reading the folder

    @classmethod
    def from_files(cls, path: Path, settings: Dict) -> "ElmoBackend":
        return cls(load_elmo_safetensors(path / WEIGHTS_FILE), **settings)
