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


def _model_bytes(nlp) -> int:
    backend = nlp.get_pipe("ctx_bert").backend
    tensors = list(backend.parameters()) + list(backend.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)


def test_gpu_memory_back_to_model_size_after_pipe(minilm):
    """Docs and listeners keep no GPU tensor: after ``list(nlp.pipe(...))`` and after
    deleting the Docs, the allocated memory is the model's (plus the fixed
    workspaces of the first forward, measured on a warm-up)."""
    nlp = _nlp(minilm, device="cuda:0")
    nlp.initialize()
    list(nlp.pipe(TEXTS[:1]))  # warm-up: cuBLAS/SDPA workspaces
    torch.cuda.synchronize()
    model = _model_bytes(nlp)
    warm = torch.cuda.memory_allocated()
    assert warm - model < 64 << 20, (warm, model)
    docs = list(nlp.pipe(TEXTS * 20, batch_size=8))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - warm < 1 << 20
    assert all(isinstance(d._.ctx.layers, np.ndarray) for d in docs)
    del docs
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - warm < 1 << 20


def test_pinned_non_blocking_transfer():
    from spacy_ctx.backends.batching import host_to_device

    array = np.arange(24, dtype=np.int64).reshape(4, 6)
    tensor = host_to_device(array, torch.device("cuda:0"))
    assert tensor.is_cuda
    np.testing.assert_array_equal(tensor.cpu().numpy(), array)


def test_stop_early_and_oom_back_off_on_cuda(minilm):
    """On the device: a middle layer alone equals that layer of a full pass, and a
    simulated out-of-memory splits the batch (empty_cache runs) with equal results."""
    import warnings

    from spacy_ctx.backends.bert import TransformerBackend

    backend = TransformerBackend.from_pretrained(minilm, name="minilm").to("cuda:0").eval()
    nlp = spacy.blank("en")
    docs = [nlp.make_doc(t) for t in TEXTS]
    with torch.inference_mode():
        full = backend.encode_docs(docs, max_batch_tokens=4096)
        middle = backend.encode_docs(docs, max_batch_tokens=4096, keep_layers=[3])
    for a, b in zip(full, middle):
        torch.testing.assert_close(a.layers[3:4], b.layers, atol=1e-5, rtol=0)
    real_forward = backend.encoder.forward
    state = {"n": 0}

    def forward(ids, mask, **kwargs):
        state["n"] += 1
        if state["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(ids, mask, **kwargs)

    backend.encoder.forward = forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            retried = backend.encode_docs(docs, max_batch_tokens=4096)
    assert len([w for w in caught if "out of memory" in str(w.message)]) == 1
    for a, b in zip(full, retried):
        torch.testing.assert_close(a.layers, b.layers, atol=1e-5, rtol=0)


def test_to_host_from_cuda_in_stored_dtype():
    from spacy_ctx.backends.base import to_host

    tensor = torch.randn(3, 5, 8, device="cuda:0")
    half = to_host(tensor, "float16")
    assert isinstance(half, np.ndarray) and half.dtype == np.float16
    np.testing.assert_array_equal(half, tensor.half().cpu().numpy())
