"""CUDA tests: skipped cleanly on machines without a GPU (see conftest)."""

import numpy as np
import pytest
import spacy
import torch

pytestmark = pytest.mark.gpu

TEXTS = [
    "The bank raised interest rates again this quarter.",
    "We sat on the river bank and watched the boats.",
    "word " * 700,  # longer than one window
]


def _vectors(nlp, texts):
    return [doc._.ctx.layers for doc in nlp.pipe(texts)]


def _nlp(model_dir, **model):
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(model_dir), **model}, "store": "all"})
    return nlp


def test_cuda_device_with_cpu_spacy_matches_cpu(minilm):
    cpu = _vectors(_nlp(minilm), TEXTS)
    nlp = _nlp(minilm, device="cuda:0")
    gpu = _vectors(nlp, TEXTS)
    backend = nlp.get_pipe("ctx_bert").model.shims[0]._model
    assert backend.device.type == "cuda"
    for a, b in zip(cpu, gpu):
        assert isinstance(b, np.ndarray)  # stored on the CPU, not as GPU tensors
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_close_to_fp32(minilm, precision):
    fp32 = _vectors(_nlp(minilm, device="cuda:0"), TEXTS[:2])
    low = _vectors(_nlp(minilm, device="cuda:0", mixed_precision=precision), TEXTS[:2])
    for a, b in zip(fp32, low):
        assert b.dtype == np.float32
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-9)
        assert cos.min() > 0.98


def test_require_gpu_moves_encoder(minilm):
    pytest.importorskip("cupy")
    cpu = _vectors(_nlp(minilm), TEXTS[:2])
    spacy.require_gpu()
    try:
        nlp = _nlp(minilm)
        gpu = _vectors(nlp, TEXTS[:2])
        assert nlp.get_pipe("ctx_bert").model.shims[0]._model.device.type == "cuda"
    finally:
        spacy.require_cpu()
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(a, b, atol=2e-3, rtol=0)


def test_no_gpu_memory_kept_by_docs(minilm):
    nlp = _nlp(minilm, device="cuda:0")
    list(nlp.pipe(TEXTS))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    docs = list(nlp.pipe(TEXTS * 10))
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    assert len(docs) == 30
    assert after - before < 1 << 20  # Docs hold numpy arrays only
