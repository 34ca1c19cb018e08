"""Tests of the ``ctx_elmo`` spaCy component (``spacy_ctx.ElmoEncoder.v1``).

Parity tests use AllenNLP's ELMo fixture (see its README.md) and skip when it is
absent; everything else runs on tiny random checkpoints from ``write_random_elmo``.
Everything is offline and on CPU.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import pytest
import spacy
import torch
from spacy.tokens import Doc, DocBin

from spacy_ctx.ctx_data import CtxData
from spacy_ctx.doc_data import install_vector_hooks
from spacy_ctx.errors import CheckpointError
from spacy_ctx.thinc_layers.backend_layer import ensure_backend
from spacy_ctx.loaders import ELMO_MODELS

from .elmo_utils import write_random_elmo

Files = Tuple[Path, Path]

#: Width of every layer of the tiny random model (2 * projection_dim).
TINY_WIDTH = 16
LAYER_NAMES = ["token", "lstm_1", "lstm_2"]
BANK_TEXT = "The bank raised rates. We sat on the river bank."
TEXTS = [
    BANK_TEXT,
    "Hello world!",
    "A much longer document. It has several sentences, some of them longer than others. "
    "Short one. And then a final sentence with quite a few more words in it than the rest.",
    "Crème brûlée über 東京 🙂 naïve.",
    "x",
]


# --------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------


def make_nlp(
    files: Optional[Files] = None,
    *,
    sentencizer: bool = False,
    model: Optional[Dict] = None,
    **component: object,
) -> spacy.language.Language:
    """A blank English pipeline with (optionally) a sentencizer and ``ctx_elmo``."""
    nlp = spacy.blank("en")
    if sentencizer:
        nlp.add_pipe("sentencizer")
    model_cfg: Dict = {}
    if files is not None:
        model_cfg.update({"options": str(files[0]), "weights": str(files[1])})
    model_cfg.update(model or {})
    nlp.add_pipe("ctx_elmo", config={"model": model_cfg, **component})
    return nlp


def layers_of(doc: Doc) -> np.ndarray:
    ctx = doc._.ctx
    assert ctx is not None, "ctx_elmo left no doc._.ctx"
    return ctx.layers


def check_rows(doc: Doc, n_layers: int = 3, width: int = TINY_WIDTH) -> np.ndarray:
    """One finite row per spaCy token, zero rows (and 0 pieces) for whitespace tokens."""
    layers = layers_of(doc)
    assert layers.shape == (n_layers, len(doc), width)
    assert np.all(np.isfinite(layers))
    expected_counts = [0 if token.is_space else 1 for token in doc]
    assert doc._.ctx.piece_counts.tolist() == expected_counts
    for token in doc:
        if token.is_space:
            assert not layers[:, token.i].any(), f"whitespace token {token.i} has a non-zero row"
    return layers


def sentence_doc(nlp, sentences: Sequence[Sequence[str]]) -> Doc:
    """One Doc made of pre-split sentences, with explicit sentence starts."""
    words = [w for s in sentences for w in s]
    starts = [k == 0 for s in sentences for k in range(len(s))]
    return Doc(nlp.vocab, words=words, sent_starts=starts)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run these tiny models on one thread.

    The LSTM does a few tiny matmuls per time step; with several OpenMP threads
    every one of them pays a thread sync, and on a busy 2-core machine the file
    then takes minutes instead of seconds. Results are the same either way (the
    encoder is bitwise independent of the thread count on CPU).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return write_random_elmo(tmp_path_factory.mktemp("tiny_elmo"), seed=0)


@pytest.fixture(scope="module")
def tiny_nlp(tiny_files: Files):
    """Tiny model, sentencizer, default settings (store all, float32, mean vectors)."""
    return make_nlp(tiny_files, sentencizer=True)


def fixture_batches(fixture_dir: Path) -> List[List[List[str]]]:
    groups = json.loads((fixture_dir / "sentences.json").read_text(encoding="utf-8"))
    return [[groups[k][i].split() for k in range(3)] for i in range(10)]


# --------------------------------------------------------------------------
# parity with AllenNLP / bilm-tf through the component
# --------------------------------------------------------------------------


@pytest.mark.parametrize("boundaries", ["none", "sent_starts", "sentencizer"])
def test_fixture_parity_all_layers(fixture_dir: Path, boundaries: str) -> None:
    """doc._.ctx.layers equals AllenNLP's fresh-state activations (boundaries removed).

    ``none``: no sentence boundaries, so each Doc is one chunk (chunk_size > the
    longest sentence). ``sent_starts``: each Doc is explicitly one sentence.
    ``sentencizer``: spaCy's sentencizer; it splits one fixture "sentence" (group
    1, index 8, which contains '. •') in two, so that Doc is not comparable with
    AllenNLP's single-sentence run and is checked by the sentence tests instead.
    """
    files = (fixture_dir / "options.json", fixture_dir / "lm_weights.hdf5")
    nlp = make_nlp(files, sentencizer=boundaries == "sentencizer")
    backend = ensure_backend(nlp.get_pipe("ctx_elmo").model)
    reference = np.load(fixture_dir / "allennlp_outputs.npz")
    batches = fixture_batches(fixture_dir)
    assert backend.chunk_size > max(len(s) for batch in batches for s in batch)
    worst = np.zeros(3)
    compared = 0
    for i, batch in enumerate(batches):
        if boundaries == "sent_starts":
            docs = [sentence_doc(nlp, [words]) for words in batch]
        else:
            docs = [Doc(nlp.vocab, words=words) for words in batch]
        docs = list(nlp.pipe(docs))
        expected = reference[f"batch{i}_activations_fresh"]
        for row, (doc, words) in enumerate(zip(docs, batch)):
            assert [t.text for t in doc] == words
            layers = check_rows(doc, width=32)
            assert doc._.ctx.layer_names == LAYER_NAMES
            if boundaries == "none":
                assert not doc.has_annotation("SENT_START")
            if boundaries != "none" and len(list(doc.sents)) != 1:
                assert (boundaries, i, row) == ("sentencizer", 8, 1)
                continue
            n = len(words)
            diff = np.abs(layers - expected[:, row, 1 : n + 1]).max(axis=(1, 2))
            worst = np.maximum(worst, diff)
            compared += 1
    assert compared >= (29 if boundaries == "sentencizer" else 30)
    assert worst.max() < 1e-5, f"max abs difference per layer: {worst}"


def test_fixture_top_layer_matches_tensorflow(fixture_dir: Path) -> None:
    files = (fixture_dir / "options.json", fixture_dir / "lm_weights.hdf5")
    nlp = make_nlp(files, sentencizer=True)
    groups = json.loads((fixture_dir / "sentences.json").read_text(encoding="utf-8"))
    # Only sentence 0 of each file: TF carried the LSTM state across the later ones.
    docs = list(nlp.pipe([Doc(nlp.vocab, words=groups[k][0].split()) for k in range(3)]))
    for k, doc in enumerate(docs):
        with h5py.File(fixture_dir / f"lm_embeddings_{k}.hdf5", "r") as handle:
            tf_output = handle["0"][...]
        expected = np.concatenate([tf_output[0], tf_output[1]], axis=-1)
        assert len(list(doc.sents)) == 1
        np.testing.assert_allclose(layers_of(doc)[2], expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------
# sentences and chunks
# --------------------------------------------------------------------------


def test_sentences_equal_separate_docs(tiny_nlp, tiny_files: Files) -> None:
    sentences = [
        "The bank raised rates .".split(),
        ["Hi"],
        "We sat on the river bank and watched the boats go by .".split(),
        "Then we left .".split(),
    ]
    doc = tiny_nlp(sentence_doc(tiny_nlp, sentences))
    assert [len(s) for s in doc.sents] == [len(s) for s in sentences]
    layers = check_rows(doc)
    start = 0
    for words in sentences:
        alone = tiny_nlp(Doc(tiny_nlp.vocab, words=words))
        np.testing.assert_array_equal(layers[:, start : start + len(words)], layers_of(alone))
        start += len(words)
    # The sentences really are encoded separately: the whole text as one chunk differs.
    plain = make_nlp(tiny_files)
    joined = plain(Doc(plain.vocab, words=[w for s in sentences for w in s]))
    assert not np.allclose(layers_of(joined)[1:], layers[1:])
    np.testing.assert_array_equal(layers_of(joined)[0], layers[0])  # context-free layer


def test_sentencizer_sentences_equal_separate_docs(tiny_nlp) -> None:
    doc = tiny_nlp(BANK_TEXT)
    sents = list(doc.sents)
    assert len(sents) == 2
    layers = check_rows(doc)
    for sent in sents:
        alone = tiny_nlp(Doc(tiny_nlp.vocab, words=[t.text for t in sent]))
        np.testing.assert_array_equal(layers[:, sent.start : sent.end], layers_of(alone))


@pytest.mark.parametrize("chunk_size", [1, 4, 7])
def test_chunks_without_boundaries(tiny_files: Files, chunk_size: int) -> None:
    nlp = make_nlp(tiny_files, model={"chunk_size": chunk_size})
    n = int(2.5 * chunk_size) if chunk_size > 1 else 3
    words = [f"w{k % 5}" if k % 3 else "the" for k in range(n)]
    doc = nlp(Doc(nlp.vocab, words=words))
    assert not doc.has_annotation("SENT_START")
    layers = check_rows(doc)
    pieces = 0
    for start in range(0, n, chunk_size):
        chunk = words[start : start + chunk_size]
        alone = nlp(Doc(nlp.vocab, words=chunk))
        np.testing.assert_array_equal(layers[:, start : start + len(chunk)], layers_of(alone))
        pieces += 1
    assert pieces == -(-n // chunk_size) >= 3


def test_long_sentence_is_chunked_too(tiny_files: Files) -> None:
    """A sentence longer than chunk_size is cut the same way; other sentences are not."""
    nlp = make_nlp(tiny_files, model={"chunk_size": 4})
    first = "one two three four five six seven eight nine ten".split()
    second = "short one .".split()
    doc = nlp(sentence_doc(nlp, [first, second]))
    layers = check_rows(doc)
    cuts = [first[0:4], first[4:8], first[8:10], second]
    start = 0
    for chunk in cuts:
        alone = nlp(Doc(nlp.vocab, words=chunk))
        np.testing.assert_array_equal(layers[:, start : start + len(chunk)], layers_of(alone))
        start += len(chunk)
    assert start == len(doc)


def test_whitespace_and_boundaries_and_chunks_keep_one_row_per_token(tiny_files: Files) -> None:
    nlp = make_nlp(tiny_files, sentencizer=True, model={"chunk_size": 3})
    text = "  Leading space.\n\nA  b   c d e f g.\t\tEnd \n"
    doc = nlp(text)
    assert any(t.is_space for t in doc)
    check_rows(doc)


# --------------------------------------------------------------------------
# determinism and batching
# --------------------------------------------------------------------------


def test_same_doc_alone_and_in_batches_is_identical(tiny_nlp) -> None:
    target = "We sat on the river bank. It was cold."
    alone = layers_of(tiny_nlp(target))
    others = [
        "Hi.",
        "A rather longer sentence about something else entirely, with commas, and more words.",
        "x " * 40,
        "Two sentences here. Yes.",
    ] + [f"Filler doc number {k} with {'word ' * k}." for k in range(20)]
    batches = [
        [target] + others[:2],
        others[:3] + [target],
        others + [target] + others,  # > 16 sentences: more than one padded block
    ]
    for texts in batches:
        docs = list(tiny_nlp.pipe(texts, batch_size=len(texts)))
        for doc, text in zip(docs, texts):
            check_rows(doc)
            if text == target:
                np.testing.assert_array_equal(layers_of(doc), alone)


def test_small_max_batch_tokens_equals_one_by_one(
    tiny_files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = make_nlp(tiny_files, sentencizer=True, max_batch_tokens=16)
    default = make_nlp(tiny_files, sentencizer=True)
    assert small.get_pipe("ctx_elmo").cfg["max_batch_tokens"] == 16
    texts = TEXTS + ["", "   ", "One more. And another one here, longer than sixteen tokens in total."]
    one_by_one = [layers_of(default(text)) for text in texts]

    # Record the encoder batches: padded size (rows * (longest + <S>/</S>)) within
    # the budget unless a single sentence is longer than the budget on its own.
    bilm = ensure_backend(small.get_pipe("ctx_elmo").model).bilm
    forward_from_embeddings = bilm.forward_from_embeddings
    batches: List[List[int]] = []

    def spy(embeddings, lengths):
        # The backend frames every sentence with <S> ... </S>: 2 more than its tokens.
        batches.append([int(n) - 2 for n in lengths])
        return forward_from_embeddings(embeddings, lengths)

    monkeypatch.setattr(bilm, "forward_from_embeddings", spy)
    for batch_size in (1, 3, len(texts)):
        batches.clear()
        docs = list(small.pipe(texts, batch_size=batch_size))
        assert len(docs) == len(texts)
        for doc, expected in zip(docs, one_by_one):
            check_rows(doc)
            np.testing.assert_array_equal(layers_of(doc), expected)
        assert batches, "the encoder never ran"
        for lengths in batches:
            assert len(lengths) == 1 or len(lengths) * (max(lengths) + 2) <= 16, batches
        # One encoder row per sentence with a non-space token (chunk_size is 100).
        n_sentences = sum(
            1 for doc in docs if len(doc) for sent in doc.sents if not all(t.is_space for t in sent)
        )
        assert sum(len(b) for b in batches) == n_sentences
    assert any(len(b) > 1 for b in batches), "short sentences should share a batch"


def test_thread_count_does_not_change_results(tiny_nlp) -> None:
    """The encoder claims bitwise independence of the CPU thread count."""
    texts = [BANK_TEXT, "Short. A slightly longer second sentence, for padding."]
    single = [layers_of(doc) for doc in tiny_nlp.pipe(texts)]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        double = [layers_of(doc) for doc in tiny_nlp.pipe(texts)]
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(single, double):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# whitespace tokens
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sentencizer", [False, True])
def test_whitespace_tokens_get_zero_rows(tiny_files: Files, sentencizer: bool) -> None:
    nlp = make_nlp(tiny_files, sentencizer=sentencizer)
    spaced = nlp("Hello  world \n\n !  The\t\tbank  .")
    plain = nlp("Hello world ! The bank .")
    space_tokens = [t.i for t in spaced if t.is_space]
    assert len(space_tokens) >= 3
    layers = check_rows(spaced)
    assert spaced._.ctx.piece_counts[space_tokens].tolist() == [0] * len(space_tokens)
    kept = [t.i for t in spaced if not t.is_space]
    assert [spaced[i].text for i in kept] == [t.text for t in plain]
    if sentencizer:
        assert [len([t for t in s if not t.is_space]) for s in spaced.sents] == [
            len(s) for s in plain.sents
        ]
    np.testing.assert_array_equal(layers[:, kept], layers_of(plain))
    for i in space_tokens:
        assert not spaced[i].has_vector
        assert not spaced[i].vector.any()
        assert spaced[i].similarity(spaced[0]) == 0.0
    # Doc/span vectors average the non-space tokens only.
    np.testing.assert_allclose(spaced.vector, plain.vector, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# vectors, store modes and dtypes
# --------------------------------------------------------------------------


def test_token_vector_is_mean_of_layers_and_bank_similarity(tiny_nlp) -> None:
    doc = tiny_nlp(BANK_TEXT)
    layers = check_rows(doc)
    assert doc._.ctx.layer_names == LAYER_NAMES
    assert doc._.ctx.vector_mode == "mean"
    assert doc._.ctx.model_name == "weights.hdf5"
    mean = layers.astype(np.float32).mean(axis=0)
    for token in doc:
        assert token.vector.shape == (TINY_WIDTH,)
        np.testing.assert_allclose(token.vector, mean[token.i], rtol=1e-6, atol=1e-7)
        assert token.has_vector
    banks = [t.i for t in doc if t.text == "bank"]
    assert banks[0] == 1 and len(banks) == 2
    k = banks[1]
    # Same word, same context-free token layer, different contextual layers.
    np.testing.assert_array_equal(layers[0, 1], layers[0, k])
    assert not np.allclose(layers[1:, 1], layers[1:, k])
    similarity = doc[1].similarity(doc[k])
    assert np.isfinite(similarity)
    assert abs(similarity - 1.0) > 1e-4
    assert doc[1].similarity(doc[1]) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(doc.vector, mean.mean(axis=0), rtol=1e-5, atol=1e-6)
    span = doc[5:9]
    np.testing.assert_allclose(span.vector, mean[5:9].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_store_last_keeps_one_layer(tiny_files: Files) -> None:
    full = make_nlp(tiny_files, sentencizer=True)(BANK_TEXT)
    nlp = make_nlp(tiny_files, sentencizer=True, store="last")
    doc = nlp(BANK_TEXT)
    layers = check_rows(doc, n_layers=1)
    assert doc._.ctx.layer_names == ["lstm_2"]
    np.testing.assert_array_equal(layers[0], layers_of(full)[2])
    np.testing.assert_array_equal(doc[3].vector, layers_of(full)[2, 3])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_is_close_and_stored_as_float32(tiny_files: Files, precision: str) -> None:
    full = [layers_of(doc) for doc in make_nlp(tiny_files, sentencizer=True).pipe(TEXTS)]
    nlp = make_nlp(tiny_files, sentencizer=True, model={"mixed_precision": precision})
    for _ in range(2):  # the second run reads the (low-precision) word cache
        for doc, expected in zip(nlp.pipe(TEXTS), full):
            layers = check_rows(doc)
            assert layers.dtype == np.float32
            np.testing.assert_allclose(layers, expected, rtol=0, atol=0.1)


def test_store_none_leaves_no_ctx(tiny_files: Files) -> None:
    nlp = make_nlp(tiny_files, store="none", vector_hooks=False)
    doc = nlp(BANK_TEXT)
    assert doc._.ctx is None


def test_store_dtype_float16(tiny_files: Files) -> None:
    full = make_nlp(tiny_files, sentencizer=True)(BANK_TEXT)
    nlp = make_nlp(tiny_files, sentencizer=True, store_dtype="float16")
    doc = nlp(BANK_TEXT)
    layers = check_rows(doc)
    assert layers.dtype == np.float16
    np.testing.assert_allclose(layers.astype(np.float32), layers_of(full), rtol=2e-3, atol=2e-3)
    assert doc[1].vector.dtype == np.float32
    np.testing.assert_allclose(doc[1].vector, full[1].vector, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------
# unusual input
# --------------------------------------------------------------------------

BAD_TEXTS = {
    "empty": "",
    "whitespace_only": "   \n\t  \n",
    "control": "a\x01b \x02\x03 \x7f\x1b[0m ok \x07",
    "nul": "nul\x00byte \x00 end",
    "long_token": "x" * 5000,
    "long_multibyte_token": "before " + "é東" * 2500 + " after",
    "rtl": "שלום עולם. مرحبا بالعالم!",
    "mixed_scripts": "Hello мир 世界 नमस्ते Γειά 안녕 ok.",
    "emoji": "🙂👍🏽 👨‍👩‍👧 family 🚀🚀 !",
    "zero_width": "zero\u200bwidth soft\u00adhyphen \ufeffbom",
}


@pytest.mark.parametrize("kind", sorted(BAD_TEXTS))
def test_unusual_text(tiny_nlp, kind: str) -> None:
    doc = tiny_nlp(BAD_TEXTS[kind])
    layers = check_rows(doc)
    assert doc._.ctx.piece_counts.shape == (len(doc),)
    if kind == "empty":
        assert len(doc) == 0
    if kind == "whitespace_only":
        assert len(doc) > 0 and all(t.is_space for t in doc)
        assert not layers.any()
        assert not doc.has_vector
    assert np.all(np.isfinite(doc.vector))
    for token in doc:
        assert np.all(np.isfinite(token.vector))


def test_unusual_docs_in_one_batch(tiny_nlp) -> None:
    texts = list(BAD_TEXTS.values())
    docs = list(tiny_nlp.pipe(texts, batch_size=len(texts)))
    for doc, text in zip(docs, texts):
        check_rows(doc)
        np.testing.assert_array_equal(layers_of(doc), layers_of(tiny_nlp(text)))


def test_unusual_words_as_doc_tokens(tiny_files: Files) -> None:
    nlp = make_nlp(tiny_files)
    words = ["\x00", "\x01\x02", "y" * 5000, "مرحبا", "👨‍👩‍👧", "\u200b", "a"]
    doc = nlp(Doc(nlp.vocab, words=words))
    layers = check_rows(doc)
    assert layers[:, -1].any() and layers[:, 3].any()


# --------------------------------------------------------------------------
# bad files and names
# --------------------------------------------------------------------------


def _assert_raises_at_first_use(nlp, *needles: str) -> None:
    for action in (nlp.initialize, lambda: nlp("Some text .")):
        with pytest.raises(CheckpointError) as info:
            action()
        message = str(info.value)
        for needle in needles:
            assert needle in message, f"{needle!r} not in {message!r}"


def test_missing_weights_file(tmp_path: Path) -> None:
    options, weights = write_random_elmo(tmp_path / "m")
    weights.unlink()
    nlp = make_nlp((options, weights))  # building the pipeline does no I/O
    assert not nlp.get_pipe("ctx_elmo").is_loaded
    _assert_raises_at_first_use(nlp, str(weights))
    # Nothing broken is kept: once the file is there, the same pipeline works.
    write_random_elmo(tmp_path / "m")
    check_rows(nlp("Some text ."))


def test_missing_options_file(tmp_path: Path) -> None:
    options, weights = write_random_elmo(tmp_path / "m")
    options.unlink()
    _assert_raises_at_first_use(make_nlp((options, weights)), str(options))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_weights_file(tmp_path: Path, damage: str) -> None:
    options, weights = write_random_elmo(tmp_path / "m")
    data = weights.read_bytes()
    if damage == "garbage":
        weights.write_bytes(b"this is not an hdf5 file\n" * 100)
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(b"")
    _assert_raises_at_first_use(make_nlp((options, weights)), str(weights))


def test_weights_of_another_model(tmp_path: Path) -> None:
    options, _ = write_random_elmo(tmp_path / "a", proj=8)
    _, other_weights = write_random_elmo(tmp_path / "b", proj=6)
    _assert_raises_at_first_use(make_nlp((options, other_weights)), str(other_weights))


def test_options_without_weights(tmp_path: Path) -> None:
    options, _ = write_random_elmo(tmp_path / "m")
    nlp = make_nlp(model={"options": str(options)})
    _assert_raises_at_first_use(nlp, "model.weights", "weights.hdf5")


def test_unknown_model_name() -> None:
    nlp = make_nlp(model={"name": "elmo-nonexistent"})
    with pytest.raises(CheckpointError) as info:
        nlp.initialize()
    message = str(info.value)
    assert "elmo-nonexistent" in message
    for known in ELMO_MODELS:
        assert known in message


@pytest.mark.parametrize("name", ["elmo-small", None])
def test_published_name_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                name: Optional[str]) -> None:
    """A published name (None = the default, elmo-original) with no network."""
    urls: List[str] = []

    def no_network(url, *args, **kwargs):
        urls.append(url if isinstance(url, str) else url.full_url)
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("SPACY_CTX_CACHE", str(tmp_path / "cache"))
    nlp = make_nlp(model={} if name is None else {"name": name})
    with pytest.raises(CheckpointError) as info:
        nlp("Some text .")
    message = str(info.value)
    assert "offline" in message.lower()
    assert "network unreachable" in message
    assert "model.options" in message and "model.weights" in message
    assert len(urls) == 1 and urls[0].startswith("https://")
    assert ELMO_MODELS[name or "elmo-original"] in urls[0]
    # Nothing half-written is left in the cache to be mistaken for a model later.
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []


# --------------------------------------------------------------------------
# word cache
# --------------------------------------------------------------------------


def test_word_cache_hits_and_identical_outputs(tiny_files: Files) -> None:
    nlp = make_nlp(tiny_files, sentencizer=True)
    backend = ensure_backend(nlp.get_pipe("ctx_elmo").model)
    cache = backend.word_cache
    assert cache.hits == 0 and cache.misses == 0
    first = [layers_of(doc) for doc in nlp.pipe(TEXTS)]
    hits, misses, size = cache.hits, cache.misses, len(cache)
    assert misses > 0 and size > 0
    second = [layers_of(doc) for doc in nlp.pipe(TEXTS)]
    assert cache.hits > hits
    assert cache.misses == misses, "every word was cached after the first run"
    assert len(cache) == size
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)

    uncached = make_nlp(tiny_files, sentencizer=True, model={"cache_size": 0})
    uncached_backend = ensure_backend(uncached.get_pipe("ctx_elmo").model)
    for _ in range(2):
        third = [layers_of(doc) for doc in uncached.pipe(TEXTS)]
        for a, b in zip(first, third):
            np.testing.assert_array_equal(a, b)
    assert len(uncached_backend.word_cache) == 0
    assert uncached_backend.word_cache.hits == 0


def test_small_word_cache_evicts_and_stays_correct(tiny_files: Files) -> None:
    nlp = make_nlp(tiny_files, sentencizer=True, model={"cache_size": 3})
    reference = [layers_of(doc) for doc in make_nlp(tiny_files, sentencizer=True).pipe(TEXTS)]
    for _ in range(2):
        for doc, expected in zip(nlp.pipe(TEXTS), reference):
            np.testing.assert_array_equal(layers_of(doc), expected)
    assert len(ensure_backend(nlp.get_pipe("ctx_elmo").model).word_cache) <= 3


# --------------------------------------------------------------------------
# serialization
# --------------------------------------------------------------------------


def _outputs(nlp, texts: Sequence[str]) -> List[np.ndarray]:
    return [layers_of(doc) for doc in nlp.pipe(texts)]


def test_to_disk_without_source_files(tmp_path: Path) -> None:
    files = write_random_elmo(tmp_path / "source", seed=3)
    # No sentencizer and a small chunk_size: the loaded pipeline must keep it.
    nlp = make_nlp(files, model={"chunk_size": 4}, store_dtype="float32")
    expected = _outputs(nlp, TEXTS)
    nlp.to_disk(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "ctx_elmo" / "encoder" / "model.safetensors").is_file()
    for path in files:
        path.unlink()
    loaded = spacy.load(tmp_path / "pipeline")
    assert loaded.pipe_names == ["ctx_elmo"]
    assert ensure_backend(loaded.get_pipe("ctx_elmo").model).chunk_size == 4
    for a, b in zip(expected, _outputs(loaded, TEXTS)):
        np.testing.assert_array_equal(a, b)
    # initialize() (e.g. before further training) must not reload the gone files.
    loaded.initialize()
    for a, b in zip(expected, _outputs(loaded, TEXTS)):
        np.testing.assert_array_equal(a, b)
    doc = loaded(BANK_TEXT)
    assert doc._.ctx.layer_names == LAYER_NAMES
    assert doc._.ctx.vector_mode == "mean"


def test_to_disk_with_sentencizer_round_trip(tmp_path: Path, tiny_files: Files) -> None:
    nlp = make_nlp(tiny_files, sentencizer=True, store="last")
    expected = _outputs(nlp, TEXTS)
    nlp.to_disk(tmp_path / "pipeline")
    loaded = spacy.load(tmp_path / "pipeline")
    assert loaded.pipe_names == ["sentencizer", "ctx_elmo"]
    for a, b in zip(expected, _outputs(loaded, TEXTS)):
        assert a.shape[0] == 1
        np.testing.assert_array_equal(a, b)


def test_to_bytes_into_fresh_pipeline(tmp_path: Path, tiny_files: Files) -> None:
    nlp = make_nlp(tiny_files, sentencizer=True, model={"chunk_size": 5})
    expected = _outputs(nlp, TEXTS)
    data = nlp.to_bytes()
    # Same pipes, but configured with other weights: the bytes must carry the model.
    other = write_random_elmo(tmp_path / "other", seed=7)
    fresh = make_nlp(other, sentencizer=True)
    assert not fresh.get_pipe("ctx_elmo").is_loaded
    fresh.from_bytes(data)
    assert fresh.get_pipe("ctx_elmo").is_loaded
    for a, b in zip(expected, _outputs(fresh, TEXTS)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("store_dtype", ["float32", "float16"])
def test_docbin_round_trip(tiny_files: Files, store_dtype: str) -> None:
    nlp = make_nlp(tiny_files, sentencizer=True, store_dtype=store_dtype)
    texts = TEXTS + ["Hello  \n\n world .", ""]
    docs = list(nlp.pipe(texts))
    data = DocBin(store_user_data=True, docs=docs).to_bytes()
    restored = list(DocBin().from_bytes(data).get_docs(spacy.blank("en").vocab))
    assert len(restored) == len(docs)
    for before, after in zip(docs, restored):
        ctx, ctx2 = before._.ctx, after._.ctx
        assert isinstance(ctx2, CtxData)
        assert ctx2.layers.dtype == np.dtype(store_dtype)
        np.testing.assert_array_equal(ctx2.layers, ctx.layers)
        np.testing.assert_array_equal(ctx2.piece_counts, ctx.piece_counts)
        assert ctx2.layer_names == ctx.layer_names == LAYER_NAMES
        assert ctx2.model_name == ctx.model_name
        assert ctx2.vector_mode == ctx.vector_mode == "mean"
        install_vector_hooks(after)
        for t1, t2 in zip(before, after):
            np.testing.assert_array_equal(t1.vector, t2.vector)


@pytest.mark.filterwarnings("ignore:.*W109")
def test_doc_to_bytes_round_trip(tiny_nlp) -> None:
    doc = tiny_nlp(BANK_TEXT)
    restored = Doc(tiny_nlp.vocab).from_bytes(doc.to_bytes())
    np.testing.assert_array_equal(layers_of(restored), layers_of(doc))
