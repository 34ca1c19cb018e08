"""Documents to pretraining sequences: pieces with spaCy word ids, packing, NSP pairs.

The checkpoint's own tokenizer encodes each document's running text
(:meth:`spacy_ctx.pieces.tokenizer.PieceTokenizer.encode_docs`), and the spaCy
tokens of the same text (``spacy.blank(lang).make_doc`` or a pipeline) say which
pieces form a word, for whole-word and span masking.

Word ids
--------
Every piece of a document gets a *unit* index (``word_ids``): the pieces of one
spaCy token share it. Where one piece overlaps two tokens (spaCy "do" + "n't" vs
a piece "don") the tokens are merged into one unit, so a unit is always a
contiguous run of pieces. A piece aligned to no token (a lone "▁") is a unit of
its own. Units are numbered 0, 1, ... in text order within a document and
renumbered to be unique within each packed sequence; specials and padding get -1.

Packing (RoBERTa's FULL-SENTENCES, BERT without NSP)
---------------------------------------------------
Documents are concatenated with a separator between them (the suffix ids by
default: ``[SEP]``, ``</s>``) and cut into sequences of at most ``seq_len`` ids
*including* the prefix and suffix (``[CLS] ... [SEP]``). A sequence ends before a
unit that does not fit, so a word's pieces stay together; only a unit longer
than a whole sequence (a huge URL) is split. Every piece of every document
appears exactly once, in order. :func:`collate` pads a batch into the tensors
that :func:`spacy_ctx.training.masking.mask_for_mlm` and the model take.

Next-sentence prediction
------------------------
:func:`make_nsp_pairs` builds ``[CLS] A [SEP] B [SEP]`` pairs from documents'
sentences (:func:`encode_documents` with ``sentences=True`` and a spaCy
``sentencizer``, then :func:`sentence_pieces`), half of them with the real next
sentences as B.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch

from ..errors import ConfigError

__all__ = [
    "DocPieces",
    "NspPair",
    "PackedSequence",
    "collate",
    "doc_pieces",
    "encode_documents",
    "make_nsp_pairs",
    "mask_id_of",
    "pack_sequences",
    "sentence_pieces",
    "sentence_splitter",
    "special_ids_of",
]


@dataclass
class DocPieces:
    """One document's pieces: ``ids`` (int64, no specials), ``word_ids`` (int64, the
    unit of each piece, 0..n_units-1 ascending) and, when sentences were asked for,
    ``sentence_starts`` (int64 piece positions where sentences begin, first 0)."""

    ids: np.ndarray
    word_ids: np.ndarray
    sentence_starts: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.ids)

    def sentences(self) -> List["DocPieces"]:
        """The document cut at :attr:`sentence_starts` (one sentence when unknown)."""
        if self.sentence_starts is None or len(self.ids) == 0:
            return [self] if len(self.ids) else []
        bounds = list(self.sentence_starts[1:]) + [len(self.ids)]
        out, start = [], 0
        for end in bounds:
            if end > start:
                out.append(DocPieces(self.ids[start:end], _renumber(self.word_ids[start:end])))
            start = end
        return out


@dataclass
class PackedSequence:
    """One training sequence: ``ids`` (with specials), ``word_ids`` (-1 at specials),
    ``special_mask`` (True at specials), ``token_type_ids`` (None: all zero)."""

    ids: np.ndarray
    word_ids: np.ndarray
    special_mask: np.ndarray
    token_type_ids: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class NspPair:
    """``[CLS] A [SEP] B [SEP]`` for next-sentence prediction.

    Unpacks as ``ids, token_type_ids, is_next = pair``; also carries
    ``special_mask`` and ``word_ids`` like :class:`PackedSequence`, so
    :func:`collate` and the masking take it as it is.
    """

    ids: np.ndarray
    token_type_ids: np.ndarray
    is_next: bool
    special_mask: np.ndarray
    word_ids: np.ndarray

    def __iter__(self) -> Iterator[Any]:
        return iter((self.ids, self.token_type_ids, self.is_next))

    def __len__(self) -> int:
        return len(self.ids)


# -- pieces of documents ---------------------------------------------------------------------
def doc_pieces(ids: np.ndarray, piece_counts: np.ndarray, piece_index: Optional[np.ndarray]) -> DocPieces:
    """Units from one document's ``encode_docs`` output (see the module docstring)."""
    ids = np.asarray(ids, dtype=np.int64)
    n = len(ids)
    if n == 0:
        return DocPieces(ids, np.zeros((0,), dtype=np.int64))
    counts = np.asarray(piece_counts, dtype=np.int64)
    if piece_index is None:
        piece_index = np.arange(n, dtype=np.int64)
    index = np.asarray(piece_index, dtype=np.int64)
    # Edge i joins pieces i and i+1 when some token uses pieces on both sides.
    coverage = np.zeros((n + 1,), dtype=np.int64)
    used = counts > 0
    if used.any():
        offsets = (np.cumsum(counts) - counts)[used]
        low = np.minimum.reduceat(index, offsets)
        high = np.maximum.reduceat(index, offsets)
        np.add.at(coverage, low, 1)
        np.add.at(coverage, high, -1)
    joined = np.cumsum(coverage)[: n - 1] > 0
    starts = np.concatenate([[True], ~joined])
    return DocPieces(ids, np.cumsum(starts).astype(np.int64) - 1)


def _sentence_starts(doc: Any, counts: np.ndarray, index: Optional[np.ndarray], pieces: DocPieces) -> np.ndarray:
    """Piece positions where the Doc's sentences begin, moved to unit starts."""
    n = len(pieces.ids)
    if index is None:
        index = np.arange(n, dtype=np.int64)
    offsets = np.cumsum(counts) - counts
    first_piece = np.full((len(counts),), n, dtype=np.int64)
    used = counts > 0
    first_piece[used] = index[offsets[used]]
    unit_start = np.searchsorted(pieces.word_ids, pieces.word_ids, side="left")  # first piece of each unit
    starts = [0]
    for sent in doc.sents:
        if sent.start == 0:
            continue
        position = int(first_piece[sent.start : sent.end].min(initial=n))
        if position >= n:
            continue
        position = int(unit_start[position])
        if position > starts[-1]:
            starts.append(position)
    return np.asarray(starts, dtype=np.int64)


def encode_documents(
    texts: Iterable[str],
    tokenizer: Any,
    make_doc: Callable[[str], Any],
    *,
    sentences: bool = False,
    batch_size: int = 64,
) -> Iterator[DocPieces]:
    """Encode texts with the checkpoint's ``PieceTokenizer`` and units from spaCy tokens.

    ``make_doc``: text -> Doc, e.g. ``spacy.blank("en").make_doc``; with
    ``sentences=True`` the Docs must have sentence boundaries (pass an ``nlp``
    with a ``sentencizer``, see :func:`sentence_splitter`), and every result has
    ``sentence_starts``. Streams: ``batch_size`` texts are tokenized at a time.
    """
    batch: List[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield from _encode_batch(batch, tokenizer, make_doc, sentences)
            batch = []
    if batch:
        yield from _encode_batch(batch, tokenizer, make_doc, sentences)


def _encode_batch(texts: List[str], tokenizer: Any, make_doc: Callable[[str], Any], sentences: bool) -> List[DocPieces]:
    docs = [make_doc(text) for text in texts]
    out = []
    for doc, (ids, counts, index) in zip(docs, tokenizer.encode_docs(docs)):
        pieces = doc_pieces(ids, counts, index)
        if sentences:
            if not doc.has_annotation("SENT_START"):
                raise ConfigError(
                    "encode_documents(sentences=True) needs Docs with sentence boundaries; pass "
                    "an nlp with a sentencizer as make_doc, e.g. sentence_splitter('en')."
                )
            pieces.sentence_starts = _sentence_starts(doc, np.asarray(counts, dtype=np.int64), index, pieces)
        out.append(pieces)
    return out


def sentence_splitter(lang: str = "en") -> Callable[[str], Any]:
    """A blank spaCy pipeline of ``lang`` with a rule-based ``sentencizer``."""
    import spacy

    nlp = spacy.blank(lang)
    nlp.add_pipe("sentencizer")
    return nlp


def sentence_pieces(documents: Iterable[DocPieces]) -> List[List[DocPieces]]:
    """``make_nsp_pairs`` input: each document as its list of sentences (empty ones dropped)."""
    return [doc.sentences() for doc in documents]


def special_ids_of(tokenizer: Any) -> Set[int]:
    """Ids a random replacement must never use: the tokenizer's special added tokens
    (``[CLS]``, ``<pad>``, ``[MASK]``, ...) plus its prefix, suffix and pad ids."""
    ids: Set[int] = set(tokenizer.prefix_ids) | set(tokenizer.suffix_ids) | {tokenizer.pad_id}
    for token_id, token in tokenizer.tokenizer.get_added_tokens_decoder().items():
        if token.special:
            ids.add(int(token_id))
    return ids


def mask_id_of(tokenizer: Any) -> int:
    """The id of the tokenizer's mask token (``[MASK]``, ``<mask>``)."""
    for name in ("[MASK]", "<mask>"):
        token_id = tokenizer.tokenizer.token_to_id(name)
        if token_id is not None:
            return int(token_id)
    for token_id, token in tokenizer.tokenizer.get_added_tokens_decoder().items():
        if token.special and "mask" in token.content.lower():
            return int(token_id)
    raise ConfigError(
        f"{tokenizer.source or 'the tokenizer'}: no mask token ([MASK] or <mask>); masked-LM "
        "pretraining needs one. Add it to the tokenizer (tokenizer_config.json mask_token)."
    )


# -- packing -------------------------------------------------------------------------------------
DocInput = Union[DocPieces, Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]], Sequence[int], np.ndarray]


def _as_doc(item: DocInput) -> DocPieces:
    """Accept DocPieces, an ``encode_docs`` triple, or plain piece ids (a unit each)."""
    if isinstance(item, DocPieces):
        return DocPieces(np.asarray(item.ids, dtype=np.int64), _renumber(item.word_ids), item.sentence_starts)
    if isinstance(item, tuple) and len(item) == 3 and not np.isscalar(item[0]):
        return doc_pieces(*item)
    ids = np.asarray(item, dtype=np.int64).reshape(-1)
    return DocPieces(ids, np.arange(len(ids), dtype=np.int64))


def _renumber(word_ids: np.ndarray) -> np.ndarray:
    """Units numbered 0, 1, ... by runs of equal ids."""
    word_ids = np.asarray(word_ids, dtype=np.int64)
    if len(word_ids) == 0:
        return word_ids
    starts = np.concatenate([[True], word_ids[1:] != word_ids[:-1]])
    return np.cumsum(starts).astype(np.int64) - 1


def pack_sequences(
    docs_pieces: Iterable[DocInput],
    seq_len: int,
    prefix_ids: Sequence[int],
    suffix_ids: Sequence[int],
    *,
    separator_ids: Optional[Sequence[int]] = None,
) -> Iterator[PackedSequence]:
    """Concatenate documents and cut them into sequences of at most ``seq_len`` ids.

    ``docs_pieces``: :class:`DocPieces` (see :func:`encode_documents`), or
    ``(ids, piece_counts, piece_index)`` triples from ``encode_docs``, or plain
    id lists (every piece its own unit). Each sequence is ``prefix + content +
    suffix``; documents inside one sequence are separated by ``separator_ids``
    (default: ``suffix_ids``; for GPT-2 pass the end-of-text id). Streams; the
    last, shorter sequence is yielded too. Empty documents are skipped.
    """
    prefix = np.asarray(list(prefix_ids), dtype=np.int64)
    suffix = np.asarray(list(suffix_ids), dtype=np.int64)
    separator = suffix if separator_ids is None else np.asarray(list(separator_ids), dtype=np.int64)
    capacity = seq_len - len(prefix) - len(suffix)
    if capacity < len(separator) + 1:
        raise ConfigError(
            f"seq_len {seq_len} leaves {capacity} positions for text after {len(prefix)} prefix "
            f"and {len(suffix)} suffix ids; it must be at least {len(prefix) + len(suffix) + len(separator) + 1}."
        )
    parts: List[Tuple[np.ndarray, np.ndarray]] = []  # (ids, word ids) with -1 = special
    used = 0
    next_word = 0

    def emit() -> PackedSequence:
        nonlocal parts, used, next_word
        ids = np.concatenate([prefix] + [p[0] for p in parts] + [suffix])
        words = np.concatenate(
            [np.full(len(prefix), -1, dtype=np.int64)] + [p[1] for p in parts]
            + [np.full(len(suffix), -1, dtype=np.int64)]
        )
        parts, used, next_word = [], 0, 0
        return PackedSequence(ids, words, words < 0)

    for item in docs_pieces:
        doc = _as_doc(item)
        n = len(doc.ids)
        if n == 0:
            continue
        unit_starts = np.flatnonzero(np.concatenate([[True], doc.word_ids[1:] != doc.word_ids[:-1]]))
        first_unit = int(unit_starts[1]) if len(unit_starts) > 1 else n
        position = 0
        while position < n:
            if position == 0 and used > 0:
                # The separator only goes in when the document's first unit fits after it.
                if used + len(separator) + min(first_unit, capacity) > capacity:
                    yield emit()
                    continue
                if len(separator):
                    parts.append((separator, np.full(len(separator), -1, dtype=np.int64)))
                    used += len(separator)
            room = capacity - used
            if n - position <= room:
                cut = n
            else:
                end = position + room
                cut = int(unit_starts[np.searchsorted(unit_starts, end, side="right") - 1])
                if cut <= position:  # the unit at `position` does not fit the room left
                    if used > 0:
                        yield emit()
                        continue
                    cut = end  # a unit longer than a whole sequence: split it
            words = doc.word_ids[position:cut]
            words = words - words[0] + next_word
            next_word = int(words[-1]) + 1
            parts.append((doc.ids[position:cut], words))
            used += cut - position
            position = cut
            if used >= capacity:
                yield emit()
    if used > 0:
        yield emit()


def collate(
    sequences: Sequence[Union[PackedSequence, NspPair]], pad_id: int, *, pad_to: Optional[int] = None
) -> Dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence (or ``pad_to``); returns int64 tensors
    ``input_ids``, ``attention_mask`` (1 = real), ``word_ids`` (-1 at specials and
    padding), ``token_type_ids`` and bool ``special_mask`` (True at specials *and*
    padding, what :func:`~spacy_ctx.training.masking.mask_for_mlm` expects); for
    :class:`NspPair` items also ``next_sentence_label`` (0 = is next, 1 = random,
    as ``BertForPreTraining``)."""
    if not sequences:
        raise ConfigError("collate() got an empty batch.")
    length = max(len(seq) for seq in sequences)
    if pad_to is not None:
        if pad_to < length:
            raise ConfigError(f"pad_to {pad_to} is shorter than the longest sequence ({length}).")
        length = pad_to
    batch = len(sequences)
    input_ids = torch.full((batch, length), int(pad_id), dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    special = torch.ones((batch, length), dtype=torch.bool)
    word_ids = torch.full((batch, length), -1, dtype=torch.long)
    types = torch.zeros((batch, length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        input_ids[row, :n] = torch.as_tensor(np.asarray(seq.ids, dtype=np.int64))
        attention[row, :n] = 1
        special[row, :n] = torch.as_tensor(np.asarray(seq.special_mask, dtype=bool))
        word_ids[row, :n] = torch.as_tensor(np.asarray(seq.word_ids, dtype=np.int64))
        if seq.token_type_ids is not None:
            types[row, :n] = torch.as_tensor(np.asarray(seq.token_type_ids, dtype=np.int64))
    out = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "special_mask": special,
        "word_ids": word_ids,
        "token_type_ids": types,
    }
    if all(isinstance(seq, NspPair) for seq in sequences):
        out["next_sentence_label"] = torch.tensor([0 if seq.is_next else 1 for seq in sequences], dtype=torch.long)
    return out


# -- next-sentence prediction ----------------------------------------------------------------
def make_nsp_pairs(
    doc_sentences: Sequence[Sequence[Union[DocPieces, Sequence[int]]]],
    seq_len: int,
    rng: random.Random,
    *,
    prefix_ids: Sequence[int],
    sep_ids: Sequence[int],
    short_seq_prob: float = 0.1,
    next_prob: float = 0.5,
) -> Iterator[NspPair]:
    """Sentence pairs for NSP, as BERT's ``create_pretraining_data``.

    ``doc_sentences``: documents -> sentences -> piece ids (lists of ints, or
    :class:`DocPieces` to keep spaCy word ids; see :func:`sentence_pieces`).
    Per document, consecutive sentences fill a chunk up to the target length
    (``seq_len`` minus the specials; with ``short_seq_prob`` a random shorter
    one); segment A is the first 1..k-1 sentences of the chunk; with
    probability ``next_prob`` B is the rest of the chunk (``is_next``), else B is
    consecutive sentences from a random other document and the unused sentences
    of the chunk are reused. A chunk of one sentence takes its actual next
    sentence as B when the document has one; at the end of a document it can
    only get a random B, and the next free choice is then turned into a real
    next pair, so ``is_next`` stays at ``next_prob`` overall (BERT's own script
    ends up with fewer real pairs). With only one document there is no random B:
    pairs are all real and single-sentence chunks are skipped. The pair is trimmed (from the longer segment, at a random end) to
    fit ``prefix A sep B sep`` in ``seq_len``. ``rng``: a ``random.Random``.
    """
    prefix = np.asarray(list(prefix_ids), dtype=np.int64)
    sep = np.asarray(list(sep_ids), dtype=np.int64)
    max_pieces = seq_len - len(prefix) - 2 * len(sep)
    if max_pieces < 2:
        raise ConfigError(f"seq_len {seq_len} is too short for NSP pairs: it needs room for two pieces and the specials.")
    docs = [[s for s in (_as_doc(sent) for sent in sentences) if len(s.ids)] for sentences in doc_sentences]
    nonempty = [i for i, sentences in enumerate(docs) if sentences]
    owed = 0  # random Bs forced by single-sentence chunks, not yet balanced
    for doc_index, sentences in enumerate(docs):
        target = max_pieces
        if rng.random() < short_seq_prob:
            target = rng.randint(2, max_pieces)
        chunk: List[DocPieces] = []
        length = 0
        i = 0
        while i < len(sentences):
            chunk.append(sentences[i])
            length += len(sentences[i].ids)
            if i == len(sentences) - 1 or length >= target:
                is_next = rng.random() < next_prob
                if is_next and len(chunk) == 1 and i + 1 < len(sentences):
                    i += 1  # one long sentence: its actual next sentence is B
                    chunk.append(sentences[i])
                if len(chunk) == 1:  # no next sentence: B must be random
                    owed += int(is_next)
                    is_next = False
                elif not is_next and owed:  # make up for a forced random B
                    owed -= 1
                    is_next = True
                a_end = 1 if len(chunk) < 2 else rng.randint(1, len(chunk) - 1)
                first = chunk[:a_end]
                second: List[DocPieces] = []
                if is_next:
                    second = chunk[a_end:]
                else:
                    others = [d for d in nonempty if d != doc_index]
                    if others:
                        other = docs[others[rng.randrange(len(others))]]
                        target_b = max(target - sum(len(s.ids) for s in first), 1)
                        start = rng.randrange(len(other))
                        b_length = 0
                        for sentence in other[start:]:
                            second.append(sentence)
                            b_length += len(sentence.ids)
                            if b_length >= target_b:
                                break
                        i -= len(chunk) - a_end  # the unused sentences start the next chunk
                    elif len(chunk) > 1:  # one document only: no random B exists
                        is_next, second = True, chunk[a_end:]
                if second:
                    yield _nsp_pair(_join(first), _join(second), is_next, max_pieces, rng, prefix, sep)
                chunk, length = [], 0
                target = max_pieces
                if rng.random() < short_seq_prob:
                    target = rng.randint(2, max_pieces)
            i += 1


def _join(sentences: List[DocPieces]) -> Tuple[np.ndarray, np.ndarray]:
    ids, words, offset = [], [], 0
    for sentence in sentences:
        ids.append(sentence.ids)
        words.append(sentence.word_ids + offset)
        offset += int(sentence.word_ids[-1]) + 1
    return np.concatenate(ids), np.concatenate(words)


def _nsp_pair(
    a: Tuple[np.ndarray, np.ndarray],
    b: Tuple[np.ndarray, np.ndarray],
    is_next: bool,
    max_pieces: int,
    rng: random.Random,
    prefix: np.ndarray,
    sep: np.ndarray,
) -> NspPair:
    # Trim the longer segment at a random end until the pair fits (BERT's truncate_seq_pair).
    a_lo, a_hi, b_lo, b_hi = 0, len(a[0]), 0, len(b[0])
    while (a_hi - a_lo) + (b_hi - b_lo) > max_pieces:
        if a_hi - a_lo > b_hi - b_lo:
            if rng.random() < 0.5:
                a_lo += 1
            else:
                a_hi -= 1
        elif rng.random() < 0.5:
            b_lo += 1
        else:
            b_hi -= 1
    a_ids, a_words = a[0][a_lo:a_hi], a[1][a_lo:a_hi]
    b_ids, b_words = b[0][b_lo:b_hi], b[1][b_lo:b_hi]
    a_words = _renumber(a_words)
    b_words = _renumber(b_words) + (int(a_words[-1]) + 1 if len(a_words) else 0)
    specials = lambda n: np.full(n, -1, dtype=np.int64)  # noqa: E731
    ids = np.concatenate([prefix, a_ids, sep, b_ids, sep])
    words = np.concatenate([specials(len(prefix)), a_words, specials(len(sep)), b_words, specials(len(sep))])
    n_first = len(prefix) + len(a_ids) + len(sep)
    types = np.concatenate([np.zeros(n_first, dtype=np.int64), np.ones(len(ids) - n_first, dtype=np.int64)])
    return NspPair(ids, types, bool(is_next), words < 0, words)
