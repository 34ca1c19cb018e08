"""``quantize = "int8"``: dynamic int8 Linear layers for CPU inference with a frozen encoder.

Tolerances. Dynamic quantization rounds each Linear layer's weights to 255 levels
per output channel and its input to 256 levels over the whole batch (one scale
and zero point per call), so each layer's output carries a relative error of
about (input range / 255) / typical input. BERT-style models have a few outlier
channels: in MiniLM the FFN inputs reach |x| ~ 30 while the mean |x| is ~0.4, so the
step is ~0.1 and errors compound over 6 layers. On the sentences below the worst
token of the last layer has a cosine of ~0.98 to its float32 vector (mean ~0.99);
over 50 long BBC articles batched together (one activation range per batch) the
worst was 0.944, mean 0.991 (benchmarks/precision.py), against 0.9999 for bf16. The
bounds below (worst >= 0.95, mean >= 0.98 on these sentences) leave a margin; the tiny random model (width 32, small
activations, no outliers) is much closer (worst >= 0.99). A single layer is
checked exactly against an independent float emulation of the same arithmetic.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import spacy
import torch
from spacy.tokens import DocBin
from spacy.training import Example

from spacy_ctx.backends.precision import count_int8_linear, cpu_has_vnni, quantize_linear_int8
from spacy_ctx.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = [
    "Apple is looking at buying a U.K. startup for $1 billion, sources said on Monday.",
    "The bank raised rates. We sat on the river bank in Paris and watched the water.",
    "Hello world!",
    "The company said that the startup would buy the bank in New York next year.",
]


def _nlp(model_dir: Path, **model) -> spacy.language.Language:
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(model_dir), **model}, "store": "all",
                                     "frozen": True})
    nlp.initialize()
    return nlp


def _layers(nlp, texts=TEXTS) -> np.ndarray:
    """Every stored layer of every token, rows concatenated over Docs."""
    docs = list(nlp.pipe(texts))
    return np.concatenate([np.asarray(doc._.ctx.layers) for doc in docs], axis=1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    keep = (np.linalg.norm(a, axis=1) > 0) & (np.linalg.norm(b, axis=1) > 0)
    a, b = a[keep], b[keep]
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _emulated_linear(x: torch.Tensor, w_int: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor,
                     full_range: bool) -> torch.Tensor:
    """The int8 Linear redone in float64, independently of torch's quantized ops: the
    input quantized asymmetrically to uint8 over the whole tensor (7 bits when not
    full range), integer products, then rescaled by both scales, plus the bias."""
    x = x.double()
    levels = 255 if full_range else 127
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    x_scale = (hi - lo) / levels
    zero = round(-lo / x_scale)
    x_int = torch.clamp(torch.round(x / x_scale) + zero, 0, levels)
    return ((x_int - zero) @ w_int.double().T) * x_scale * w_scale.double()[None, :] + bias.double()


@pytest.mark.parametrize("full_range", [True, False])
def test_int8_linear_matches_an_independent_emulation(full_range):
    if full_range and not cpu_has_vnni():
        pytest.skip("8-bit activations are only used on CPUs with VNNI")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40))
    x = torch.randn(7, 48) * 3 + 0.5
    quantized = quantize_linear_int8(model, full_range=full_range)
    assert count_int8_linear(quantized) == 1
    # The weights: symmetric int8 per output channel (torch: scale = absmax / 127.5);
    # emulated rounding agrees up to float32 ties (one level).
    packed, _ = quantized[0]._packed_params._weight_bias()
    w_int, w_scale = packed.int_repr(), packed.q_per_channel_scales()
    weight = model[0].weight.detach().double()
    np.testing.assert_allclose(w_scale, weight.abs().amax(1) / 127.5, rtol=1e-6)
    assert float((w_int.double() - torch.round(weight / w_scale[:, None])).abs().max()) <= 1
    with torch.inference_mode():
        got = quantized(x).double()
        exact = model[0](x).double()
    expected = _emulated_linear(x, w_int, w_scale, model[0].bias.detach(), full_range)
    error = float((expected - exact).abs().max())  # what int8 costs on this layer
    diff = (got - expected).abs()
    # An input on a float32 rounding tie may land one level apart (moving one row by
    # a fraction of the int8 error); all else agrees to float32 precision. 7-bit
    # instead of 8-bit inputs would move nearly every output by about `error`.
    assert float((diff < 1e-5).float().mean()) >= 0.9
    assert float(diff.max()) <= 0.5 * error
    assert 0 < error < 0.05 * float(exact.abs().max())


def test_quantized_copy_shares_weights_and_leaves_the_encoder_alone(tiny_bert_dir):
    nlp = _nlp(tiny_bert_dir, quantize="int8")
    backend = nlp.get_pipe("ctx_bert").backend
    before = {k: v.clone() for k, v in backend.state_dict().items()}
    list(nlp.pipe(TEXTS[:1]))
    quantized = backend._int8.module
    assert quantized is not None and count_int8_linear(quantized) == 2 * 6  # q, k, v, out, inner, outer
    assert count_int8_linear(backend.encoder) == 0
    shared = {id(p) for p in backend.encoder.parameters()}
    assert all(id(p) in shared for p in quantized.parameters())  # embeddings, norms: not copied
    after = backend.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert backend.precision == "int8" and backend.precision_info()["quantize"] == "int8"


def test_tiny_model_int8_close_to_fp32(tiny_bert_dir):
    ref = _layers(_nlp(tiny_bert_dir))
    low = _layers(_nlp(tiny_bert_dir, quantize="int8"))
    assert low.shape == ref.shape
    cos = _cosines(low[1:], ref[1:])  # the embedding layer has no Linear: identical
    np.testing.assert_allclose(low[0], ref[0], rtol=1e-6, atol=1e-6)
    assert cos.min() >= 0.99, cos.min()
    assert not np.allclose(low[1:], ref[1:], atol=1e-6)  # int8 really ran


def test_minilm_int8_within_documented_tolerance(minilm):
    ref = _layers(_nlp(minilm))
    low = _layers(_nlp(minilm, quantize="int8"))
    cos = _cosines(low[-1], ref[-1])
    assert cos.min() >= 0.95 and cos.mean() >= 0.98, (cos.min(), cos.mean())


def test_serialization_keeps_int8_and_float32_weights(tiny_bert_dir, tmp_path):
    nlp = _nlp(tiny_bert_dir, quantize="int8")
    before = _layers(nlp)
    fp32_weights = {k: v.clone() for k, v in nlp.get_pipe("ctx_bert").backend.state_dict().items()}
    nlp.to_disk(tmp_path / "pipe")
    # The folder is the float32 Hugging Face checkpoint; the setting sits beside it.
    import json

    import safetensors.torch

    encoder_dir = tmp_path / "pipe" / "ctx_bert" / "encoder"
    meta = json.loads((encoder_dir / "backend.json").read_text())
    assert meta["quantize"] == "int8"
    saved = safetensors.torch.load_file(str(encoder_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    loaded = spacy.load(tmp_path / "pipe")
    backend = loaded.get_pipe("ctx_bert").backend
    assert backend.quantize == "int8"
    assert all(torch.equal(fp32_weights[k], v) for k, v in backend.state_dict().items())
    np.testing.assert_allclose(_layers(loaded), before, rtol=1e-5, atol=1e-5)
    # And to_bytes/from_bytes (nlp copies). The receiving pipeline's config decides the
    # runtime settings, as spacy.load's config does: int8 when it asks for int8 ...
    again = _nlp(tiny_bert_dir, quantize="int8").from_bytes(nlp.to_bytes())
    assert again.get_pipe("ctx_bert").backend.quantize == "int8"
    np.testing.assert_allclose(_layers(again), before, rtol=1e-5, atol=1e-5)
    # ... and float32 when it does not (same weights).
    plain = _nlp(tiny_bert_dir).from_bytes(nlp.to_bytes())
    assert plain.get_pipe("ctx_bert").backend.quantize is None
    np.testing.assert_allclose(_layers(plain), _layers(_nlp(tiny_bert_dir)), rtol=1e-6, atol=1e-6)


def test_switching_quantize_on_a_loaded_pipeline(tiny_bert_dir):
    nlp = _nlp(tiny_bert_dir)
    ref = _layers(nlp)
    backend = nlp.get_pipe("ctx_bert").backend
    backend.quantize = "int8"
    low = _layers(nlp)
    assert not np.allclose(low[1:], ref[1:], atol=1e-6)
    backend.quantize = None
    assert backend._int8.module is None
    np.testing.assert_allclose(_layers(nlp), ref, rtol=1e-6, atol=1e-6)


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["int4", "INT8", "fp16"])
def test_bad_quantize_value_is_a_config_error(tiny_bert_dir, value):
    nlp = spacy.blank("en")
    with pytest.raises(ConfigError, match="quantize"):
        nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir), "quantize": value}})
    backend = _nlp(tiny_bert_dir).get_pipe("ctx_bert").backend
    with pytest.raises(ConfigError, match="quantize"):
        backend.quantize = value


def test_int8_on_a_cuda_device_is_a_config_error(tiny_bert_dir):
    nlp = spacy.blank("en")
    with pytest.raises(ConfigError, match="CPU only"):
        nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir), "quantize": "int8",
                                                   "device": "cuda:0"}})


def test_int8_on_a_backend_moved_to_another_device_is_a_config_error(tiny_bert_dir):
    nlp = _nlp(tiny_bert_dir, quantize="int8")
    backend = nlp.get_pipe("ctx_bert").backend
    backend.to("meta")  # stands in for CUDA: any non-CPU device
    with pytest.raises(ConfigError, match="CPU only"):
        backend._forward_encoder()


def test_int8_with_explicit_bf16_is_a_config_error(tiny_bert_dir):
    nlp = _nlp(tiny_bert_dir, quantize="int8", mixed_precision="bf16")
    with pytest.raises(ConfigError, match="mixed_precision"):
        list(nlp.pipe(TEXTS[:1]))


def test_int8_with_auto_runs_in_float32_around_int8(tiny_bert_dir):
    ref = _layers(_nlp(tiny_bert_dir, quantize="int8"))
    nlp = _nlp(tiny_bert_dir, quantize="int8", mixed_precision="auto")
    assert nlp.get_pipe("ctx_bert").backend.autocast_dtype() is None
    np.testing.assert_allclose(_layers(nlp), ref, rtol=1e-6, atol=1e-6)


def test_int8_refuses_fine_tuning(tiny_bert_dir):
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir), "quantize": "int8"},
                                     "frozen": False, "store": "none", "vector_hooks": False})
    nlp.add_pipe("textcat", config={"model": {
        "@architectures": "spacy.TextCatReduce.v1", "exclusive_classes": True, "use_reduce_first": False,
        "use_reduce_last": False, "use_reduce_max": False, "use_reduce_mean": True,
        "tok2vec": {"@architectures": "spacy_ctx.LastLayerListener.v1", "upstream": "ctx_bert"}}})
    examples = [Example.from_dict(nlp.make_doc(t), {"cats": {"A": i % 2 == 0, "B": i % 2 == 1}})
                for i, t in enumerate(TEXTS)]
    optimizer = nlp.initialize(lambda: examples)
    with pytest.raises(ConfigError, match="frozen = true"):
        nlp.update(examples, sgd=optimizer)


# -- spacy train with a frozen int8 encoder ---------------------------------------------------------
def _write_corpus(path: Path) -> Path:
    nlp = spacy.blank("en")
    db = DocBin()
    for text, ents in [("Apple is buying a startup in London", [(0, 5, "ORG"), (29, 35, "GPE")]),
                       ("We sat on the river bank in Paris today", [(28, 33, "GPE")]),
                       ("The company said rates fell in New York", [(31, 39, "GPE")]),
                       ("I said hello to the world", [])] * 2:
        doc = nlp.make_doc(text)
        doc.ents = [doc.char_span(s, e, label=label) for s, e, label in ents]
        db.add(doc)
    db.to_disk(path)
    return path


def test_spacy_train_with_a_frozen_int8_encoder(tiny_bert_dir, tmp_path):
    corpus = str(_write_corpus(tmp_path / "train.spacy"))
    cmd = [sys.executable, "-m", "spacy", "train", str(REPO / "configs" / "ner_bert_frozen.cfg"),
           "--output", str(tmp_path / "out"), "--paths.train", corpus, "--paths.dev", corpus,
           "--paths.encoder", str(tiny_bert_dir), "--components.ctx_bert.model.quantize", "int8",
           "--training.max_steps", "4", "--training.eval_frequency", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    nlp = spacy.load(tmp_path / "out" / "model-last")
    backend = nlp.get_pipe("ctx_bert").backend
    assert backend.quantize == "int8"
    assert nlp.config["components"]["ctx_bert"]["model"]["quantize"] == "int8"
    texts = ["Apple is buying a startup in London", "I said hello to the world"]
    first = [[(e.start, e.end, e.label_) for e in doc.ents] for doc in nlp.pipe(texts)]
    assert backend._int8.module is not None  # the pipeline really ran in int8
    again = spacy.load(tmp_path / "out" / "model-last")
    assert [[(e.start, e.end, e.label_) for e in doc.ents] for doc in again.pipe(texts)] == first
    _benchmark_smoke(tmp_path, tiny_bert_dir, corpus)


def _benchmark_smoke(tmp_path: Path, model_dir: Path, corpus: str) -> None:
    """benchmarks/precision.py on the pipeline just trained and the tiny model."""
    import importlib.util
    import json
    import shutil

    spec = importlib.util.spec_from_file_location("precision_bench", REPO / "benchmarks" / "precision.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "training" / "tiny_ner").mkdir(parents=True)
    shutil.copytree(tmp_path / "out" / "model-last", tmp_path / "training" / "tiny_ner" / "model-best")
    (tmp_path / "corpus" / "ner").mkdir(parents=True)
    shutil.copy(corpus, tmp_path / "corpus" / "ner" / "test.spacy")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    results = tmp_path / "results"
    assert bench.main(["all", "--model", str(model_dir), "--corpus", str(texts), "--n-docs", "4",
                       "--rounds", "1", "--warmup", "1", "--pipelines", "tiny_ner",
                       "--training-dir", str(tmp_path / "training"), "--corpus-dir",
                       str(tmp_path / "corpus"), "--output-dir", str(results)]) == 0
    speed = json.loads((results / "precision_speed.json").read_text())
    assert [row["mode"] for row in speed["rows"]] == ["fp32", "bf16", "auto", "int8"]
    assert speed["rows"][0]["cos_min"] == pytest.approx(1.0, abs=1e-6)
    assert speed["rows"][3]["precision"] == "int8" and speed["rows"][1]["precision"] == "bf16"
    accuracy = json.loads((results / "precision_accuracy.json").read_text())
    [row] = accuracy["rows"]
    assert row["task"] == "ner" and set(row["scores"]) == {"fp32", "bf16", "int8"}
    assert row["scores"]["fp32"]["delta_vs_fp32"] == 0.0
