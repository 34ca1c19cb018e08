"""ELMo backend: Docs -> sentences or chunks -> char ids -> batches -> per-Doc outputs.

The ELMo counterpart of :mod:`spacy_ctx.backends.bert`. The backend cuts each Doc
into segments (its sentences when they are valid, else bounded chunks), frames
each segment with ``<S>`` ... ``</S>`` (as BERT's backend adds ``[CLS]``/``[SEP]``),
turns the distinct words of the call into char ids (:mod:`spacy_ctx.pieces.chars`)
and context-independent embeddings (once per distinct word, LRU-cached), packs the
segments into length-sorted batches and hands the encoder tensors only. The
encoder's rows for ``<S>``/``</S>`` are dropped, and each segment's rows land at
its tokens' places in the Doc's output.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..encoders.elmo import ElmoBiLM
from ..encoders.elmo_checkpoint import (
    load_elmo,
    load_elmo_safetensors,
    save_elmo_options,
    save_elmo_safetensors,
)
from ..errors import ConfigError
from ..pieces.chars import BOS_TOKEN, EOS_TOKEN, elmo_char_ids
from .base import Backend, CtxOutput, register_backend
from .batching import batch_stats, pack_by_length
from .word_cache import WordEmbeddingCache, embed_distinct_words

WEIGHTS_FILE = "model.safetensors"
N_BOUNDARIES = 2  # <S> and </S> around every segment


class _Segment(NamedTuple):
    """One encoder row: a run of non-space tokens of one Doc."""

    doc: int  # index of the Doc in the call
    offset: int  # index of its first row among the Doc's non-space tokens
    words: List[str]


@register_backend
class ElmoBackend(Backend):
    """An :class:`ElmoBiLM` run per sentence.

    Docs with sentence boundaries are encoded sentence by sentence; others in
    consecutive chunks of ``chunk_size`` tokens (sentences longer than that are
    cut the same way). Sentences that are out of order, overlap or leave gaps (a
    custom ``sents`` hook can produce them) cannot be trusted to place rows: such
    Docs are chunked instead, with one warning per call. Whitespace tokens are not
    fed to the model: they get zero rows, as in ``ctx_bert``. Context-independent
    word embeddings are cached (``cache_size`` words, LRU) whenever no gradients
    are needed.
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
        if int(cache_size) < 0:
            raise ConfigError(f"cache_size must be a number of words >= 0, got {cache_size}")
        self.bilm = bilm
        self.chunk_size = int(chunk_size)
        self.cache_size = int(cache_size)
        self.word_cache = WordEmbeddingCache(max_entries=self.cache_size)

    @classmethod
    def from_pretrained(
        cls,
        options_path: Path,
        weights_path: Path,
        *,
        name: str,
        chunk_size: int = 100,
        cache_size: int = 50_000,
        mixed_precision: Optional[str] = None,
    ) -> "ElmoBackend":
        """Load from an AllenNLP/bilm-tf ``options.json`` + ``weights.hdf5`` pair."""
        return cls(
            load_elmo(options_path, weights_path),
            name=name,
            chunk_size=chunk_size,
            cache_size=cache_size,
            mixed_precision=mixed_precision,
        )

    @property
    def layer_names(self) -> List[str]:
        return self.bilm.layer_names

    @property
    def width(self) -> int:
        return self.bilm.output_dim

    def settings(self) -> Dict:
        return {**super().settings(), "chunk_size": self.chunk_size, "cache_size": self.cache_size}

    # -- segments -------------------------------------------------------------------
    @staticmethod
    def _sentence_spans(doc) -> Optional[List[Tuple[int, int]]]:
        """``(start, end)`` of the Doc's sentences, or None when they cannot be trusted.

        Sentences must be in order, disjoint and cover the Doc; a ``sents`` user
        hook can break each of these (spaCy's own boundaries never do).
        """
        spans: List[Tuple[int, int]] = []
        expected_start = 0
        for sent in doc.sents:
            start, end = int(sent.start), int(sent.end)
            if start != expected_start or end < start:
                return None
            spans.append((start, end))
            expected_start = end
        return spans if expected_start == len(doc) else None

    def _segments(self, doc) -> Tuple[List[List[int]], bool]:
        """Token indices of each sentence/chunk of ``doc`` (whitespace tokens left out),
        and whether the Doc's sentences had to be ignored."""
        spans: Optional[List[Tuple[int, int]]] = [(0, len(doc))]
        bad_sentences = False
        if doc.has_annotation("SENT_START"):
            spans = self._sentence_spans(doc)
            if spans is None:
                spans, bad_sentences = [(0, len(doc))], True
        segments = []
        for start, end in spans:
            kept = [i for i in range(start, end) if not doc[i].is_space]
            for offset in range(0, len(kept), self.chunk_size):
                segments.append(kept[offset : offset + self.chunk_size])
        return segments, bad_sentences

    def segment_stats(self, docs: Sequence, *, max_batch_tokens: Optional[int] = None) -> Dict[str, int]:
        """What :meth:`encode_docs` would feed the encoder for ``docs``, without running it.

        The ELMo counterpart of ``TransformerBackend.window_stats``. Returns ``n_docs``,
        ``n_tokens`` (non-space tokens encoded), ``n_segments`` (sentences or chunks:
        encoder sequences) and ``n_positions`` (tokens plus ``<S>``/``</S>`` of each
        segment); with ``max_batch_tokens`` also ``n_batches`` and ``n_padded_positions``.
        """
        sizes = [
            len(segment) + N_BOUNDARIES for doc in docs for segment in self._segments(doc)[0]
        ]
        stats = {
            "n_docs": len(docs),
            "n_tokens": sum(sizes) - N_BOUNDARIES * len(sizes),
            "n_segments": len(sizes),
            "n_positions": sum(sizes),
        }
        if max_batch_tokens is not None:
            stats.update(batch_stats(sizes, max_batch_tokens))
        return stats

    # -- encoding -------------------------------------------------------------------
    def encode_docs(
        self,
        docs: Sequence,
        *,
        max_batch_tokens: int,
        keep_layers: Optional[Sequence[int]] = None,
    ) -> List[CtxOutput]:
        keep = list(range(len(self.layer_names))) if keep_layers is None else list(keep_layers)
        segments: List[_Segment] = []
        piece_counts: List[np.ndarray] = []
        n_bad = 0
        for d, doc in enumerate(docs):
            piece_counts.append(np.array([0 if t.is_space else 1 for t in doc], dtype=np.int32))
            doc_segments, bad_sentences = self._segments(doc)
            n_bad += bad_sentences
            offset = 0
            for indices in doc_segments:
                segments.append(_Segment(d, offset, [doc[i].text for i in indices]))
                offset += len(indices)
        if n_bad:
            warnings.warn(
                f"{n_bad} of {len(docs)} Docs have sentences that are out of order, overlap or "
                f"leave tokens out (a custom 'sents' hook?); ctx_elmo encoded them in chunks of "
                f"{self.chunk_size} tokens instead of by sentence.",
                UserWarning,
                stacklevel=2,
            )
        n_rows = [int(counts.sum()) for counts in piece_counts]
        layers = self._encode_segments(segments, n_rows, keep, max_batch_tokens)
        return [CtxOutput(doc_layers, counts) for doc_layers, counts in zip(layers, piece_counts)]

    def _word_table(self, segments: List[_Segment]) -> Tuple[torch.Tensor, np.ndarray]:
        """Embeddings of the distinct words of every framed segment, and each word's row.

        The char CNN runs once per distinct word, and only on words the cache does
        not hold. Cached rows carry no gradient, so the cache only serves
        gradient-free runs.
        """
        words = [w for segment in segments for w in (BOS_TOKEN, *segment.words, EOS_TOKEN)]
        device = self.device

        def embed(distinct: List[str]) -> torch.Tensor:
            char_ids = torch.from_numpy(elmo_char_ids(distinct)).to(device)
            return self.bilm.token_embeddings(char_ids)

        cache = None if torch.is_grad_enabled() else self.word_cache
        return embed_distinct_words(words, embed, cache, device=device)

    def _encode_segments(
        self, segments: List[_Segment], n_rows: List[int], keep: List[int], max_batch_tokens: int
    ) -> List[torch.Tensor]:
        """Encode every segment; returns one (n_keep, n_rows[d], width) tensor per Doc."""
        device = self.device
        n_keep = len(keep)
        if not segments:
            return [torch.zeros((n_keep, 0, self.width), device=device) for _ in n_rows]
        keep_index = torch.tensor(keep, dtype=torch.long, device=device)
        with self.autocast():
            table, word_rows = self._word_table(segments)
        sizes = [len(s.words) + N_BOUNDARIES for s in segments]
        starts = np.cumsum([0] + sizes)  # each framed segment's first entry in word_rows
        # Without autograd, each batch's rows are copied into the Docs' outputs as
        # soon as it is done, so only one padded batch is alive at a time. With
        # autograd every batch stays alive for backward anyway: rows are collected
        # as views and concatenated at the end.
        grad = torch.is_grad_enabled()
        outputs = None if grad else [torch.zeros((n_keep, n, self.width), device=device) for n in n_rows]
        results: List[Optional[torch.Tensor]] = [None] * len(segments)
        for batch in pack_by_length(sizes, max_batch_tokens):
            longest = max(sizes[i] for i in batch)
            rows = np.zeros((len(batch), longest), dtype=np.int64)  # padding: any row, ignored
            for row, index in enumerate(batch):
                rows[row, : sizes[index]] = word_rows[starts[index] : starts[index + 1]]
            lengths = torch.tensor([sizes[i] for i in batch], dtype=torch.long, device=device)
            embeddings = table[torch.from_numpy(rows).to(device)]
            with self.autocast():
                encoded = self.bilm.forward_from_embeddings(embeddings, lengths)
            del embeddings
            for row, index in enumerate(batch):
                segment = segments[index]
                n_words = len(segment.words)
                # Drop <S> (position 0) and </S> (position n_words + 1).
                rows_out = encoded[:, row, 1 : n_words + 1]
                if outputs is None:
                    results[index] = rows_out.index_select(0, keep_index).float()
                else:
                    target = outputs[segment.doc][:, segment.offset : segment.offset + n_words]
                    for j, layer in enumerate(keep):
                        target[j].copy_(rows_out[layer])  # no temporary copy of the rows
            del encoded
        if outputs is not None:
            return outputs
        per_doc: List[List[torch.Tensor]] = [[] for _ in n_rows]
        for segment, result in zip(segments, results):
            per_doc[segment.doc].append(result)  # segments are in Doc order
        return [
            torch.cat(parts, dim=1) if parts else torch.zeros((n_keep, 0, self.width), device=device)
            for parts in per_doc
        ]

    # -- files ----------------------------------------------------------------------
    def weights_changed(self) -> None:
        self.word_cache.clear()  # cached word embeddings came from the old weights
        # Optimizer steps write through numpy views, which the encoder's caches of
        # derived weights cannot detect.
        self.bilm.drop_derived_weights()

    def save_files(self, path: Path) -> None:
        save_elmo_safetensors(self.bilm, path / WEIGHTS_FILE)
        save_elmo_options(self.bilm, path / "options.json")  # for people reading the folder

    @classmethod
    def from_files(cls, path: Path, settings: Dict) -> "ElmoBackend":
        return cls(load_elmo_safetensors(path / WEIGHTS_FILE), **settings)
