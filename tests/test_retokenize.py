"""``doc._.ctx`` follows retokenization (issue 7, defect 2.1).

After ``merge_entities``, ``merge_noun_chunks`` or any ``doc.retokenize()``, the
stored rows are re-aligned by character offsets: a merged token gets the mean of
the rows it covers (rows with pieces only; piece count = their sum), each part of
a split token gets the row (and the piece count) of the token it came from. The
expected values here are computed independently from a snapshot taken before the
change, by plain loops over character spans. Tiny random BERT (and a tiny random
ELMo), CPU, offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import pytest
import spacy
import srsly
import torch
from spacy.language import Language
from spacy.pipeline.functions import merge_entities, merge_noun_chunks
from spacy.tokens import Doc, DocBin

import spacy_ctx.doc_data as doc_data
from spacy_ctx import install_vector_hooks
from spacy_ctx.ctx_data import CtxData, deserialize_ctx_data, serialize_ctx_data
from spacy_ctx.errors import StaleCtxError

from .elmo_utils import write_random_elmo

ISSUE_TEXT = "New York City is big and the river bank is wide ."
CTX_KEY = ("._.", "ctx", None, None)  # where doc._.ctx lives in doc.user_data

# Docs serialized without their user hooks warn (W109); that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*W109")


# --------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------


@dataclass
class Snapshot:
    """The rows of a Doc before a change, with the character span of each row."""

    spans: List[Tuple[int, int]]
    layers: np.ndarray
    counts: np.ndarray
    vector_mode: str

    @classmethod
    def of(cls, doc: Doc) -> "Snapshot":
        ctx = doc._.ctx
        assert ctx.layers.shape[1] == len(doc)
        return cls(
            spans=[(t.idx, t.idx + len(t)) for t in doc],
            layers=ctx.layers.copy(),
            counts=ctx.piece_counts.copy(),
            vector_mode=ctx.vector_mode,
        )

    def overlapping(self, start: int, end: int) -> List[int]:
        return [k for k, (s, e) in enumerate(self.spans) if s < end and start < e]

    def expected(self, doc: Doc) -> Tuple[np.ndarray, np.ndarray]:
        """(layers, piece_counts) the Doc's current tokens should have."""
        rows, counts = [], []
        for token in doc:
            over = self.overlapping(token.idx, token.idx + len(token))
            if len(over) == 1:
                rows.append(self.layers[:, over[0]])
                counts.append(int(self.counts[over[0]]))
                continue
            keep = [k for k in over if self.counts[k] > 0]
            if keep:
                mean = self.layers[:, keep].astype(np.float32).mean(axis=1)
            else:
                mean = np.zeros(self.layers[:, 0].shape, dtype=np.float32)
            rows.append(mean.astype(self.layers.dtype))
            counts.append(int(sum(self.counts[k] for k in over)))
        return np.stack(rows, axis=1), np.asarray(counts)

    def vectors(self, layers: np.ndarray) -> np.ndarray:
        if self.vector_mode == "last" or layers.shape[0] == 1:
            return layers[-1].astype(np.float32)
        return layers.astype(np.float32).mean(axis=0)


def check_tokens(doc: Doc, snap: Snapshot, atol: float = 1e-6) -> None:
    """Token-level getters and hooks, read before anything else touches the Doc."""
    layers, counts = snap.expected(doc)
    vectors = snap.vectors(layers)
    for token in reversed(doc):  # the last token first: an IndexError on the old code
        np.testing.assert_allclose(token._.ctx_vector, vectors[token.i], rtol=0, atol=atol)
        np.testing.assert_allclose(token.vector, vectors[token.i], rtol=0, atol=atol)
        assert token.has_vector == (counts[token.i] > 0), token.text


def check_doc(doc: Doc, snap: Snapshot, atol: float = 1e-6) -> None:
    """Doc-level data, then every token, span and the Doc vector."""
    layers, counts = snap.expected(doc)
    ctx = doc._.ctx
    assert ctx.layers.shape == (snap.layers.shape[0], len(doc), snap.layers.shape[2])
    assert ctx.layers.dtype == snap.layers.dtype
    np.testing.assert_allclose(ctx.layers, layers, rtol=0, atol=atol)
    assert ctx.piece_counts.tolist() == counts.tolist()
    assert ctx.piece_counts.dtype == np.int32
    assert ctx.token_spans.tolist() == [[t.idx, t.idx + len(t)] for t in doc]
    check_tokens(doc, snap, atol)
    vectors = snap.vectors(layers)
    keep = counts > 0
    expected_doc = vectors[keep].mean(axis=0) if keep.any() else np.zeros(vectors.shape[1])
    np.testing.assert_allclose(doc.vector, expected_doc, rtol=0, atol=atol)
    np.testing.assert_allclose(doc._.ctx_vector, expected_doc, rtol=0, atol=atol)
    for start in range(len(doc)):
        span = doc[start : start + 3]
        k = keep[span.start : span.end]
        expected = vectors[span.start : span.end][k].mean(axis=0) if k.any() else 0 * vectors[0]
        np.testing.assert_allclose(span.vector, expected, rtol=0, atol=atol)
        assert span.has_vector == bool(k.any())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def bert_nlp(tiny_bert_dir) -> Language:
    """ctx_bert (all layers, float32) after an entity ruler that finds "New York City"."""
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns([{"label": "GPE", "pattern": "New York City"}])
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "store": "all"})
    return nlp


@pytest.fixture(scope="module")
def half_nlp(tiny_bert_dir) -> Language:
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "ctx_bert",
        config={"model": {"name": str(tiny_bert_dir)}, "store": "all", "store_dtype": "float16"},
    )
    return nlp


def merge(doc: Doc, *ranges: Tuple[int, int]) -> None:
    with doc.retokenize() as retokenizer:
        for start, end in ranges:
            retokenizer.merge(doc[start:end])


def split(doc: Doc, i: int, parts: List[str]) -> None:
    token = doc[i]
    with doc.retokenize() as retokenizer:
        retokenizer.split(token, parts, heads=[token] * len(parts))


# --------------------------------------------------------------------------
# the issue's example: entity_ruler -> ctx_bert -> merge_entities
# --------------------------------------------------------------------------


def test_merge_entities_issue_example(bert_nlp: Language) -> None:
    ref = bert_nlp(ISSUE_TEXT)
    assert [t.text for t in ref][:3] == ["New", "York", "City"] and len(ref) == 12
    snap = Snapshot.of(ref)
    bert_nlp.add_pipe("merge_entities")
    try:
        doc = bert_nlp(ISSUE_TEXT)
    finally:
        bert_nlp.remove_pipe("merge_entities")
    assert [t.text for t in doc][:2] == ["New York City", "is"] and len(doc) == 10
    assert doc._.ctx.layers.shape[1] == len(doc) == 10
    bank = [t.i for t in doc if t.text == "bank"][0]
    np.testing.assert_array_equal(doc._.ctx.layers[:, bank], ref._.ctx.layers[:, 8])
    np.testing.assert_array_equal(doc[bank].vector, ref[8].vector)
    np.testing.assert_array_equal(doc[bank]._.ctx_vector, ref[8]._.ctx_vector)
    np.testing.assert_allclose(
        doc._.ctx.layers[:, 0], ref._.ctx.layers[:, 0:3].mean(axis=1), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(doc[0].vector, ref[0:3].vector, rtol=0, atol=1e-6)
    assert doc._.ctx.piece_counts[0] == ref._.ctx.piece_counts[0:3].sum()
    assert doc._.ctx.piece_counts[1:].tolist() == ref._.ctx.piece_counts[3:].tolist()
    check_doc(doc, snap)


def test_merge_entities_token_getters_first(bert_nlp: Language) -> None:
    """The first reads after the merge are token-level (the O(1) path must notice)."""
    doc = bert_nlp(ISSUE_TEXT)
    snap = Snapshot.of(doc)
    merge_entities(doc)
    check_tokens(doc, snap)
    check_doc(doc, snap)


def test_realigned_data_is_stored_back(bert_nlp: Language) -> None:
    doc = bert_nlp(ISSUE_TEXT)
    merge_entities(doc)
    first = doc._.ctx
    assert doc.user_data[CTX_KEY] is first
    assert doc._.ctx is first  # computed once per change
    doc[3].vector, doc[0:4].vector, doc.vector
    assert doc._.ctx is first


def test_unchanged_tokens_are_checked_in_constant_time(bert_nlp, monkeypatch) -> None:
    doc = bert_nlp(ISSUE_TEXT)
    merge_entities(doc)
    doc._.ctx  # re-aligned once
    calls = []
    original = doc_data._doc_spans
    monkeypatch.setattr(doc_data, "_doc_spans", lambda d: calls.append(1) or original(d))
    for token in doc:
        token.vector, token.has_vector, token._.ctx_vector, token.similarity(doc[0])
        doc[token.i : token.i + 2].vector
    assert calls == []


# --------------------------------------------------------------------------
# merges, splits, both
# --------------------------------------------------------------------------


def test_manual_merges_like_noun_chunks(bert_nlp: Language) -> None:
    doc = bert_nlp(ISSUE_TEXT)
    snap = Snapshot.of(doc)
    merge(doc, (0, 3), (6, 9), (10, 12))  # New York City | the river bank | wide .
    assert [t.text for t in doc] == [
        "New York City", "is", "big", "and", "the river bank", "is", "wide ."
    ]
    np.testing.assert_allclose(
        doc._.ctx.layers[:, 4], snap.layers[:, 6:9].mean(axis=1), rtol=0, atol=1e-6
    )
    check_doc(doc, snap)


def test_merge_noun_chunks_component(bert_nlp: Language) -> None:
    """spaCy's own merge_noun_chunks, on noun chunks from a tiny iterator."""
    words = bert_nlp.make_doc(ISSUE_TEXT)
    doc = Doc(
        bert_nlp.vocab, words=[t.text for t in words], spaces=[bool(t.whitespace_) for t in words],
        heads=list(range(len(words))), deps=["dep"] * len(words),
    )
    doc = bert_nlp(doc)
    snap = Snapshot.of(doc)
    chunks = [(0, 3), (6, 9)]
    label = doc.vocab.strings.add("NP")
    doc.noun_chunks_iterator = lambda d: iter([(s, e, label) for s, e in chunks])
    doc = merge_noun_chunks(doc)
    assert [t.text for t in doc][4] == "the river bank"
    check_doc(doc, snap)


def test_split(bert_nlp: Language) -> None:
    doc = bert_nlp(ISSUE_TEXT)
    snap = Snapshot.of(doc)
    split(doc, 8, ["ba", "nk"])  # bank -> ba nk
    split(doc, 0, ["Ne", "w"])  # New -> Ne w
    assert len(doc) == 14 and doc._.ctx.layers.shape[1] == 14
    for i, j in [(0, 0), (1, 0), (9, 8), (10, 8), (13, 11)]:  # (new token, old row)
        np.testing.assert_array_equal(doc._.ctx.layers[:, i], snap.layers[:, j])
        assert doc._.ctx.piece_counts[i] == snap.counts[j]  # parts keep the full count
    check_doc(doc, snap)


def test_split_last_token_no_index_error(bert_nlp: Language) -> None:
    doc = bert_nlp("The river bank is wide")
    snap = Snapshot.of(doc)
    split(doc, 4, ["wi", "de"])
    np.testing.assert_array_equal(doc[-1].vector, snap.vectors(snap.layers)[4])
    np.testing.assert_array_equal(doc[-2].vector, snap.vectors(snap.layers)[4])
    check_doc(doc, snap)


@pytest.mark.parametrize("read", ["tokens", "doc", "span", "similarity"])
def test_merge_and_split_keeping_the_count(bert_nlp: Language, read: str) -> None:
    """One merge and one split: same len(doc), different spans from the merge on."""
    doc = bert_nlp(ISSUE_TEXT)
    snap = Snapshot.of(doc)
    with doc.retokenize() as retokenizer:
        retokenizer.merge(doc[7:9])  # river bank
        retokenizer.split(doc[10], ["wi", "de"], heads=[doc[10], doc[10]])
    assert len(doc) == len(snap.spans) == 12
    layers, counts = snap.expected(doc)
    vectors = snap.vectors(layers)
    bank = [t.i for t in doc if t.text == "river bank"][0]
    if read == "tokens":
        check_tokens(doc, snap)
    elif read == "doc":
        np.testing.assert_allclose(doc._.ctx.layers, layers, rtol=0, atol=1e-6)
    elif read == "span":
        expected = vectors[bank : bank + 2].mean(axis=0)
        np.testing.assert_allclose(doc[bank : bank + 2].vector, expected, rtol=0, atol=1e-6)
    else:
        expected = cosine(vectors[bank + 1], vectors[0])
        assert doc[bank + 1].similarity(doc[0]) == pytest.approx(expected, abs=1e-5)
    check_doc(doc, snap)


def test_chained_changes_keep_one_row_per_token(bert_nlp: Language) -> None:
    doc = bert_nlp("the company said that the startup would buy the bank in new york " * 3)
    rng = np.random.default_rng(0)
    for step in range(12):
        snap = Snapshot.of(doc)
        if step % 3 == 2:  # split a token of two or more characters
            i = int(rng.choice([t.i for t in doc if len(t) >= 2]))
            cut = int(rng.integers(1, len(doc[i])))
            split(doc, i, [doc[i].text[:cut], doc[i].text[cut:]])
        else:
            start = int(rng.integers(0, len(doc) - 3))
            merge(doc, (start, start + int(rng.integers(2, 4))))
        if step % 2:
            check_tokens(doc, snap)
        assert doc._.ctx.layers.shape[1] == len(doc)
        check_doc(doc, snap, atol=1e-5)


def test_whitespace_tokens(bert_nlp: Language) -> None:
    doc = bert_nlp("a  \n\n b c d")
    assert [t.text for t in doc] == ["a", " \n\n ", "b", "c", "d"]
    snap = Snapshot.of(doc)
    assert snap.counts[1] == 0 and not doc[1].has_vector
    merge(doc, (0, 3), (3, 5))  # a + whitespace + b; c d
    layers, _ = snap.expected(doc)
    np.testing.assert_allclose(
        doc._.ctx.layers[:, 0], snap.layers[:, [0, 2]].mean(axis=1), rtol=0, atol=1e-6
    )
    assert doc._.ctx.piece_counts[0] == snap.counts[0] + snap.counts[2]
    check_doc(doc, snap)

    words = Doc(bert_nlp.vocab, words=["x", "\n", "\n", "y"], spaces=[False, False, False, False])
    doc = bert_nlp(words)
    snap = Snapshot.of(doc)
    assert snap.counts.tolist()[1:3] == [0, 0]
    merge(doc, (1, 3))  # two whitespace tokens: still no vector
    assert doc._.ctx.piece_counts.tolist()[1] == 0
    assert not doc._.ctx.layers[:, 1].any()
    assert not doc[1].has_vector
    check_doc(doc, snap)


def test_float16_rows(half_nlp: Language) -> None:
    doc = half_nlp(ISSUE_TEXT)
    snap = Snapshot.of(doc)
    merge(doc, (0, 3))
    split(doc, 5, ["riv", "er"])
    assert doc._.ctx.layers.dtype == np.float16
    check_doc(doc, snap, atol=2e-3)


def test_merge_with_vocab_vectors(tiny_bert_dir) -> None:
    """With vocab vectors, spaCy reads the last merged span's vector half-way through
    the merge (tokens then overlap and doc.text is not the text): it must get an
    answer, and nothing of that state may be kept."""
    nlp = spacy.blank("en")
    nlp.vocab.set_vector("zebra", np.ones((32,), dtype=np.float32))  # the encoder's width
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "store": "all"})
    assert nlp.vocab.vectors_length > 0
    doc = nlp(ISSUE_TEXT)
    snap = Snapshot.of(doc)
    merge(doc, (0, 3), (7, 9))
    check_doc(doc, snap)

    doc = nlp("the company said that the startup would buy the bank in new york " * 4)
    snap = Snapshot.of(doc)
    n_rows = len(doc)
    merge(doc, (0, 3), (5, 5 + doc_data._SPAN_LOOP_MAX + 8))  # a long last span
    assert doc.user_data[CTX_KEY].n_rows == n_rows  # the half-merged state was not kept
    check_doc(doc, snap)


# --------------------------------------------------------------------------
# spans and similarity
# --------------------------------------------------------------------------


def test_span_vectors_and_similarity_after_merge(bert_nlp: Language) -> None:
    doc = bert_nlp(ISSUE_TEXT)
    snap = Snapshot.of(doc)
    merge_entities(doc)
    layers, counts = snap.expected(doc)
    vectors = snap.vectors(layers)
    span = doc[0:3]  # "New York City is big"
    np.testing.assert_allclose(span.vector, vectors[0:3].mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(span._.ctx_vector, vectors[0:3].mean(axis=0), rtol=0, atol=1e-6)
    assert doc[0].similarity(doc[6]) == pytest.approx(cosine(vectors[0], vectors[6]), abs=1e-5)
    assert span.similarity(doc[6]) == pytest.approx(
        cosine(vectors[0:3].mean(axis=0), vectors[6]), abs=1e-5
    )
    assert doc.similarity(doc[4:8]) == pytest.approx(
        cosine(vectors.mean(axis=0), vectors[4:8].mean(axis=0)), abs=1e-5
    )
    long_span = doc[:]  # longer spans are checked with one doc.to_array
    np.testing.assert_allclose(long_span.vector, vectors.mean(axis=0), rtol=0, atol=1e-6)
    check_doc(doc, snap)


def test_long_span_after_change(bert_nlp: Language) -> None:
    doc = bert_nlp("the company said that the startup would buy the bank in new york " * 4)
    snap = Snapshot.of(doc)
    assert len(doc) > doc_data._SPAN_LOOP_MAX + 4
    merge(doc, (40, 43))
    layers, _ = snap.expected(doc)
    vectors = snap.vectors(layers)
    np.testing.assert_allclose(doc[2:-2].vector, vectors[2:-2].mean(axis=0), rtol=0, atol=1e-6)
    check_doc(doc, snap)


# --------------------------------------------------------------------------
# serialization
# --------------------------------------------------------------------------


@pytest.mark.parametrize("read_before", [False, True])
def test_to_bytes_round_trip_after_merge(bert_nlp: Language, read_before: bool) -> None:
    doc = bert_nlp(ISSUE_TEXT)
    snap = Snapshot.of(doc)
    merge_entities(doc)
    if read_before:
        doc._.ctx
    data = doc.to_bytes()
    loaded = Doc(bert_nlp.vocab).from_bytes(data)
    assert len(loaded) == 10
    install_vector_hooks(loaded)
    check_doc(loaded, snap)
    assert loaded._.ctx.text_hash == doc._.ctx.text_hash


def test_docbin_round_trip_after_merge_and_split(bert_nlp: Language) -> None:
    docs = list(bert_nlp.pipe([ISSUE_TEXT, "The river bank is wide"]))
    snaps = [Snapshot.of(d) for d in docs]
    merge_entities(docs[0])
    split(docs[1], 2, ["ba", "nk"])
    data = DocBin(docs=docs, store_user_data=True).to_bytes()
    loaded = list(DocBin().from_bytes(data).get_docs(bert_nlp.vocab))
    for doc, snap in zip(loaded, snaps):
        install_vector_hooks(doc)
        check_doc(doc, snap)
    # and once more, after the re-aligned data was stored back
    data = DocBin(docs=loaded, store_user_data=True).to_bytes()
    again = list(DocBin().from_bytes(data).get_docs(bert_nlp.vocab))
    for doc, first in zip(again, loaded):
        np.testing.assert_array_equal(doc._.ctx.layers, first._.ctx.layers)
        assert doc._.ctx.token_spans.tolist() == first._.ctx.token_spans.tolist()


def test_ctx_data_codec_keeps_spans_and_loads_old_payloads() -> None:
    layers = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    ctx = CtxData(
        layers=layers, layer_names=["a", "b"], model_name="m",
        piece_counts=np.array([1, 0, 2], dtype=np.int32),
        token_spans=np.array([[0, 3], [4, 5], [5, 9]]), text_hash=1234,
    )
    back = srsly.msgpack_loads(srsly.msgpack_dumps({"x": ctx}))["x"]
    assert isinstance(back, CtxData)
    assert back.token_spans.dtype == np.int64
    assert back.token_spans.tolist() == [[0, 3], [4, 5], [5, 9]]
    assert back.text_hash == 1234
    old_payload = serialize_ctx_data(ctx)
    for key in ("token_spans", "text_hash"):
        del old_payload["__spacy_ctx_data__"][key]
    old = deserialize_ctx_data(srsly.msgpack_loads(srsly.msgpack_dumps(old_payload)))
    assert isinstance(old, CtxData) and old.token_spans is None and old.text_hash is None
    np.testing.assert_array_equal(old.layers, layers)
    with pytest.raises(ValueError, match="token_spans"):
        CtxData(
            layers=layers, layer_names=["a", "b"], model_name="m",
            piece_counts=np.ones(3, dtype=np.int32), token_spans=np.zeros((2, 2), dtype=np.int64),
        )


def test_realign_unit() -> None:
    layers = np.array([[[1, 1], [2, 2], [0, 0], [6, 6]]], dtype=np.float16)
    ctx = CtxData(
        layers=layers, layer_names=["l"], model_name="m",
        piece_counts=np.array([1, 3, 0, 2], dtype=np.int32),
        token_spans=np.array([[0, 2], [3, 5], [5, 6], [6, 9]]),
    )
    # merge 0+1, split the whitespace row, merge the whitespace part with row 3
    out = ctx.realign(np.array([[0, 5], [5, 5], [5, 9]]))
    assert out.layers.dtype == np.float16
    assert out.layers[0].tolist() == [[1.5, 1.5], [0, 0], [6, 6]]
    assert out.piece_counts.tolist() == [4, 0, 2]
    split = ctx.realign(np.array([[0, 1], [1, 2], [3, 5], [5, 6], [6, 7], [7, 9]]))
    assert split.layers[0, :, 0].tolist() == [1, 1, 2, 0, 6, 6]
    assert split.piece_counts.tolist() == [1, 1, 3, 0, 2, 2]
    assert split.token_spans.tolist() == [[0, 1], [1, 2], [3, 5], [5, 6], [6, 7], [7, 9]]


def test_old_payload_without_spans(bert_nlp: Language) -> None:
    doc = bert_nlp(ISSUE_TEXT)
    snap = Snapshot.of(doc)
    payload = doc._.ctx.to_dict()
    del payload["token_spans"], payload["text_hash"]
    doc.user_data[CTX_KEY] = CtxData.from_dict(payload)  # as loaded from an old file
    check_doc(doc, snap)  # counts agree: adopted for the current tokens
    assert doc._.ctx.token_spans is not None
    merge_entities(doc)
    check_doc(doc, snap)

    doc = bert_nlp(ISSUE_TEXT)
    merge_entities(doc)
    doc.user_data[CTX_KEY] = CtxData.from_dict(payload)  # 12 rows, 10 tokens, no spans
    with pytest.raises(StaleCtxError):
        doc._.ctx
    with pytest.raises(StaleCtxError):
        doc[6].vector


def test_ctx_copied_to_another_text_is_refused(bert_nlp: Language) -> None:
    doc = bert_nlp(ISSUE_TEXT)
    part = doc[4:9].as_doc()
    part.user_data[CTX_KEY] = doc.user_data[CTX_KEY]  # user data copied by hand
    with pytest.raises(StaleCtxError):
        part._.ctx
    other = bert_nlp.make_doc("Old York City is big and the river bank is wide .")
    with pytest.raises(ValueError):
        other._.ctx = doc._.ctx
    fresh = bert_nlp.make_doc(ISSUE_TEXT)
    fresh._.ctx = doc._.ctx  # same text: fine
    np.testing.assert_array_equal(fresh._.ctx.layers, doc._.ctx.layers)


# --------------------------------------------------------------------------
# ELMo
# --------------------------------------------------------------------------


def test_elmo_merge_and_split(tmp_path) -> None:
    options, weights = write_random_elmo(tmp_path / "elmo", seed=0)
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.add_pipe("ctx_elmo", config={"model": {"options": str(options), "weights": str(weights)}})
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        doc = nlp("The bank raised rates.  We sat on the river bank.")
    finally:
        torch.set_num_threads(previous)
    snap = Snapshot.of(doc)
    assert snap.vector_mode == "mean" and snap.layers.shape[0] == 3
    assert any(t.is_space for t in doc)
    merge(doc, (0, 2), (9, 12))  # The bank | the river bank
    split(doc, 1, ["rai", "sed"])
    check_doc(doc, snap)
