"""``store_dtype = "int8"`` and ``store_layers`` (issue 10, part 5: the Doc payload).

int8: every stored token row (per layer) is quantized symmetrically with its own
float32 scale (absmax / 127) and dequantized on read; the checks compare an int8
pipeline with the float32 pipeline on the same weights (the embedded MiniLM for
real-text accuracy, the tiny random BERT/ELMo elsewhere). store_layers: the
selected layers equal the same rows of ``store = "all"``. Offline, CPU.
"""

from __future__ import annotations

from typing import List

import numpy as np
import pytest
import spacy
from spacy.language import Language
from spacy.tokens import Doc, DocBin

from spacy_ctx import install_vector_hooks
from spacy_ctx.ctx_data import CtxData, dequantize_rows, quantize_rows
from spacy_ctx.errors import ConfigError

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*W109"),  # Docs serialized without their hooks
]

#: Real English text (news-style paragraphs) for the accuracy checks.
REAL_TEXTS = [
    "The Bank of England raised interest rates by a quarter of a percentage point on "
    "Thursday, the first increase in more than three years, as inflation climbed to its "
    "highest level since 2012. Economists had expected the move, but sterling fell after "
    "the governor said further rises would be gradual and limited.",
    "We sat on the river bank and watched the boats drift past.  Later, a ferry carrying "
    "two hundred passengers docked at the old pier, where families waited in the rain.\n\n"
    "Nobody seemed to mind.",
    "Shares in the mobile phone maker rose 5% after it reported record sales in Asia, "
    "although analysts warned that competition from cheaper handsets would squeeze margins.",
]
TINY_TEXTS = ["Hello world.", "We sat on the river bank.", "a  \n\n b", "", "New York City rates rose."]


def _nlp(model_dir, **settings) -> Language:
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(model_dir)}, **settings})
    return nlp


def _half_step_bound(ctx: CtxData) -> np.ndarray:
    """Half a quantization step per row, with room for float32 rounding."""
    return ctx.scales[..., None] * 0.5 * (1 + 1e-5) + 1e-7


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _roundtrip_docbin(docs: List[Doc], vocab) -> List[Doc]:
    data = DocBin(store_user_data=True, docs=docs).to_bytes()
    return list(DocBin().from_bytes(data).get_docs(vocab))


# -- the codec on its own ---------------------------------------------------------------------
def test_quantize_rows_within_half_step_and_zero_rows_stay_zero() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 20, 48)).astype(np.float32)
    x *= np.logspace(-6, 3, 20, dtype=np.float32)[None, :, None]  # rows of any magnitude
    x[1, 4] = 0.0
    x[2, 7, 5] = -1e4  # a single outlier sets its row's scale
    values, scales = quantize_rows(x)
    assert values.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (3, 20)
    assert values.min() >= -127 and values.max() <= 127
    np.testing.assert_allclose(scales, np.abs(x).max(-1) / 127, rtol=1e-6)
    back = dequantize_rows(values, scales)
    assert back.dtype == np.float32
    assert (np.abs(back - x) <= scales[..., None] * 0.5 * (1 + 1e-5) + 1e-30).all()
    assert scales[1, 4] == 0 and (values[1, 4] == 0).all() and (back[1, 4] == 0).all()
    assert back[2, 7, 5] == pytest.approx(-1e4)  # the absmax value is exact up to float32


def test_ctxdata_int8_keeps_float_layers_public() -> None:
    x = np.random.default_rng(1).normal(size=(2, 4, 64)).astype(np.float32)
    ctx = CtxData.from_float(x, ["a", "b"], "m", np.ones(4, np.int32), dtype="int8")
    assert ctx.store_dtype == "int8" and ctx.stored.dtype == np.int8
    assert ctx.layers.dtype == np.float32 and ctx.layers.shape == x.shape
    assert ctx.layers is ctx.layers  # dequantized once, then cached
    np.testing.assert_array_equal(ctx.vectors, ctx.layers[-1])
    assert ctx.nbytes < x.nbytes / 3
    with pytest.raises(ValueError, match="int8"):
        CtxData(ctx.stored, ["a", "b"], "m", np.ones(4, np.int32))  # values without scales
    with pytest.raises(ValueError, match="scales"):
        CtxData(ctx.stored, ["a", "b"], "m", np.ones(4, np.int32), scales=np.ones((2, 3)))


# -- MiniLM on real text ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_docs(minilm):
    """The same real texts through float32 and int8 pipelines (all layers stored)."""
    f32 = list(_nlp(minilm, store="all").pipe(REAL_TEXTS))
    nlp8 = _nlp(minilm, store="all", store_dtype="int8")
    return f32, list(nlp8.pipe(REAL_TEXTS)), nlp8


def test_int8_close_to_float32_on_real_text(minilm_docs) -> None:
    f32_docs, int8_docs, _ = minilm_docs
    for ref, doc in zip(f32_docs, int8_docs):
        ctx, ref_ctx = doc._.ctx, ref._.ctx
        assert ctx.store_dtype == "int8" and ctx.layer_names == ref_ctx.layer_names
        assert ctx.layers.dtype == np.float32 and ctx.layers.shape == ref_ctx.layers.shape
        # Within half a quantization step of float32, every value of every layer.
        assert (np.abs(ctx.layers - ref_ctx.layers) <= _half_step_bound(ctx)).all()
        # Token vectors: cosine >= 0.999 against float32 (tokens with pieces).
        has = ref_ctx.piece_counts > 0
        assert has.sum() > 20
        cos = _cosines(doc._.ctx.vectors[has], ref._.ctx.vectors[has])
        assert cos.min() >= 0.999, cos.min()
        for layer in range(ctx.layers.shape[0]):
            assert _cosines(ctx.layers[layer][has], ref_ctx.layers[layer][has]).min() >= 0.999
        # Zero rows (whitespace tokens) stay exactly zero, with scale 0.
        zero = ~has
        assert (ctx.layers[:, zero] == 0).all() and (ctx.scales[:, zero] == 0).all()
    assert any((~(d._.ctx.piece_counts > 0)).any() for d in int8_docs)  # "  " and "\n\n"


def test_int8_hooks_and_similarity(minilm_docs) -> None:
    f32_docs, int8_docs, _ = minilm_docs
    ref, doc = f32_docs[1], int8_docs[1]
    assert doc[5].text == "bank" and doc[5].has_vector
    assert doc[5].vector.dtype == np.float32
    np.testing.assert_array_equal(doc[5].vector, doc._.ctx.vectors[5])
    np.testing.assert_array_equal(doc[5]._.ctx_vector, doc[5].vector)
    assert doc[5].similarity(doc[1]) == pytest.approx(ref[5].similarity(ref[1]), abs=2e-3)
    span, ref_span = doc[3:6], ref[3:6]
    assert _cosines(span.vector, ref_span.vector) >= 0.999
    assert span.similarity(doc[0:2]) == pytest.approx(ref_span.similarity(ref[0:2]), abs=2e-3)
    assert _cosines(doc.vector, ref.vector) >= 0.999
    assert doc.similarity(int8_docs[0]) == pytest.approx(ref.similarity(f32_docs[0]), abs=2e-3)
    assert doc.vector_norm == pytest.approx(ref.vector_norm, rel=2e-3)
    whitespace = [t for t in doc if t.is_space]
    assert whitespace and not whitespace[0].has_vector and not whitespace[0].vector.any()


def test_int8_docbin_and_to_bytes_round_trip(minilm_docs) -> None:
    _, int8_docs, nlp8 = minilm_docs
    float_bytes = len(
        DocBin(store_user_data=True, docs=minilm_docs[0]).to_bytes()
    )
    data = DocBin(store_user_data=True, docs=int8_docs).to_bytes()
    assert len(data) < float_bytes / 3  # int8 values + one float32 scale per row
    loaded = list(DocBin().from_bytes(data).get_docs(nlp8.vocab))
    via_doc_bytes = [Doc(nlp8.vocab).from_bytes(doc.to_bytes()) for doc in int8_docs]
    for doc, back, again in zip(int8_docs, loaded, via_doc_bytes):
        for copy in (back, again):
            ctx = copy._.ctx
            assert ctx.store_dtype == "int8" and ctx.stored.dtype == np.int8
            np.testing.assert_array_equal(ctx.stored, doc._.ctx.stored)
            np.testing.assert_array_equal(ctx.scales, doc._.ctx.scales)
            np.testing.assert_array_equal(ctx.layers, doc._.ctx.layers)
            np.testing.assert_array_equal(ctx.piece_counts, doc._.ctx.piece_counts)
            assert ctx.layer_names == doc._.ctx.layer_names
            install_vector_hooks(copy)
            assert copy[4].similarity(copy[2]) == pytest.approx(doc[4].similarity(doc[2]))
            np.testing.assert_array_equal(copy.vector, doc.vector)


# -- tiny models: retokenization, store_layers, saving -----------------------------------------
@pytest.fixture(scope="module")
def tiny_pair(tiny_bert_dir):
    """float32 and int8 tiny-BERT pipelines, all layers stored."""
    return _nlp(tiny_bert_dir, store="all"), _nlp(tiny_bert_dir, store="all", store_dtype="int8")


def test_int8_follows_merge_and_split(tiny_pair) -> None:
    nlp32, nlp8 = tiny_pair
    text = "We sat on the river bank in New York City."
    ref, doc = nlp32(text), nlp8(text)
    before = doc._.ctx
    with doc.retokenize() as retokenizer:
        retokenizer.merge(doc[4:6])  # "river bank"
        retokenizer.merge(doc[7:10])  # "New York City"
    with ref.retokenize() as retokenizer:
        retokenizer.merge(ref[4:6])
        retokenizer.merge(ref[7:10])
    ctx = doc._.ctx
    assert ctx.store_dtype == "int8" and ctx.n_rows == len(doc) == 8
    # Unchanged tokens keep their int8 values and scales exactly.
    for new, old in [(0, 0), (3, 3), (5, 6), (7, 10)]:
        np.testing.assert_array_equal(ctx.stored[:, new], before.stored[:, old])
        np.testing.assert_array_equal(ctx.scales[:, new], before.scales[:, old])
    # A merged token: the mean of the dequantized rows, quantized again (half a step).
    for new, (start, end) in [(4, (4, 6)), (6, (7, 10))]:
        mean = before.layers[:, start:end].mean(axis=1)
        assert (np.abs(ctx.layers[:, new] - mean) <= ctx.scales[:, new, None] * 0.5 + 1e-6).all()
        assert ctx.piece_counts[new] == before.piece_counts[start:end].sum()
    # And it stays close to the float32 pipeline's merged rows.
    assert _cosines(ctx.vectors, ref._.ctx.vectors).min() >= 0.999
    assert doc[4].text == "river bank" and doc[4].has_vector
    assert doc[4].similarity(doc[6]) == pytest.approx(ref[4].similarity(ref[6]), abs=5e-3)
    with doc.retokenize() as retokenizer:
        retokenizer.split(doc[1], ["s", "at"], heads=[doc[1], doc[1]])
    split_ctx = doc._.ctx  # each part gets the row (values and scale) it came from
    for part in (1, 2):
        np.testing.assert_array_equal(split_ctx.stored[:, part], ctx.stored[:, 1])
        np.testing.assert_array_equal(split_ctx.scales[:, part], ctx.scales[:, 1])
    np.testing.assert_array_equal(split_ctx.stored[:, 5], ctx.stored[:, 4])


def test_int8_zero_rows_on_tiny_model(tiny_pair) -> None:
    nlp32, nlp8 = tiny_pair
    for ref, doc in zip(nlp32.pipe(TINY_TEXTS), nlp8.pipe(TINY_TEXTS)):
        ctx = doc._.ctx
        zero = ref._.ctx.piece_counts == 0
        assert (ctx.layers[:, zero] == 0).all() and (ctx.scales[:, zero] == 0).all()
        assert (np.abs(ctx.layers - ref._.ctx.layers) <= _half_step_bound(ctx)).all()


def test_int8_elmo_mean_vectors(tiny_elmo_files) -> None:
    options, weights = tiny_elmo_files
    texts = ["The bank raised rates.", "We sat on the river bank."]

    def elmo(**settings) -> Language:
        nlp = spacy.blank("en")
        nlp.add_pipe("sentencizer")
        model = {"options": str(options), "weights": str(weights)}
        nlp.add_pipe("ctx_elmo", config={"model": model, **settings})
        return nlp

    refs = list(elmo().pipe(texts))
    docs = list(elmo(store_dtype="int8", store_layers=["lstm_2", 0]).pipe(texts))
    for ref, doc in zip(refs, docs):
        ctx = doc._.ctx
        assert ctx.layer_names == ["token", "lstm_2"] and ctx.store_dtype == "int8"
        expected = ref._.ctx.layers[[0, 2]]
        assert (np.abs(ctx.layers - expected) <= _half_step_bound(ctx)).all()
        np.testing.assert_allclose(ctx.vectors, expected.mean(axis=0), atol=ctx.scales.max())


@pytest.mark.parametrize(
    "store_layers,names,rows",
    [
        ([-1], ["layer_2"], [2]),
        ([0], ["embeddings"], [0]),
        (["layer_2", "embeddings"], ["embeddings", "layer_2"], [0, 2]),  # model order
        ([-2, "layer_2"], ["layer_1", "layer_2"], [1, 2]),
    ],
)
@pytest.mark.parametrize("store", ["last", "all"])
def test_store_layers_selects_rows(
    tiny_pair, tiny_bert_dir, store: str, store_layers, names, rows
) -> None:
    all_docs = list(tiny_pair[0].pipe(TINY_TEXTS))
    nlp = _nlp(tiny_bert_dir, store=store, store_layers=store_layers)
    assert nlp.get_pipe("ctx_bert").stored_layers == rows
    for ref, doc in zip(all_docs, nlp.pipe(TINY_TEXTS)):
        assert doc._.ctx.layer_names == names
        np.testing.assert_allclose(doc._.ctx.layers, ref._.ctx.layers[rows], atol=1e-6)
        np.testing.assert_allclose(doc._.ctx.vectors, ref._.ctx.layers[rows[-1]], atol=1e-6)


def test_store_layers_with_a_listener(tiny_pair, tiny_bert_dir) -> None:
    """A last-layer listener and a stored middle layer share one encoder pass."""
    nlp = _nlp(tiny_bert_dir, store_layers=["layer_1"])
    listener = {"@architectures": "spacy_ctx.LastLayerListener.v1", "upstream": "ctx_bert"}
    nlp.add_pipe("textcat", config={"model": {
        "@architectures": "spacy.TextCatReduce.v1", "exclusive_classes": True,
        "use_reduce_first": False, "use_reduce_last": False, "use_reduce_max": False,
        "use_reduce_mean": True, "tok2vec": listener}})
    nlp.get_pipe("textcat").add_label("A")
    nlp.get_pipe("textcat").add_label("B")
    nlp.initialize()
    encoder = nlp.get_pipe("ctx_bert")
    assert encoder._keep_layers(for_store=True, for_listeners=True) == [1, 2]
    ref = list(tiny_pair[0].pipe(TINY_TEXTS))
    for doc, r in zip(nlp.pipe(TINY_TEXTS), ref):
        assert doc._.ctx.layer_names == ["layer_1"]
        np.testing.assert_allclose(doc._.ctx.layers, r._.ctx.layers[[1]], atol=1e-6)
        assert set(doc.cats) == {"A", "B"}


@pytest.mark.parametrize(
    "store_layers,needles",
    [
        (["layer_9"], ["store_layers", "layer_9", "embeddings, layer_1, layer_2"]),
        ([3], ["store_layers", "out of range", "-3..2", "embeddings, layer_1, layer_2"]),
        ([-4], ["store_layers", "-4"]),
        ([-1, "layer_2"], ["store_layers", "twice"]),
    ],
)
def test_store_layers_bad_names_fail_at_initialize_and_first_use(
    tiny_bert_dir, store_layers, needles
) -> None:
    for first_use in ("initialize", "call"):
        nlp = _nlp(tiny_bert_dir, store_layers=store_layers)  # names are checked later
        with pytest.raises(ConfigError) as info:
            nlp.initialize() if first_use == "initialize" else nlp("Hello world.")
        for needle in needles:
            assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "settings,needles",
    [
        ({"store_layers": []}, ["store_layers", "empty"]),
        ({"store": "none", "vector_hooks": False, "store_layers": [-1]}, ["store_layers", "none"]),
    ],
)
def test_store_layers_bad_settings_fail_at_add_pipe(tiny_bert_dir, settings, needles) -> None:
    with pytest.raises(ConfigError) as info:
        _nlp(tiny_bert_dir, **settings)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("value", ["layer_1", [1.5], [True], 3])
def test_store_layers_wrong_types_fail_at_add_pipe(tiny_bert_dir, value) -> None:
    with pytest.raises(Exception, match="store_layers"):
        _nlp(tiny_bert_dir, store_layers=value)


def test_component_checks_store_layers_types_itself(tiny_bert_dir) -> None:
    nlp = _nlp(tiny_bert_dir)
    model = nlp.get_pipe("ctx_bert").model
    component = type(nlp.get_pipe("ctx_bert"))
    for bad in ("layer_1", [True], [None]):
        with pytest.raises(ConfigError, match="store_layers"):
            component(nlp.vocab, model, "ctx_bert", store_layers=bad)


def test_settings_survive_to_disk_and_load(tiny_bert_dir, tmp_path) -> None:
    nlp = _nlp(tiny_bert_dir, store_dtype="int8", store_layers=["embeddings", -1])
    docs = list(nlp.pipe(TINY_TEXTS))
    nlp.to_disk(tmp_path / "pipeline")
    loaded = spacy.load(tmp_path / "pipeline")
    config = loaded.config["components"]["ctx_bert"]
    assert config["store_dtype"] == "int8" and config["store_layers"] == ["embeddings", -1]
    for doc, again in zip(docs, loaded.pipe(TINY_TEXTS)):
        assert again._.ctx.store_dtype == "int8"
        assert again._.ctx.layer_names == ["embeddings", "layer_2"]
        np.testing.assert_array_equal(again._.ctx.stored, doc._.ctx.stored)
        np.testing.assert_array_equal(again._.ctx.scales, doc._.ctx.scales)
    restored = _roundtrip_docbin(docs, loaded.vocab)
    assert [d._.ctx.store_dtype for d in restored] == ["int8"] * len(docs)


def test_payload_benchmark_smoke(minilm, tmp_path) -> None:
    """benchmarks/payload.py on two Docs: every row, JSON written, int8 < float16 < float32."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "payload.py"
    spec = importlib.util.spec_from_file_location("payload_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "payload.json"
    module.main(["--n-docs", "2", "--check-docs", "1", "--model", str(minilm), "--out", str(out)])
    result = json.loads(out.read_text(encoding="utf8"))
    rows = {row["row"]: row for row in result["rows"]}
    assert len(rows) == len(module.ROWS)
    sizes = [rows[f"last {dtype}"]["bytes_per_doc"] for dtype in ("int8", "float16", "float32")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[2] / 3
    assert rows["last int8"]["worst_token_cosine_vs_float32"] >= 0.999
    assert result["spacy_transformers"]["estimate_bytes_per_doc"] > rows["last float32"]["bytes_per_doc"]
