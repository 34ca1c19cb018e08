"""Issue 10 part 2 (GPU readiness) on the CPU: stopping after the highest needed
layer, the out-of-memory back-off (simulated), host-to-device transfers, and the
CPU smoke run of ``benchmarks/gpu_check.py``. The CUDA-only checks are in
``tests/test_gpu.py``."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import spacy
import torch

from spacy_ctx.backends.batching import OOM_ERRORS, halved_budget, host_to_device
from spacy_ctx.backends.bert import TransformerBackend
from spacy_ctx.encoders.checkpoint import load_encoder

from .tiny_models import write_tiny_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
MODEL_TYPES = ("bert", "roberta", "distilbert", "electra", "deberta-v2", "modernbert", "gpt2")
TEXTS = [
    "The bank raised rates. We sat on the river bank.",
    "Hello world!",
    "the company said that the startup would buy the bank in new york " * 8,  # several windows
    "A much longer document. It has several sentences, some of them longer than others.",
    "x",
    "",
    "Short one. And then a final sentence with quite a few more words in it than the rest.",
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {t: write_tiny_model(t, tmp_path_factory.mktemp(t.replace("-", "_"))) for t in MODEL_TYPES}


def _batch(vocab_size: int, seed: int = 0):
    """Random ids, right padding of different lengths (one row without padding)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab_size, 90), (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


class _CountCalls:
    """Counts the forward calls of each transformer block."""

    def __init__(self, encoder):
        self.calls = [0] * len(encoder.layers)
        for i, layer in enumerate(encoder.layers):
            layer.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def hook(module, inputs, output):
            self.calls[i] += 1

        return hook


# -- 1. computing no layer above the highest one needed ----------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_stop_early_outputs_identical_and_blocks_skipped(model_dirs, model_type):
    encoder = load_encoder(model_dirs[model_type]).encoder.eval()
    ids, mask = _batch(encoder.config.vocab_size)
    n_all = encoder.n_layers
    with torch.no_grad():
        full = encoder(ids, mask)
        assert len(full) == n_all
        assert all(torch.equal(a, b) for a, b in zip(full, encoder(ids, mask, n_layers=n_all)))
        for n in range(1, n_all):
            counter = _CountCalls(encoder)
            part = encoder(ids, mask, n_layers=n)
            assert len(part) == n
            # Blocks 1..n-1 ran once, the ones above not at all.
            assert counter.calls == [1] * (n - 1) + [0] * (n_all - n)
            for k in range(n):
                # The same operations on the same inputs: bitwise equal, also the
                # last computed block of GPT-2/ModernBERT (raw, before the final norm).
                assert torch.equal(part[k], full[k]), (model_type, n, k)
            for layer in encoder.layers:
                layer._forward_hooks.clear()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_stop_early_matches_hf_hidden_states(model_dirs, model_type):
    """Hugging Face semantics: every hidden state but the model's last is a block's raw
    output; stopping after layer 1 gives HF's hidden_states[1] (GPT-2, ModernBERT: not
    normed by the final norm)."""
    path = model_dirs[model_type]
    encoder = load_encoder(path).encoder.eval()
    hf = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    ids, mask = _batch(encoder.config.vocab_size, seed=1)
    with torch.no_grad():
        ours = encoder(ids, mask, n_layers=2)
        theirs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(ours) == 2
    real = mask.bool()
    for k in range(2):
        diff = (ours[k] - theirs[k]).abs()[real].max().item()
        assert diff <= 1e-4, (model_type, k, diff)
    if model_type in ("gpt2", "modernbert"):
        last = hf.config.num_hidden_layers
        assert last > 1
        # The model's final norm applies to the last entry only.
        with torch.no_grad():
            full = encoder(ids, mask)
        assert (full[last] - theirs[last]).abs()[real].max().item() <= 1e-4


def test_n_layers_out_of_range(model_dirs):
    encoder = load_encoder(model_dirs["bert"]).encoder
    ids, mask = _batch(encoder.config.vocab_size)
    for bad in (0, encoder.n_layers + 1, True, 1.5):
        with pytest.raises(ValueError, match="n_layers"):
            encoder(ids, mask, n_layers=bad)


def _backend(path, **settings) -> TransformerBackend:
    backend = TransformerBackend.from_pretrained(path, name=str(path), **settings)
    return backend.eval()


def _docs(texts=TEXTS):
    nlp = spacy.blank("en")
    return [nlp.make_doc(t) for t in texts]


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_backend_computes_up_to_highest_kept_layer(model_dirs, model_type):
    backend = _backend(model_dirs[model_type], window=16, stride=12)
    docs = _docs()
    with torch.inference_mode():
        full = backend.encode_docs(docs, max_batch_tokens=128)
        counter = _CountCalls(backend.encoder)
        middle = backend.encode_docs(docs, max_batch_tokens=128, keep_layers=[1])
    n_batches = counter.calls[0]
    assert n_batches > 0 and counter.calls[1:] == [0] * (len(counter.calls) - 1)
    for a, b in zip(full, middle):
        assert b.layers.shape[0] == 1
        assert torch.equal(a.layers[1:2], b.layers)
    with torch.inference_mode():
        last = backend.encode_docs(docs, max_batch_tokens=128, keep_layers=[-1, 0])
    for a, b in zip(full, last):
        assert torch.equal(b.layers, a.layers[[-1, 0]])


def test_backend_rejects_layer_out_of_range(model_dirs):
    from spacy_ctx.errors import ConfigError

    backend = _backend(model_dirs["bert"])
    with pytest.raises(ConfigError, match="out of range"):
        backend.encode_docs(_docs(TEXTS[:1]), max_batch_tokens=128, keep_layers=[backend.encoder.n_layers])


# -- 2. out-of-memory back-off -------------------------------------------------------------
def _oom_when(encoder, predicate):
    """Make ``encoder.forward`` raise CUDA's out-of-memory error when ``predicate(ids)``;
    returns the list of batch row counts it was called with."""
    real_forward = encoder.forward
    calls = []

    def forward(ids, mask, **kwargs):
        calls.append(ids.shape[0])
        if predicate(ids, len(calls)):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(ids, mask, **kwargs)

    encoder.forward = forward
    return calls


@pytest.mark.parametrize("when", ["first_call", "more_than_2_rows"])
def test_oom_back_off_splits_and_keeps_every_doc(model_dirs, when):
    path = model_dirs["bert"]
    docs = _docs()
    reference_backend = _backend(path, window=16, stride=12)
    with torch.inference_mode():
        reference = reference_backend.encode_docs(docs, max_batch_tokens=512)
    backend = _backend(path, window=16, stride=12)
    raised = []

    def first_call(ids, n):
        raised.append(True)
        return len(raised) == 1

    predicate = first_call if when == "first_call" else (lambda ids, n: ids.shape[0] > 2)
    calls = _oom_when(backend.encoder, predicate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            outputs = backend.encode_docs(docs, max_batch_tokens=512)
    oom_warnings = [w for w in caught if "out of memory" in str(w.message)]
    assert len(oom_warnings) == 1
    assert str(backend.lowered_budget) in str(oom_warnings[0].message)
    assert backend.lowered_budget is not None and backend.lowered_budget < 512
    assert len(calls) > 2  # the failed batch was retried in pieces
    assert len(outputs) == len(docs)
    for doc, ref, out in zip(docs, reference, outputs):
        assert out.layers.shape == ref.layers.shape
        np.testing.assert_array_equal(out.piece_counts, ref.piece_counts)
        torch.testing.assert_close(out.layers, ref.layers, atol=1e-6, rtol=0)
        if len(doc):
            assert out.pool().shape[1] == len(doc)
    # The lower budget is remembered: a later call splits at once, without warning.
    calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            again = backend.encode_docs(docs, max_batch_tokens=512)
    assert not [w for w in caught if "out of memory" in str(w.message)]
    assert backend.batch_budget(512) == backend.lowered_budget
    assert backend.batch_budget(8) == 8
    for ref, out in zip(reference, again):
        torch.testing.assert_close(out.layers, ref.layers, atol=1e-6, rtol=0)


def test_oom_on_a_single_window_reraises_clearly(model_dirs):
    backend = _backend(model_dirs["bert"], window=16, stride=12)
    _oom_when(backend.encoder, lambda ids, n: True)
    with pytest.raises(OOM_ERRORS, match="single window"):
        backend.encode_docs(_docs(TEXTS[:2]), max_batch_tokens=512)


def test_oom_back_off_in_training_mode_keeps_gradients(model_dirs):
    """A retried batch under autograd: outputs still backpropagate into the weights."""
    path = model_dirs["bert"]
    docs = _docs(TEXTS[:4])
    backend = _backend(path, window=16, stride=12).train()
    _oom_when(backend.encoder, lambda ids, n: n == 1)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        outputs = backend.encode_docs(docs, max_batch_tokens=512)
    torch.stack([o.layers.sum() for o in outputs]).sum().backward()
    assert backend.encoder.layers[0].ffn.inner.weight.grad is not None


def test_oom_back_off_through_nlp_pipe(model_dirs):
    """The component path: every Doc gets the vectors of an undisturbed run."""
    path = model_dirs["bert"]

    def make():
        nlp = spacy.blank("en")
        nlp.add_pipe("ctx_bert", config={"model": {"name": str(path), "window": 16, "stride": 12}, "store": "all"})
        nlp.initialize()
        return nlp

    expected = [d._.ctx.layers for d in make().pipe(TEXTS)]
    nlp = make()
    _oom_when(nlp.get_pipe("ctx_bert").backend.encoder, lambda ids, n: ids.shape[0] > 1)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        docs = list(nlp.pipe(TEXTS))
    assert [d.text for d in docs] == TEXTS
    for doc, exp in zip(docs, expected):
        np.testing.assert_allclose(doc._.ctx.layers, exp, atol=1e-6, rtol=0)


def test_halved_budget_floor():
    assert halved_budget(1000, 100) == 500
    assert halved_budget(150, 100) == 100  # never below one window
    assert halved_budget(1, 1) == 1


# -- 3. transfers ---------------------------------------------------------------------------
def test_host_to_device_on_cpu():
    array = np.arange(12, dtype=np.int64).reshape(3, 4)[:, ::2]  # not contiguous
    tensor = host_to_device(array, torch.device("cpu"))
    assert tensor.device.type == "cpu" and not tensor.is_pinned()
    np.testing.assert_array_equal(tensor.numpy(), array)


# -- 4. benchmarks/gpu_check.py smoke run ----------------------------------------------------
def test_gpu_check_cpu_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "(a) GPU tests: skipped: no CUDA" in out
    assert "ctx_bert" in out and "hf_raw" in out and "spacy_transformers" in out
    assert "(c) model FLOP utilisation" in out
    assert "(d) ELMo" in out
    assert (tmp_path / "gpu_check.json").is_file()


def test_to_host_converts_before_copying():
    from spacy_ctx.backends.base import to_host

    tensor = torch.randn(2, 3, 4, dtype=torch.float32)
    same = to_host(tensor, "float32")
    assert same.dtype == np.float32 and np.shares_memory(same, tensor.numpy())
    half = to_host(tensor, np.float16)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, tensor.numpy().astype(np.float16))
    assert to_host(tensor.to(torch.bfloat16)).dtype == np.float32
    with pytest.raises(ValueError, match="float32 or float16"):
        to_host(tensor, "int8")


def test_gpu_check_flop_count_and_peaks(model_dirs):
    """The MFU numerator: the formula's projection and feed-forward FLOPs equal torch's
    own FLOP counter on our encoder (the counter sees attention only where SDPA
    dispatches to a kernel it knows, so both totals are accepted)."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import encoder_flops, peak_tflops

    encoder = load_encoder(model_dirs["bert"]).encoder.eval()
    shapes = [(3, 12), (2, 7)]
    counted = 0
    for rows, length in shapes:
        ids = torch.randint(3, 90, (rows, length))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            encoder(ids, torch.ones_like(ids, dtype=torch.bool))
        counted += counter.get_total_flops()
    config = encoder.config
    attention = 4 * config.hidden_size * config.num_hidden_layers * sum(r * n * n for r, n in shapes)
    total = encoder_flops(config, shapes)
    assert counted in (total, total - attention)
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("NVIDIA L40S") is None
