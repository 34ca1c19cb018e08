"""Tests of what only the ``ctx_elmo`` component (``spacy_ctx.ElmoEncoder.v1``) does.

Parity with AllenNLP and bilm-tf, sentences and chunks, ELMo's files and
published names, the word cache. The behaviour ELMo shares with ``ctx_bert``
(unusual input, store settings, batching, serialization, vector hooks) is
tested for both families in test_component.py.

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
from spacy.tokens import Doc

from spacy_ctx.errors import CheckpointError
from spacy_ctx.loaders import ELMO_MODELS

from .elmo_utils import write_random_elmo
from .families import BANK_TEXT, BATCH_TEXTS, first_use_raises

Files = Tuple[Path, Path]

#: Width of every layer of the tiny random model (2 * projection_dim).
TINY_WIDTH = 16
LAYER_NAMES = ["token", "lstm_1", "lstm_2"]
TEXTS = BATCH_TEXTS


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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_files(tiny_elmo_files: Files) -> Files:
    return tiny_elmo_files


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
    backend = nlp.get_pipe("ctx_elmo").backend
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
# bad files and names
# --------------------------------------------------------------------------


def test_missing_options_file(tmp_path: Path) -> None:
    options, weights = write_random_elmo(tmp_path / "m")
    options.unlink()
    first_use_raises(make_nlp((options, weights)), CheckpointError, str(options))


def test_weights_of_another_model(tmp_path: Path) -> None:
    options, _ = write_random_elmo(tmp_path / "a", proj=8)
    _, other_weights = write_random_elmo(tmp_path / "b", proj=6)
    first_use_raises(make_nlp((options, other_weights)), CheckpointError, str(other_weights))


def test_options_without_weights(tmp_path: Path) -> None:
    options, _ = write_random_elmo(tmp_path / "m")
    nlp = make_nlp(model={"options": str(options)})
    first_use_raises(nlp, CheckpointError, "model.weights", "weights.hdf5")


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
    backend = nlp.get_pipe("ctx_elmo").backend
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
    uncached_backend = uncached.get_pipe("ctx_elmo").backend
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
    assert len(nlp.get_pipe("ctx_elmo").backend.word_cache) <= 3


def test_segment_stats_match_what_is_encoded(tiny_files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    nlp = make_nlp(tiny_files, sentencizer=True, model={"chunk_size": 3})
    texts = ["One two. Three four five six seven.", "", "  \n ", "A lone sentence without end"]
    docs = [nlp.make_doc(text) for text in texts]
    for name, proc in nlp.pipeline[:-1]:
        docs = [proc(doc) for doc in docs]
    backend = nlp.get_pipe("ctx_elmo").backend
    stats = backend.segment_stats(docs, max_batch_tokens=12)
    seen = []
    forward = backend.bilm.forward_from_embeddings

    def spy(embeddings, lengths):
        seen.append((embeddings.shape[0], embeddings.shape[1], [int(n) for n in lengths]))
        return forward(embeddings, lengths)

    monkeypatch.setattr(backend.bilm, "forward_from_embeddings", spy)
    backend.encode_docs(docs, max_batch_tokens=12)
    lengths = [n for _, _, batch in seen for n in batch]
    assert stats["n_segments"] == len(lengths)
    assert stats["n_positions"] == sum(lengths)
    assert stats["n_tokens"] == sum(1 for doc in docs for t in doc if not t.is_space)
    assert stats["n_batches"] == len(seen)
    assert stats["n_padded_positions"] == sum(rows * longest for rows, longest, _ in seen)


def test_elmo_speed_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/elmo_speed.py runs end to end (tiny preset, a few sentences) and
    writes its JSON with one row per source tree."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "speed.json"
    subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "elmo_speed.py"), "--preset", "tiny", "--n-sents", "6",
         "--repeats", "1", "--threads", "1", "--cache", str(tmp_path / "models"), "--out", str(out)],
        check=True, capture_output=True, text=True, cwd=repo,
    )
    record = json.loads(out.read_text(encoding="utf-8"))
    [row] = record["rows"]
    assert row["n_sents"] == 6 and row["n_words"] > 0 and row["median_words_per_s"] > 0
