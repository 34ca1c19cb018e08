"""Saving and loading ``ctx_bert`` pipelines, and serializing ``doc._.ctx``.

A saved pipeline must be self-contained: once saved, the checkpoint directory
named in its config may disappear (the tests delete a private copy of it). Docs
carry ``doc._.ctx`` through ``doc.to_bytes()``, ``DocBin(store_user_data=True)``
and ``nlp.pipe(n_process=2)``; vector hooks do not travel and are re-installed
with ``install_vector_hooks``. Offline, CPU, tiny random BERT.
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
from typing import List

import numpy as np
import pytest
import spacy
import srsly
from safetensors.torch import load_file
from spacy.language import Language
from spacy.tokens import Doc, DocBin

import spacy_ctx.loaders
from spacy_ctx import install_vector_hooks
from spacy_ctx.backends.bert import BertBackend
from spacy_ctx.ctx_data import CtxData

WIDTH = 32
N_HIDDEN_LAYERS = 2
TEXTS = [
    "Hello world.",
    "The bank raised rates. We sat on the river bank.",
    "",
    "a  \n\n b \u200b c",
    "Crème brûlée über 東京 🙂 naïve.",
    "the company said that the startup would buy the bank in new york " * 6,  # > 1 window
]
CTX_KEY = ("._.", "ctx", None, None)  # where doc._.ctx lives in doc.user_data

# Docs serialized without their user hooks warn (W109); that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*W109")


# --------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------


def make_nlp(path: Path, **component: object) -> Language:
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(path)}, "store": "all", **component})
    return nlp


@pytest.fixture
def src(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint, which the test may delete."""
    return Path(shutil.copytree(tiny_bert_dir, tmp_path / "src"))


@pytest.fixture(scope="module")
def ref_nlp(tiny_bert_dir: Path) -> Language:
    return make_nlp(tiny_bert_dir)


@pytest.fixture(scope="module")
def ref_docs(ref_nlp: Language) -> List[Doc]:
    return list(ref_nlp.pipe(TEXTS))


def assert_same_ctx(doc: Doc, ref: Doc, atol: float = 0.0) -> None:
    ctx, expected = doc._.ctx, ref._.ctx
    assert isinstance(ctx, CtxData), type(ctx)
    assert ctx.layers.dtype == expected.layers.dtype
    assert ctx.layers.shape == expected.layers.shape
    if atol:
        np.testing.assert_allclose(ctx.layers, expected.layers, rtol=0, atol=atol)
    else:
        np.testing.assert_array_equal(ctx.layers, expected.layers)
    assert ctx.layer_names == expected.layer_names
    assert ctx.model_name == expected.model_name
    assert ctx.vector_mode == expected.vector_mode
    assert ctx.piece_counts.dtype == np.int32
    np.testing.assert_array_equal(ctx.piece_counts, expected.piece_counts)


def assert_same_vectors(nlp: Language, ref_docs: List[Doc]) -> None:
    for doc, ref in zip(nlp.pipe(TEXTS), ref_docs):
        assert [t.text for t in doc] == [t.text for t in ref]
        np.testing.assert_allclose(doc._.ctx.layers, ref._.ctx.layers, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(doc._.ctx.piece_counts, ref._.ctx.piece_counts)
        for token, ref_token in zip(doc, ref):
            np.testing.assert_allclose(token.vector, ref_token.vector, rtol=0, atol=1e-6)


def forbid_checkpoint_loading(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """From now on, fail loudly if anything reads a checkpoint by its configured name."""
    calls: List[str] = []

    def forbidden(*args, **kwargs):
        calls.append(repr(args))
        raise AssertionError(f"the configured checkpoint was read: {args!r}")

    monkeypatch.setattr(spacy_ctx.loaders, "resolve_bert_dir", forbidden)
    monkeypatch.setattr(spacy_ctx.loaders, "download_from_hub", forbidden)
    monkeypatch.setattr(BertBackend, "from_pretrained", classmethod(forbidden))
    return calls


# --------------------------------------------------------------------------
# pipelines: to_disk / spacy.load, to_bytes / from_bytes
# --------------------------------------------------------------------------


def test_to_disk_and_load_without_source_dir(src: Path, tmp_path: Path) -> None:
    nlp = make_nlp(src)
    expected = list(nlp.pipe(TEXTS))
    out = tmp_path / "pipeline"
    nlp.to_disk(out)
    shutil.rmtree(src)

    component_dir = out / "ctx_bert"
    names = {p.name for p in component_dir.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names, names
    # The saved files are real: a readable config and weights with the encoder's keys.
    (config_path,) = component_dir.rglob("config.json")
    config = json.loads(config_path.read_text(encoding="utf8"))
    assert config["hidden_size"] == WIDTH and config["num_hidden_layers"] == N_HIDDEN_LAYERS
    (weights_path,) = component_dir.rglob("model.safetensors")
    state = load_file(str(weights_path))
    assert state["embeddings.word_embeddings.weight"].shape[1] == WIDTH

    loaded = spacy.load(out)
    assert loaded.pipe_names == ["ctx_bert"]
    for doc, ref in zip(loaded.pipe(TEXTS), expected):
        assert_same_ctx(doc, ref, atol=1e-6)
        if ref.has_vector:
            assert doc[0].similarity(doc[-1]) == pytest.approx(ref[0].similarity(ref[-1]), abs=1e-5)


def test_load_never_reads_the_original_checkpoint(
    src: Path, tmp_path: Path, ref_docs: List[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "pipeline"
    make_nlp(src).to_disk(out)
    shutil.rmtree(src)
    calls = forbid_checkpoint_loading(monkeypatch)
    loaded = spacy.load(out)
    assert loaded.get_pipe("ctx_bert").is_loaded  # from the pipeline folder, not from src
    assert_same_vectors(loaded, ref_docs)
    loaded.initialize()  # already loaded: a no-op, which must not reload from src
    assert_same_vectors(loaded, ref_docs)
    loaded.to_disk(tmp_path / "again")
    nlp2 = make_nlp(src)
    nlp2.from_bytes(loaded.to_bytes())
    assert_same_vectors(nlp2, ref_docs)
    assert calls == []


def test_saving_over_the_loaded_folder_and_moving_it(
    src: Path, tmp_path: Path, ref_docs: List[Doc]
) -> None:
    out = tmp_path / "pipeline"
    make_nlp(src).to_disk(out)
    shutil.rmtree(src)
    loaded = spacy.load(out)
    loaded.to_disk(out)  # overwrite the folder the weights were read from
    moved = Path(shutil.move(str(out), str(tmp_path / "moved")))
    assert_same_vectors(spacy.load(moved), ref_docs)


def test_load_with_overridden_settings(src: Path, tmp_path: Path, ref_docs: List[Doc]) -> None:
    out = tmp_path / "pipeline"
    make_nlp(src).to_disk(out)
    shutil.rmtree(src)
    loaded = spacy.load(out, config={"components": {"ctx_bert": {"store": "last"}}})
    for doc, ref in zip(loaded.pipe(TEXTS), ref_docs):
        assert doc._.ctx.layer_names == ref._.ctx.layer_names[-1:]
        np.testing.assert_allclose(doc._.ctx.layers[0], ref._.ctx.layers[-1], rtol=0, atol=1e-6)


def test_to_bytes_from_bytes_without_source_dir(src: Path, ref_docs: List[Doc]) -> None:
    nlp = make_nlp(src)
    data = nlp.to_bytes()  # before first use: serializing loads what is needed
    assert_same_vectors(nlp, ref_docs)
    shutil.rmtree(src)
    nlp2 = make_nlp(src)  # same config, naming the deleted directory
    assert not nlp2.get_pipe("ctx_bert").is_loaded
    nlp2.from_bytes(data)
    assert nlp2.get_pipe("ctx_bert").is_loaded
    assert_same_vectors(nlp2, ref_docs)


def test_model_to_bytes_from_bytes(src: Path, ref_docs: List[Doc]) -> None:
    """The Thinc model (used by copies and listener replacement) carries the weights."""
    nlp = make_nlp(src)
    unloaded = nlp.get_pipe("ctx_bert").model.to_bytes()  # lazy: nothing to carry yet
    nlp.initialize()
    data = nlp.get_pipe("ctx_bert").model.to_bytes()
    shutil.rmtree(src)
    nlp2 = make_nlp(src)
    nlp2.get_pipe("ctx_bert").model.from_bytes(data)
    assert nlp2.get_pipe("ctx_bert").is_loaded
    assert_same_vectors(nlp2, ref_docs)
    nlp3 = make_nlp(src)
    nlp3.get_pipe("ctx_bert").model.from_bytes(unloaded)
    assert not nlp3.get_pipe("ctx_bert").is_loaded


# --------------------------------------------------------------------------
# doc._.ctx through doc.to_bytes and DocBin
# --------------------------------------------------------------------------


@pytest.mark.parametrize("store_dtype", ["float32", "float16"])
def test_docbin_round_trip(tiny_bert_dir: Path, store_dtype: str) -> None:
    nlp = make_nlp(tiny_bert_dir, store_dtype=store_dtype)
    docs = list(nlp.pipe(TEXTS))
    data = DocBin(store_user_data=True, docs=docs).to_bytes()
    loaded = list(DocBin().from_bytes(data).get_docs(spacy.blank("en").vocab))
    assert len(loaded) == len(docs)
    for doc, ref in zip(loaded, docs):
        assert doc.text == ref.text
        assert_same_ctx(doc, ref)
        assert doc._.ctx.layers.dtype == np.dtype(store_dtype)


def test_docbin_without_user_data_drops_ctx(ref_docs: List[Doc]) -> None:
    data = DocBin(store_user_data=False, docs=ref_docs).to_bytes()
    for doc in DocBin().from_bytes(data).get_docs(spacy.blank("en").vocab):
        assert doc._.ctx is None


def test_doc_to_bytes_round_trip(ref_docs: List[Doc]) -> None:
    vocab = spacy.blank("en").vocab
    for ref in ref_docs:
        doc = Doc(vocab).from_bytes(ref.to_bytes())
        assert_same_ctx(doc, ref)


def test_install_vector_hooks_after_docbin_restores_similarity(ref_docs: List[Doc]) -> None:
    ref = ref_docs[1]  # "The bank raised rates. We sat on the river bank."
    data = DocBin(store_user_data=True, docs=[ref]).to_bytes()
    (doc,) = DocBin().from_bytes(data).get_docs(spacy.blank("en").vocab)
    assert "similarity" not in doc.user_token_hooks  # hooks do not travel
    assert doc[1].vector.shape != (WIDTH,)  # the (empty) static vectors
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
# store settings
# --------------------------------------------------------------------------


def test_store_float16_halves_the_bytes(tiny_bert_dir: Path, ref_docs: List[Doc]) -> None:
    nlp16 = make_nlp(tiny_bert_dir, store_dtype="float16")
    docs16 = list(nlp16.pipe(TEXTS))
    for doc16, ref in zip(docs16, ref_docs):
        ctx16, ctx32 = doc16._.ctx, ref._.ctx
        assert ctx16.layers.dtype == np.float16 and ctx32.layers.dtype == np.float32
        assert ctx16.layers.nbytes * 2 == ctx32.layers.nbytes
        np.testing.assert_allclose(
            ctx16.layers.astype(np.float32), ctx32.layers, rtol=2e-3, atol=2e-3
        )
        for token in doc16:
            assert token.vector.dtype == np.float32  # vectors are float32 whatever is stored
    long16, long32 = docs16[-1]._.ctx, ref_docs[-1]._.ctx
    ratio = len(srsly.msgpack_dumps(long16)) / len(srsly.msgpack_dumps(long32))
    assert 0.45 < ratio < 0.6, ratio
    bin16 = DocBin(store_user_data=True, docs=docs16).to_bytes()
    bin32 = DocBin(store_user_data=True, docs=ref_docs).to_bytes()
    assert len(bin16) < 0.65 * len(bin32), (len(bin16), len(bin32))


def test_store_last_and_all(tiny_bert_dir: Path, ref_docs: List[Doc]) -> None:
    config = json.loads((tiny_bert_dir / "config.json").read_text(encoding="utf8"))
    n_layers = config["num_hidden_layers"]
    last_docs = list(make_nlp(tiny_bert_dir, store="last").pipe(TEXTS))
    for doc, ref in zip(last_docs, ref_docs):
        all_ctx, last_ctx = ref._.ctx, doc._.ctx
        assert all_ctx.layers.shape == (n_layers + 1, len(ref), WIDTH)
        assert all_ctx.layer_names == ["embeddings"] + [f"layer_{i + 1}" for i in range(n_layers)]
        assert last_ctx.layers.shape == (1, len(doc), WIDTH)
        assert last_ctx.layer_names == [f"layer_{n_layers}"]
        np.testing.assert_allclose(last_ctx.layers[0], all_ctx.layers[-1], rtol=0, atol=1e-6)
        for token, ref_token in zip(doc, ref):
            np.testing.assert_allclose(token.vector, ref_token.vector, rtol=0, atol=1e-6)


def test_store_none_stores_nothing(tiny_bert_dir: Path) -> None:
    nlp = make_nlp(tiny_bert_dir, store="none", vector_hooks=False)
    for doc in nlp.pipe(TEXTS):
        assert doc._.ctx is None
        assert doc.user_data.get(CTX_KEY) is None
        assert not doc.user_hooks and not doc.user_token_hooks and not doc.user_span_hooks
        assert doc._.ctx_vector is None
        for token in doc:
            assert token._.ctx_vector is None


# --------------------------------------------------------------------------
# initialize, multiprocessing
# --------------------------------------------------------------------------


def test_works_without_and_after_initialize(tiny_bert_dir: Path, ref_docs: List[Doc]) -> None:
    lazy = make_nlp(tiny_bert_dir)
    assert not lazy.get_pipe("ctx_bert").is_loaded
    assert_same_vectors(lazy, ref_docs)  # loads on first use
    assert lazy.get_pipe("ctx_bert").is_loaded

    initialized = make_nlp(tiny_bert_dir)
    initialized.initialize()
    assert initialized.get_pipe("ctx_bert").is_loaded
    assert_same_vectors(initialized, ref_docs)
    initialized.initialize()  # again: keeps the pretrained weights, no re-initialization
    assert_same_vectors(initialized, ref_docs)
    lazy.initialize()  # initialize after use
    assert_same_vectors(lazy, ref_docs)


# Runs in a fresh interpreter: spaCy's n_process forks the current process, and a
# hung worker must fail this test, not hang pytest.
_PIPE_SCRIPT = r"""
import json, sys
import numpy as np, spacy, torch
model_dir, out, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
# As on any multi-core machine: the parent runs torch with a thread pool before forking.
torch.set_num_threads(2)
nlp = spacy.blank("en")
nlp.add_pipe("ctx_bert", config={"model": {"name": model_dir}, "store": "all"})
one = list(nlp.pipe(texts, n_process=1))
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
np.savez(out + ".npz", **arrays)
with open(out + ".json", "w") as f:
    json.dump(meta, f)
"""
PIPE_TIMEOUT_S = 30


def test_pipe_with_two_processes_matches_one(tiny_bert_dir: Path, tmp_path: Path) -> None:
    texts = TEXTS * 2
    out = str(tmp_path / "pipe")
    proc = subprocess.Popen(
        [sys.executable, "-c", _PIPE_SCRIPT, str(tiny_bert_dir), out, json.dumps(texts)],
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
    arrays = np.load(out + ".npz")
    meta = json.loads(Path(out + ".json").read_text())
    assert len(meta) == len(texts)
    for i, (text, info) in enumerate(zip(texts, meta)):
        assert info["texts"] == [text, text]
        assert info["names"][0] == info["names"][1] == ["embeddings", "layer_1", "layer_2"]
        assert info["models"][0] == info["models"][1] == str(tiny_bert_dir)
        assert "similarity" in info["hooks"][0]  # hooks exist in-process ...
        assert info["hooks"][1] == []  # ... and are lost when Docs come back from workers
        np.testing.assert_array_equal(arrays[f"two_counts_{i}"], arrays[f"one_counts_{i}"])
        one, two = arrays[f"one_layers_{i}"], arrays[f"two_layers_{i}"]
        assert one.shape == two.shape and one.shape[0] == 3 and one.shape[2] == WIDTH
        # Workers may use another thread count than the parent: float32 rounding only.
        np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)
