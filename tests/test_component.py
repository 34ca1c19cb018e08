"""The component suite: every behaviour of ``ctx_bert`` and ``ctx_elmo``, per family.

Each test runs once per encoder family (the ``family`` fixture of conftest.py,
see tests/families.py): BERT on the tiny random checkpoint of ``tiny_bert_dir``
(width 32, 2 layers, 64 positions), ELMo on the tiny random files of
``tiny_elmo_files`` (width 16, 2 LSTM layers; with a sentencizer unless a test
says otherwise). Unusual input, store settings, batching identity, saving and
loading pipelines, serialized Docs and their vector hooks, initialization,
multiprocessing and invalid settings. Family-specific tests live elsewhere:
BERT checkpoint files and windows in test_bad_input.py, ELMo parity, sentences,
chunks and the word cache in test_ctx_elmo.py. Offline, CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import spacy
import srsly
import torch
from safetensors.torch import load_file
from spacy.language import Language
from spacy.tokens import Doc, DocBin

from spacy_ctx import install_vector_hooks
from spacy_ctx.ctx_data import CtxData
from spacy_ctx.errors import CheckpointError, ConfigError

from .families import BANK_TEXT, BATCH_TEXTS, LONG_TEXT, Family, check_doc, first_use_raises

#: Texts for pipelines and serialized Docs; the longest is last.
TEXTS = [
    "Hello world.",
    BANK_TEXT,
    "",
    "a  \n\n b \u200b c",
    "Crème brûlée über 東京 🙂 naïve.",
    "Hello  \n\n world .",
    "Hello world!",
    BATCH_TEXTS[2],
    "x",
    LONG_TEXT,
]
CTX_KEY = ("._.", "ctx", None, None)  # where doc._.ctx lives in doc.user_data

# Docs serialized without their user hooks warn (W109); that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*W109")


# --------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nlp(family: Family) -> Language:
    """The family's pipeline with the default test settings (store all, float32)."""
    return family.make_nlp()


@pytest.fixture(scope="module")
def ref_docs(nlp: Language) -> List[Doc]:
    return list(nlp.pipe(TEXTS))


@pytest.fixture
def src(family: Family, tmp_path: Path) -> Family:
    """The family with a private copy of its checkpoint, which the test may delete."""
    return family.copy_to(tmp_path / "src")


def assert_same_layers(
    actual: np.ndarray, expected: np.ndarray, *, atol: float, rtol: float = 0.0
) -> None:
    """Bitwise equal when ``atol`` is 0, else close."""
    assert actual.shape == expected.shape
    if atol:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    else:
        np.testing.assert_array_equal(actual, expected)


def assert_same_batched(family: Family, actual: np.ndarray, expected: np.ndarray) -> None:
    """The same Doc encoded in another batch: bitwise for ELMo, float32 rounding for BERT."""
    assert_same_layers(actual, expected, atol=family.batch_tol, rtol=family.batch_tol)


def assert_same_ctx(doc: Doc, ref: Doc, atol: float = 0.0) -> None:
    ctx, expected = doc._.ctx, ref._.ctx
    assert isinstance(ctx, CtxData), type(ctx)
    assert ctx.layers.dtype == expected.layers.dtype
    assert_same_layers(ctx.layers, expected.layers, atol=atol)
    assert ctx.layer_names == expected.layer_names
    assert ctx.model_name == expected.model_name
    assert ctx.vector_mode == expected.vector_mode
    assert ctx.piece_counts.dtype == np.int32
    np.testing.assert_array_equal(ctx.piece_counts, expected.piece_counts)


def assert_same_vectors(family: Family, nlp: Language, ref_docs: List[Doc]) -> None:
    for doc, ref in zip(nlp.pipe(TEXTS), ref_docs):
        assert [t.text for t in doc] == [t.text for t in ref]
        assert_same_layers(doc._.ctx.layers, ref._.ctx.layers, atol=family.rerun_tol)
        np.testing.assert_array_equal(doc._.ctx.piece_counts, ref._.ctx.piece_counts)
        for token, ref_token in zip(doc, ref):
            assert_same_layers(token.vector, ref_token.vector, atol=family.rerun_tol)


def outputs(nlp: Language, texts=TEXTS) -> List[np.ndarray]:
    return [doc._.ctx.layers for doc in nlp.pipe(texts)]


def per_family(family: Family, *, bert, elmo):
    return bert if family.name == "bert" else elmo


# --------------------------------------------------------------------------
# unusual input
# --------------------------------------------------------------------------

BAD_TEXTS = {
    "empty": "",
    "whitespace_only": "   \n\t  \n ",
    "whitespace_only_newline_last": "   \n\t  \n",
    "control": "a\x01b \x02\x03 \x7f\x1b[0m ok \x07",
    "nul": "nul\x00byte \x00 end",
    "nul_only": "\x00",
    "long_token": "x" * 5000,
    "long_token_many_pieces": "before " + "中" * 5000 + " after",
    "long_multibyte_token": "before " + "é東" * 2500 + " after",
    "long_punct_token": "a!" * 2500,
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "hebrew": "שלום עולם! מה שלומך?",
    "rtl_mixed": "שלום עולם. مرحبا بالعالم!",
    "rtl_override": "\u202eabc\u202c def",
    "mixed_scripts": "Hello мир 世界 مرحبا שלום नमस्ते 123 café!",
    "mixed_scripts_greek_korean": "Hello мир 世界 नमस्ते Γειά 안녕 ok.",
    "zero_width": "zero\u200bwidth \u200b a\u200cb\u200d \ufeff soft\u00adhyphen",
    "zero_width_in_words": "zero\u200bwidth soft\u00adhyphen \ufeffbom",
    "emoji": "I love 🍕 and 🚀! 👩‍👩‍👧 🇫🇷 👍🏽 😀😀",
    "emoji_runs": "🙂👍🏽 👨‍👩‍👧 family 🚀🚀 !",
    "replacement_char": "x \ufffd y",
}
#: Texts with thousands of BERT pieces: slow in a batch where everything is also run alone.
MANY_PIECES = ("long_token_many_pieces", "long_multibyte_token", "long_punct_token")


@pytest.mark.parametrize("kind", sorted(BAD_TEXTS))
def test_unusual_text(family: Family, nlp: Language, kind: str) -> None:
    doc = nlp(BAD_TEXTS[kind])
    layers = check_doc(family, doc)
    n_stored = len(family.layer_names)
    if kind == "empty":
        assert len(doc) == 0 and layers.shape == (n_stored, 0, family.width)
        assert not doc.has_vector
        assert doc.similarity(doc) == 0.0
    if kind.startswith("whitespace_only"):
        assert len(doc) > 0 and all(t.is_space for t in doc)
    if kind.startswith("whitespace_only") or (kind == "nul_only" and family.name == "bert"):
        # BERT's tokenizer drops control characters; ELMo encodes every non-space token.
        assert len(doc) > 0
        assert doc._.ctx.piece_counts.tolist() == [0] * len(doc)
        assert not layers.any() and not doc.has_vector
        assert not doc.vector.any()
    if kind.startswith("long"):
        assert doc._.ctx.piece_counts.sum() >= 1
        assert doc._.ctx.piece_counts.max() <= 5000


def test_long_token_with_thousands_of_pieces(family: Family, nlp: Language) -> None:
    """BERT: 5000 pieces in one token are windowed; ELMo: the characters are cut."""
    doc = nlp(BAD_TEXTS["long_token_many_pieces"])
    assert [t.text for t in doc][::2] == ["before", "after"]
    # One BERT piece per CJK character; ELMo reads one token of (at most 50) characters.
    assert doc._.ctx.piece_counts[1] == per_family(family, bert=5000, elmo=1)
    check_doc(family, doc)


NO_PIECES_CASES = [  # text, tokens without pieces for BERT, for ELMo
    ("hello \u200b world", [1], []),
    ("a  \n\n b", [1], [1]),
    ("hello\t\tworld", [1], [1]),
    ("\x00", [0], []),
    ("\x01\x02 \x7f", [0, 1], []),
    ("ok \u200d\u200c ok", [1], []),
    ("x \ufeff y", [1], []),
]


@pytest.mark.parametrize(
    "text,bert_no_pieces,elmo_no_pieces", NO_PIECES_CASES, ids=[c[0] for c in NO_PIECES_CASES]
)
def test_tokens_without_pieces_get_zero_vectors(
    family: Family, nlp: Language, text: str, bert_no_pieces: List[int], elmo_no_pieces: List[int]
) -> None:
    """BERT: tokens without WordPiece pieces (whitespace, control and zero-width
    characters); ELMo: whitespace tokens only."""
    no_pieces = per_family(family, bert=bert_no_pieces, elmo=elmo_no_pieces)
    doc = nlp(text)
    counts = doc._.ctx.piece_counts
    assert [i for i in range(len(doc)) if counts[i] == 0] == no_pieces, [t.text for t in doc]
    check_doc(family, doc)
    for i in no_pieces:
        token = doc[i]
        assert not token.has_vector
        np.testing.assert_array_equal(token.vector, np.zeros((family.width,), dtype=np.float32))
        span = doc[i : i + 1]
        assert not span.has_vector and not span.vector.any()
        assert token.similarity(doc[0]) == 0.0  # zero vector: 0, never nan
    # The doc vector averages only the tokens that have pieces.
    with_pieces = [t.vector for t in doc if t.has_vector]
    if with_pieces:
        np.testing.assert_allclose(doc.vector, np.mean(with_pieces, axis=0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sentencizer", [False, True])
def test_whitespace_tokens_get_zero_rows(family: Family, sentencizer: bool) -> None:
    """Whitespace tokens are left out of the encoder: the other rows are as without them."""
    nlp = family.make_nlp(sentencizer=sentencizer)
    spaced = nlp("Hello  world \n\n !  The\t\tbank  .")
    plain = nlp("Hello world ! The bank .")
    space_tokens = [t.i for t in spaced if t.is_space]
    assert len(space_tokens) >= 3
    layers = check_doc(family, spaced)
    assert spaced._.ctx.piece_counts[space_tokens].tolist() == [0] * len(space_tokens)
    kept = [t.i for t in spaced if not t.is_space]
    assert [spaced[i].text for i in kept] == [t.text for t in plain]
    if sentencizer:
        assert [len([t for t in s if not t.is_space]) for s in spaced.sents] == [
            len(s) for s in plain.sents
        ]
    assert_same_layers(layers[:, kept], plain._.ctx.layers, atol=family.rerun_tol)
    for i in space_tokens:
        assert not spaced[i].has_vector
        assert not spaced[i].vector.any()
        assert spaced[i].similarity(spaced[0]) == 0.0
    # Doc/span vectors average the non-space tokens only.
    np.testing.assert_allclose(spaced.vector, plain.vector, rtol=1e-6, atol=1e-6)


def test_unusual_docs_in_one_batch(family: Family, nlp: Language) -> None:
    # BERT's texts with thousands of pieces are left out only to keep this fast.
    slow = MANY_PIECES if family.name == "bert" else ()
    texts = [text for kind, text in BAD_TEXTS.items() if kind not in slow]
    texts += TEXTS + ["The bank rose by the river bank .", "the company said " * 30]
    docs = list(nlp.pipe(texts, batch_size=len(texts)))
    for text, doc in zip(texts, docs):
        check_doc(family, doc)
        alone = nlp(text)
        np.testing.assert_array_equal(doc._.ctx.piece_counts, alone._.ctx.piece_counts)
        assert_same_batched(family, doc._.ctx.layers, alone._.ctx.layers)


def test_all_empty_batch(family: Family, nlp: Language) -> None:
    n_stored, width = len(family.layer_names), family.width
    docs = list(nlp.pipe(["", "", " ", "\x00"]))
    assert [d._.ctx.layers.shape for d in docs] == [
        (n_stored, 0, width), (n_stored, 0, width), (n_stored, 1, width), (n_stored, 1, width)
    ]
    for doc in docs:
        check_doc(family, doc)
    # A NUL token has no BERT pieces, but is a (non-space) ELMo token.
    expected = per_family(family, bert=[False] * 4, elmo=[False, False, False, True])
    assert [doc.has_vector for doc in docs] == expected


def test_unusual_words_as_doc_tokens(family: Family) -> None:
    nlp = family.make_nlp(sentencizer=False)
    words = ["\x00", "\x01\x02", "y" * 5000, "مرحبا", "👩‍👩‍👧", "\u200b", " ", "a", "👨‍👩‍👧"]
    doc = nlp(Doc(nlp.vocab, words=words))
    layers = check_doc(family, doc)
    counts = doc._.ctx.piece_counts.tolist()
    if family.name == "bert":
        assert counts[0] == counts[1] == counts[5] == counts[6] == 0
        assert counts[2] >= 1 and counts[3] >= 1 and counts[4] >= 1 and counts[7] == 1
        assert counts[8] >= 1
    else:
        assert counts == [1, 1, 1, 1, 1, 1, 0, 1, 1]
    assert layers[:, 7].any() and layers[:, 3].any()


# --------------------------------------------------------------------------
# vectors, store settings, precision
# --------------------------------------------------------------------------


def test_token_vectors_and_bank_similarity(family: Family, nlp: Language) -> None:
    doc = nlp(BANK_TEXT)
    layers = check_doc(family, doc)
    assert doc._.ctx.layer_names == family.layer_names
    assert doc._.ctx.vector_mode == family.vector_mode
    assert doc._.ctx.model_name == family.model_name
    vectors = family.token_vectors(layers)
    for token in doc:
        assert token.vector.shape == (family.width,)
        np.testing.assert_allclose(token.vector, vectors[token.i], rtol=1e-6, atol=1e-7)
        assert token.has_vector
    banks = [t.i for t in doc if t.text == "bank"]
    assert banks[0] == 1 and len(banks) == 2
    k = banks[1]
    if family.name == "elmo":
        # Same word, same context-free token layer (BERT's adds positions).
        np.testing.assert_array_equal(layers[0, 1], layers[0, k])
    # Different contextual layers.
    assert not np.allclose(layers[1:, 1], layers[1:, k])
    similarity = doc[1].similarity(doc[k])
    assert np.isfinite(similarity)
    assert abs(similarity - 1.0) > 1e-4
    assert doc[1].similarity(doc[1]) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(doc.vector, vectors.mean(axis=0), rtol=1e-5, atol=1e-6)
    span = doc[5:9]
    np.testing.assert_allclose(span.vector, vectors[5:9].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_store_last_and_all(family: Family, ref_docs: List[Doc]) -> None:
    n_layers = len(family.layer_names) - 1
    last_docs = list(family.make_nlp(store="last").pipe(TEXTS))
    for doc, ref in zip(last_docs, ref_docs):
        all_ctx, last_ctx = ref._.ctx, doc._.ctx
        assert all_ctx.layers.shape == (n_layers + 1, len(ref), family.width)
        assert all_ctx.layer_names == family.layer_names
        assert last_ctx.layers.shape == (1, len(doc), family.width)
        assert last_ctx.layer_names == family.layer_names[-1:]
        check_doc(family, doc, layer_names=family.layer_names[-1:])
        assert_same_layers(last_ctx.layers[0], all_ctx.layers[-1], atol=family.rerun_tol)
        for token, ref_token in zip(doc, ref):
            # Stored "last": the vector is the last layer, whatever the vector mode.
            assert_same_layers(token.vector, all_ctx.layers[-1, token.i], atol=family.rerun_tol)
            if family.vector_mode == "last":
                assert_same_layers(token.vector, ref_token.vector, atol=family.rerun_tol)


def test_store_none_stores_nothing(family: Family) -> None:
    nlp = family.make_nlp(store="none", vector_hooks=False)
    for doc in nlp.pipe(TEXTS):
        assert doc._.ctx is None
        assert doc.user_data.get(CTX_KEY) is None
        assert not doc.user_hooks and not doc.user_token_hooks and not doc.user_span_hooks
        assert doc._.ctx_vector is None
        for token in doc:
            assert token._.ctx_vector is None


def test_store_float16_halves_the_bytes(family: Family, ref_docs: List[Doc]) -> None:
    nlp16 = family.make_nlp(store_dtype="float16")
    docs16 = list(nlp16.pipe(TEXTS))
    for doc16, ref in zip(docs16, ref_docs):
        ctx16, ctx32 = doc16._.ctx, ref._.ctx
        assert ctx16.layers.dtype == np.float16 and ctx32.layers.dtype == np.float32
        assert ctx16.layers.nbytes * 2 == ctx32.layers.nbytes
        np.testing.assert_allclose(
            ctx16.layers.astype(np.float32), ctx32.layers, rtol=2e-3, atol=2e-3
        )
        for token, ref_token in zip(doc16, ref):
            assert token.vector.dtype == np.float32  # vectors are float32 whatever is stored
            np.testing.assert_allclose(token.vector, ref_token.vector, rtol=2e-3, atol=2e-3)
    long16, long32 = docs16[-1]._.ctx, ref_docs[-1]._.ctx
    ratio = len(srsly.msgpack_dumps(long16)) / len(srsly.msgpack_dumps(long32))
    assert 0.45 < ratio < 0.6, ratio
    bin16 = DocBin(store_user_data=True, docs=docs16).to_bytes()
    bin32 = DocBin(store_user_data=True, docs=ref_docs).to_bytes()
    assert len(bin16) < 0.65 * len(bin32), (len(bin16), len(bin32))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_is_close_and_stored_as_float32(
    family: Family, nlp: Language, precision: str
) -> None:
    full = outputs(nlp, BATCH_TEXTS)
    mixed = family.make_nlp(model={"mixed_precision": precision})
    for _ in range(2):  # ELMo: the second run reads the (low-precision) word cache
        for doc, expected in zip(mixed.pipe(BATCH_TEXTS), full):
            layers = check_doc(family, doc)
            assert layers.dtype == np.float32
            np.testing.assert_allclose(layers, expected, rtol=0, atol=0.1)


# --------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------


def test_same_doc_alone_and_in_batches_is_identical(family: Family, nlp: Language) -> None:
    target = "We sat on the river bank. It was cold."
    alone = nlp(target)._.ctx.layers
    others = [
        "Hi.",
        "A rather longer sentence about something else entirely, with commas, and more words.",
        "x " * 40,
        "Two sentences here. Yes.",
    ] + [f"Filler doc number {k} with {'word ' * k}." for k in range(20)]
    batches = [
        [target] + others[:2],
        others[:3] + [target],
        others + [target] + others,  # ELMo: > 16 sentences, more than one padded block
    ]
    for texts in batches:
        docs = list(nlp.pipe(texts, batch_size=len(texts)))
        for doc, text in zip(docs, texts):
            check_doc(family, doc)
            if text == target:
                assert_same_batched(family, doc._.ctx.layers, alone)


def spy_encoder_batches(
    family: Family, nlp: Language, monkeypatch: pytest.MonkeyPatch
) -> List[List[int]]:
    """Record each encoder batch as the lengths of its rows without their two boundary
    entries ([CLS]/[SEP] pieces of a BERT window, <S>/</S> of an ELMo sentence)."""
    backend = family.component(nlp).backend
    batches: List[List[int]] = []
    if family.name == "bert":
        encode_batch = backend._encode_batch

        def bert_spy(windows, *args, **kwargs):
            batches.append([len(ids) for ids in windows])
            return encode_batch(windows, *args, **kwargs)

        monkeypatch.setattr(backend, "_encode_batch", bert_spy)
    else:
        forward_from_embeddings = backend.bilm.forward_from_embeddings

        def elmo_spy(embeddings, lengths):
            batches.append([int(n) - 2 for n in lengths])
            return forward_from_embeddings(embeddings, lengths)

        monkeypatch.setattr(backend.bilm, "forward_from_embeddings", elmo_spy)
    return batches


def test_small_max_batch_tokens_equals_one_by_one(
    family: Family, nlp: Language, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = family.make_nlp(max_batch_tokens=16)
    assert family.component(small).cfg["max_batch_tokens"] == 16
    longer = "One more. And another one here, longer than sixteen tokens in total."
    texts = BATCH_TEXTS + ["", "   ", longer]
    one_by_one = [nlp(text)._.ctx.layers for text in texts]

    # Padded size (rows * (longest + 2 boundaries)) within the budget unless a
    # single row is longer than the budget on its own.
    batches = spy_encoder_batches(family, small, monkeypatch)
    for batch_size in (1, 3, len(texts)):
        batches.clear()
        docs = list(small.pipe(texts, batch_size=batch_size))
        assert len(docs) == len(texts)
        for doc, expected in zip(docs, one_by_one):
            check_doc(family, doc)
            assert_same_batched(family, doc._.ctx.layers, expected)
        assert batches, "the encoder never ran"
        for lengths in batches:
            assert len(lengths) == 1 or len(lengths) * (max(lengths) + 2) <= 16, batches
        if family.name == "bert":
            # One encoder row per window: 62 pieces (64 positions - [CLS]/[SEP]) that
            # start 46 (3/4 of the window) apart.
            assert max(n for lengths in batches for n in lengths) <= 62
            pieces = [int(doc._.ctx.piece_counts.sum()) for doc in docs]
            assert max(pieces) > 62, "one Doc should need two windows"
            n_rows = sum(0 if n == 0 else 1 + max(0, -(-(n - 62) // 46)) for n in pieces)
        else:
            # One encoder row per sentence with a non-space token (chunk_size is 100).
            n_rows = sum(
                1
                for doc in docs
                if len(doc)
                for sent in doc.sents
                if not all(t.is_space for t in sent)
            )
        assert sum(len(b) for b in batches) == n_rows
    assert any(len(b) > 1 for b in batches), "short rows should share a batch"


def test_thread_count_does_not_change_results(family: Family, nlp: Language) -> None:
    """ELMo claims bitwise independence of the CPU thread count; BERT float32 rounding."""
    texts = [BANK_TEXT, "Short. A slightly longer second sentence, for padding."]
    single = outputs(nlp, texts)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        double = outputs(nlp, texts)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(single, double):
        assert_same_batched(family, a, b)


# --------------------------------------------------------------------------
# pipelines: to_disk / spacy.load, to_bytes / from_bytes
# --------------------------------------------------------------------------


def check_saved_files(family: Family, component_dir: Path) -> None:
    """The saved encoder files are real: a readable config and weights of the right width."""
    encoder_dir = component_dir / "encoder"
    names = {p.name for p in component_dir.rglob("*") if p.is_file()}
    assert (encoder_dir / "model.safetensors").is_file(), names
    state = load_file(str(encoder_dir / "model.safetensors"))
    if family.name == "bert":
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= names, names
        config = json.loads((encoder_dir / "config.json").read_text(encoding="utf8"))
        assert config["hidden_size"] == family.width and config["num_hidden_layers"] == 2
        assert state["embeddings.word_embeddings.weight"].shape[1] == family.width
    else:
        assert "options.json" in names, names
        options = json.loads((encoder_dir / "options.json").read_text(encoding="utf8"))
        assert 2 * options["lstm"]["projection_dim"] == family.width
        assert options["lstm"]["n_layers"] == 2
        assert state and all(torch.isfinite(t).all() for t in state.values())


def test_to_disk_and_load_without_source_files(src: Family, tmp_path: Path) -> None:
    # A non-default setting that changes the results: the loaded pipeline must keep it.
    setting, value = src.chunk_setting
    nlp = src.make_nlp(model={setting: value}, sentencizer=False)
    expected = list(nlp.pipe(TEXTS))
    out = tmp_path / "pipeline"
    nlp.to_disk(out)
    src.delete_source()
    check_saved_files(src, out / src.pipe)

    loaded = spacy.load(out)
    assert loaded.pipe_names == [src.pipe]
    assert getattr(src.component(loaded).backend, setting) == value
    for doc, ref in zip(loaded.pipe(TEXTS), expected):
        assert_same_ctx(doc, ref, atol=src.rerun_tol)
        if ref.has_vector:
            assert doc[0].similarity(doc[-1]) == pytest.approx(ref[0].similarity(ref[-1]), abs=1e-5)
    # initialize() (e.g. before further training) must not reload the gone files.
    loaded.initialize()
    for doc, ref in zip(loaded.pipe(TEXTS), expected):
        assert_same_ctx(doc, ref, atol=src.rerun_tol)
    doc = loaded(BANK_TEXT)
    assert doc._.ctx.layer_names == src.layer_names
    assert doc._.ctx.vector_mode == src.vector_mode


def test_to_disk_with_sentencizer_and_store_last(family: Family, tmp_path: Path) -> None:
    nlp = family.make_nlp(sentencizer=True, store="last")
    expected = outputs(nlp)
    nlp.to_disk(tmp_path / "pipeline")
    loaded = spacy.load(tmp_path / "pipeline")
    assert loaded.pipe_names == ["sentencizer", family.pipe]
    for a, b in zip(expected, outputs(loaded)):
        assert a.shape[0] == 1
        assert_same_layers(b, a, atol=family.rerun_tol)


def test_load_never_reads_the_original_checkpoint(
    src: Family, tmp_path: Path, ref_docs: List[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "pipeline"
    src.make_nlp().to_disk(out)
    src.delete_source()
    calls = src.forbid_loading(monkeypatch)
    loaded = spacy.load(out)
    assert src.component(loaded).is_loaded  # from the pipeline folder, not from src
    assert_same_vectors(src, loaded, ref_docs)
    loaded.initialize()  # already loaded: a no-op, which must not reload from src
    assert_same_vectors(src, loaded, ref_docs)
    loaded.to_disk(tmp_path / "again")
    nlp2 = src.make_nlp()
    nlp2.from_bytes(loaded.to_bytes())
    assert_same_vectors(src, nlp2, ref_docs)
    assert calls == []


def test_saving_over_the_loaded_folder_and_moving_it(
    src: Family, tmp_path: Path, ref_docs: List[Doc]
) -> None:
    out = tmp_path / "pipeline"
    src.make_nlp().to_disk(out)
    src.delete_source()
    loaded = spacy.load(out)
    loaded.to_disk(out)  # overwrite the folder the weights were read from
    moved = Path(shutil.move(str(out), str(tmp_path / "moved")))
    assert_same_vectors(src, spacy.load(moved), ref_docs)


def test_load_with_overridden_settings(src: Family, tmp_path: Path, ref_docs: List[Doc]) -> None:
    out = tmp_path / "pipeline"
    src.make_nlp().to_disk(out)
    src.delete_source()
    loaded = spacy.load(out, config={"components": {src.pipe: {"store": "last"}}})
    for doc, ref in zip(loaded.pipe(TEXTS), ref_docs):
        assert doc._.ctx.layer_names == ref._.ctx.layer_names[-1:]
        assert_same_layers(doc._.ctx.layers[0], ref._.ctx.layers[-1], atol=src.rerun_tol)


def test_to_bytes_from_bytes_without_source_files(src: Family, tmp_path: Path) -> None:
    setting, value = src.chunk_setting
    nlp = src.make_nlp(model={setting: value})
    data = nlp.to_bytes()  # before first use: serializing loads what is needed
    expected = list(nlp.pipe(TEXTS))
    assert_same_vectors(src, src.make_nlp(model={setting: value}), expected)
    src.delete_source()
    # Same config, naming the deleted files (and the default setting): the bytes carry both.
    nlp2 = src.make_nlp()
    assert not src.component(nlp2).is_loaded
    nlp2.from_bytes(data)
    assert src.component(nlp2).is_loaded
    assert getattr(src.component(nlp2).backend, setting) == value
    assert_same_vectors(src, nlp2, expected)
    # Same pipes, but configured with other weights: the bytes must carry the model.
    other = src.write_other(tmp_path / "other", seed=7)
    fresh = other.make_nlp()
    assert not other.component(fresh).is_loaded
    fresh.from_bytes(data)
    assert other.component(fresh).is_loaded
    assert_same_vectors(src, fresh, expected)


def test_model_to_bytes_from_bytes(src: Family, ref_docs: List[Doc]) -> None:
    """The Thinc model (used by copies and listener replacement) carries the weights."""
    nlp = src.make_nlp()
    unloaded = src.component(nlp).model.to_bytes()  # lazy: nothing to carry yet
    nlp.initialize()
    data = src.component(nlp).model.to_bytes()
    src.delete_source()
    nlp2 = src.make_nlp()
    src.component(nlp2).model.from_bytes(data)
    assert src.component(nlp2).is_loaded
    assert_same_vectors(src, nlp2, ref_docs)
    nlp3 = src.make_nlp()
    src.component(nlp3).model.from_bytes(unloaded)
    assert not src.component(nlp3).is_loaded


# --------------------------------------------------------------------------
# doc._.ctx through doc.to_bytes and DocBin, vector hooks
# --------------------------------------------------------------------------


@pytest.mark.parametrize("store_dtype", ["float32", "float16"])
def test_docbin_round_trip(family: Family, store_dtype: str) -> None:
    nlp = family.make_nlp(store_dtype=store_dtype)
    docs = list(nlp.pipe(TEXTS))
    data = DocBin(store_user_data=True, docs=docs).to_bytes()
    loaded = list(DocBin().from_bytes(data).get_docs(spacy.blank("en").vocab))
    assert len(loaded) == len(docs)
    for doc, ref in zip(loaded, docs):
        assert doc.text == ref.text
        assert_same_ctx(doc, ref)
        assert doc._.ctx.layers.dtype == np.dtype(store_dtype)
        assert doc._.ctx.layer_names == family.layer_names
        assert doc._.ctx.model_name == family.model_name
        assert doc._.ctx.vector_mode == family.vector_mode
        install_vector_hooks(doc)
        for token, ref_token in zip(doc, ref):
            np.testing.assert_array_equal(token.vector, ref_token.vector)


def test_docbin_without_user_data_drops_ctx(ref_docs: List[Doc]) -> None:
    data = DocBin(store_user_data=False, docs=ref_docs).to_bytes()
    for doc in DocBin().from_bytes(data).get_docs(spacy.blank("en").vocab):
        assert doc._.ctx is None


def test_doc_to_bytes_round_trip(nlp: Language, ref_docs: List[Doc]) -> None:
    for vocab in (spacy.blank("en").vocab, nlp.vocab):
        for ref in ref_docs:
            doc = Doc(vocab).from_bytes(ref.to_bytes())
            assert_same_ctx(doc, ref)


def test_install_vector_hooks_after_docbin_restores_similarity(
    family: Family, ref_docs: List[Doc]
) -> None:
    ref = ref_docs[1]  # "The bank raised rates. We sat on the river bank."
    data = DocBin(store_user_data=True, docs=[ref]).to_bytes()
    (doc,) = DocBin().from_bytes(data).get_docs(spacy.blank("en").vocab)
    assert "similarity" not in doc.user_token_hooks  # hooks do not travel
    assert doc[1].vector.shape != (family.width,)  # the (empty) static vectors
    install_vector_hooks(doc)
    bank, river_bank = 1, len(doc) - 2
    assert doc[bank].text == doc[river_bank].text == "bank"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "empty vectors" warnings any more
        assert doc[bank].has_vector and doc.has_vector
        np.testing.assert_array_equal(doc[bank].vector, ref[bank].vector)
        similarity = doc[bank].similarity(doc[river_bank])
        assert similarity == pytest.approx(ref[bank].similarity(ref[river_bank]), abs=1e-6)
        assert 0.0 < abs(similarity) <= 1.0 + 1e-6
        assert doc.similarity(ref) == pytest.approx(1.0, abs=1e-5)
        assert doc[0:4].similarity(doc[5:]) == pytest.approx(ref[0:4].similarity(ref[5:]), abs=1e-6)
        np.testing.assert_allclose(doc.vector, ref.vector, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------
# initialize, multiprocessing
# --------------------------------------------------------------------------


def test_works_without_and_after_initialize(family: Family, ref_docs: List[Doc]) -> None:
    lazy = family.make_nlp()
    assert not family.component(lazy).is_loaded
    assert_same_vectors(family, lazy, ref_docs)  # loads on first use
    assert family.component(lazy).is_loaded

    initialized = family.make_nlp()
    initialized.initialize()
    assert family.component(initialized).is_loaded
    assert_same_vectors(family, initialized, ref_docs)
    initialized.initialize()  # again: keeps the pretrained weights, no re-initialization
    assert_same_vectors(family, initialized, ref_docs)
    lazy.initialize()  # initialize after use
    assert_same_vectors(family, lazy, ref_docs)


# Runs in a fresh interpreter: spaCy's n_process forks the current process, and a
# hung worker must fail this test, not hang pytest. One interpreter serves both
# families (starting one costs more than the work).
_PIPE_SCRIPT = r"""
import json, sys
import numpy as np, spacy, torch
pipelines, out, texts = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
for family, (sentencizer, pipe, config) in pipelines.items():
    nlp = spacy.blank("en")
    if sentencizer:
        nlp.add_pipe("sentencizer")
    nlp.add_pipe(pipe, config=config)
    # ELMo's LSTM pays a thread sync per time step: its own run takes one thread.
    torch.set_num_threads(1 if family == "elmo" else 2)
    one = list(nlp.pipe(texts, n_process=1))
    # As on any multi-core machine: the parent has run torch with a thread pool
    # (BERT's run above) and forks with it.
    torch.set_num_threads(2)
    two = list(nlp.pipe(texts, n_process=2, batch_size=2))
    arrays, meta = {}, []
    for i, (a, b) in enumerate(zip(one, two)):
        for tag, doc in (("one", a), ("two", b)):
            arrays[f"{tag}_layers_{i}"] = doc._.ctx.layers
            arrays[f"{tag}_counts_{i}"] = doc._.ctx.piece_counts
        meta.append({
            "texts": [a.text, b.text],
            "names": [a._.ctx.layer_names, b._.ctx.layer_names],
            "models": [a._.ctx.model_name, b._.ctx.model_name],
            "hooks": [sorted(a.user_token_hooks), sorted(b.user_token_hooks)],
        })
    np.savez(f"{out}_{family}.npz", **arrays)
    with open(f"{out}_{family}.json", "w") as f:
        json.dump(meta, f)
"""
PIPE_TIMEOUT_S = 45
PIPE_TEXTS = TEXTS


@pytest.fixture(scope="module")
def two_process_runs(tiny_bert_dir: Path, tiny_elmo_files, tmp_path_factory) -> Path:
    """Run ``nlp.pipe`` with n_process=1 and 2 for both families in one fresh interpreter."""
    families = [Family("bert", (tiny_bert_dir,)), Family("elmo", tuple(tiny_elmo_files))]  # BERT first
    pipelines = {
        f.name: [f.name == "elmo", f.pipe, {"model": f.model_config(), "store": "all"}]
        for f in families
    }
    out = str(tmp_path_factory.mktemp("pipe") / "pipe")
    proc = subprocess.Popen(
        [sys.executable, "-c", _PIPE_SCRIPT, json.dumps(pipelines), out, json.dumps(PIPE_TEXTS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers share the process group: one kill ends all
    )
    try:
        output, _ = proc.communicate(timeout=PIPE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(
            f"nlp.pipe(n_process=2) did not finish in {PIPE_TIMEOUT_S} s: the forked workers "
            "hang in torch (an OpenMP thread pool inherited across fork).\n"
            + output.decode(errors="replace")[-3000:]
        )
    assert proc.returncode == 0, output.decode(errors="replace")[-3000:]
    return Path(out)


def test_pipe_with_two_processes_matches_one(family: Family, two_process_runs: Path) -> None:
    out = f"{two_process_runs}_{family.name}"
    arrays = np.load(out + ".npz")
    meta = json.loads(Path(out + ".json").read_text())
    assert len(meta) == len(PIPE_TEXTS)
    make_doc = spacy.blank("en").make_doc
    for i, (text, info) in enumerate(zip(PIPE_TEXTS, meta)):
        assert info["texts"] == [text, text]
        assert info["names"][0] == info["names"][1] == family.layer_names
        assert info["models"][0] == info["models"][1] == family.model_name
        assert "similarity" in info["hooks"][0]  # hooks exist in-process ...
        assert info["hooks"][1] == []  # ... and are lost when Docs come back from workers
        np.testing.assert_array_equal(arrays[f"two_counts_{i}"], arrays[f"one_counts_{i}"])
        one, two = arrays[f"one_layers_{i}"], arrays[f"two_layers_{i}"]
        assert one.shape == two.shape
        assert one.shape == (len(family.layer_names), len(make_doc(text)), family.width)
        # Workers may use another thread count than the parent: float32 rounding only.
        np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# broken weights, invalid settings
# --------------------------------------------------------------------------


def test_missing_weights_file(src: Family) -> None:
    weights = src.weights_file
    saved = weights.read_bytes()
    weights.unlink()
    nlp = src.make_nlp()  # building the pipeline does no I/O
    needles = per_family(
        src,
        bert=[str(src.source[0]), "model.safetensors", "pytorch_model.bin"],
        elmo=[str(weights)],
    )
    first_use_raises(nlp, CheckpointError, *needles)
    # Nothing half-loaded is kept: once the file is back, the same pipeline works.
    weights.write_bytes(saved)
    check_doc(src, nlp("Some text ."))


@pytest.mark.parametrize(
    "damage", ["random_bytes", "garbage_text", "truncated", "header_only", "empty"]
)
def test_corrupt_weights_file(src: Family, damage: str) -> None:
    weights = src.weights_file
    data = weights.read_bytes()
    if damage == "random_bytes":
        weights.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "garbage_text":
        weights.write_bytes(b"this is not a weights file\n" * 100)
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "header_only":
        weights.write_bytes(data[:8])
    else:
        weights.write_bytes(b"")
    first_use_raises(src.make_nlp(), CheckpointError, str(weights))


@pytest.mark.parametrize(
    "component,needles",
    [
        ({"store": "bogus"}, ["store", "bogus"]),
        ({"store_dtype": "int4"}, ["store_dtype", "int4"]),
        ({"max_batch_tokens": 0}, ["max_batch_tokens"]),
        ({"store": "none", "vector_hooks": True}, ["vector_hooks", "store"]),
        ({"model": {"device": "not-a-device"}}, ["not-a-device"]),
    ],
)
def test_invalid_component_settings_fail_at_add_pipe(
    family: Family, component: Dict, needles: List[str]
) -> None:
    component = dict(component)
    model = component.pop("model", None)
    with pytest.raises(ConfigError) as info:
        family.make_nlp(model=model, **component)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_invalid_mixed_precision_fails_at_first_use(family: Family) -> None:
    nlp = family.make_nlp(model={"mixed_precision": "fp8"})
    first_use_raises(nlp, ConfigError, "mixed_precision", "fp8")
