"""Memory stays flat through fine-tuning (issue 7, 2.10).

Thinc's ``PyTorchShim.finish_update`` replaces every parameter's ``.data`` with a tensor
made from the optimizer's numpy/cupy result, which is itself a view of the previous
``.data``: one more tensor and array per parameter and step stay alive, a chain that is
never freed, and the small blocks it pins fragment the heap (MiniLM: ~8 MB RSS per
step). ``BackendShim.finish_update`` writes the update in place instead.

The slope test runs spaCy's training loop (``benchmarks/train_memory.py``) on a tiny BERT
and counts live torch tensors and Python objects, which unlike RSS do not depend on the
allocator: with the leak they grew by one tensor per encoder parameter and step.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import spacy
import torch
from thinc.api import Adam, PyTorchShim

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_train_memory", ROOT / "benchmarks" / "train_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_memory = _load_benchmark()


def test_live_tensors_and_objects_flat_through_fine_tuning(tiny_bert_dir, tmp_path):
    """~300 steps of ner_bert.cfg (fine-tuned encoder) on a tiny BERT: no growth."""
    nlp, _ = train_memory.build(
        ROOT / "configs" / "ner_bert.cfg",
        tiny_bert_dir,
        tmp_path,
        data="synthetic",
        n_docs=600,
        batch_words=150,
    )
    records = train_memory.measure(nlp, 300, objects_every=20, print_every=0)
    counted = [r for r in records if "torch_tensors" in r]
    assert len(counted) >= 10
    slopes = train_memory.second_half_slopes(records, ["torch_tensors", "py_objects"])
    n_params = sum(1 for _ in nlp.get_pipe("ctx_bert").backend.parameters())
    # The leak added n_params (37) tensors and twice as many objects per step.
    assert abs(slopes["torch_tensors"]) < 0.05, (slopes, [r["torch_tensors"] for r in counted])
    assert abs(slopes["py_objects"]) < 0.1 * n_params, (slopes, [r["py_objects"] for r in counted])


def _tiny_backend_layer(tiny_bert_dir):
    nlp = spacy.blank("en")
    pipe = nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "store": "last"})
    nlp.initialize()
    return nlp, pipe


def _backprop_once(nlp, pipe, text="the bank of the river said hello world"):
    from spacy_ctx.thinc_layers.backend_layer import GradMode, run_backend

    doc = nlp.make_doc(text)
    outputs, backprop = run_backend(pipe.model, [doc], mode=GradMode.TRAIN)
    backprop([torch.ones_like(o.layers) for o in outputs])


def test_backend_shim_update_is_in_place_and_equals_thinc(tiny_bert_dir):
    """Same weights as Thinc's PyTorchShim.finish_update, written into the same storage."""
    nlp, pipe = _tiny_backend_layer(tiny_bert_dir)
    shim = pipe.model.shims[0]
    reference = copy.deepcopy(pipe.backend)
    storages = {name: p.data.data_ptr() for name, p in pipe.backend.named_parameters()}
    ref_shim = PyTorchShim(reference)
    ref_shim.id = shim.id  # the optimizers key their state by (shim id, parameter name)
    ours_opt, ref_opt = Adam(0.01, L2=0.01, grad_clip=1.0), Adam(0.01, L2=0.01, grad_clip=1.0)
    for _ in range(3):
        _backprop_once(nlp, pipe)
        for p_ref, p in zip(reference.parameters(), pipe.backend.parameters()):
            p_ref.grad = None if p.grad is None else p.grad.clone()
        shim.finish_update(ours_opt)
        ref_shim.finish_update(ref_opt)
    for (name, p), p_ref in zip(pipe.backend.named_parameters(), reference.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), p_ref.detach().numpy(), rtol=0, atol=0, err_msg=name)
        assert p.data.data_ptr() == storages[name], name  # updated in place
        assert p.grad is None or not p.grad.any(), name  # gradients zeroed, as Thinc does


def test_malloc_trim_every_n_steps(monkeypatch):
    """The component trims glibc's free memory every N optimizer steps; 0 turns it off."""
    from spacy_ctx.pipeline import allocator

    calls = []
    monkeypatch.setattr(allocator, "_MALLOC_TRIM", lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(allocator, "_steps", 0)
    monkeypatch.setenv(allocator.ENV_VAR, "3")
    assert [allocator.after_training_step() for _ in range(7)] == [False, False, True, False, False, True, False]
    assert calls == [0, 0]
    monkeypatch.setenv(allocator.ENV_VAR, "0")
    assert not any(allocator.after_training_step() for _ in range(10))
    monkeypatch.setenv(allocator.ENV_VAR, "not a number")
    assert allocator.trim_every() == allocator.DEFAULT_EVERY
    monkeypatch.setattr(allocator, "_MALLOC_TRIM", None)  # not glibc: nothing happens
    monkeypatch.setenv(allocator.ENV_VAR, "1")
    assert not allocator.after_training_step()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux-only")
def test_malloc_trim_is_found_on_glibc():
    import platform

    from spacy_ctx.pipeline import allocator

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert allocator._MALLOC_TRIM is not None
    allocator._MALLOC_TRIM(0)
