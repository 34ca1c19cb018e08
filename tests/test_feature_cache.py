"""Feature cache for frozen encoders: float16 storage, byte accounting, memory cap, warnings.

tests/test_listeners.py covers cache hits across epochs and the off switch; these add
the storage format and the bounds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from spacy_ctx.backends import CtxOutput
from spacy_ctx.pipeline import feature_cache as fc
from spacy_ctx.pipeline.feature_cache import FeatureCache, round_output

from .test_listeners import _encoder, _examples, _pipeline, _train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _output(n_layers=3, n_pieces=7, width=5, seed=0, with_index=True) -> CtxOutput:
    gen = torch.Generator().manual_seed(seed)
    layers = torch.randn(n_layers, n_pieces, width, generator=gen)
    counts = np.array([2, 1, 0, 3], dtype=np.int32)
    index = np.arange(6, dtype=np.int64) if with_index else None
    return CtxOutput(layers, counts, index)


@pytest.fixture
def plenty_of_memory(monkeypatch):
    monkeypatch.setattr(fc, "available_memory_bytes", lambda: 1 << 40)


def test_miss_and_hit_give_identical_float16_rounded_outputs(plenty_of_memory):
    cache = FeatureCache(1)
    out = _output()
    used = cache.put(b"k", out)  # what a miss hands to the listeners
    hit = cache.get(b"k", torch.device("cpu"))
    assert hit is not None and hit.layers.dtype == torch.float32
    assert torch.equal(used.layers, hit.layers)
    # Independent computation of the rounding, and it is small.
    expected = torch.from_numpy(out.layers.numpy().astype(np.float16).astype(np.float32))
    assert torch.equal(hit.layers, expected)
    assert torch.allclose(hit.layers, out.layers, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(hit.piece_counts, out.piece_counts)
    np.testing.assert_array_equal(hit.piece_index, out.piece_index)
    assert torch.equal(round_output(out).layers, expected)


def test_byte_accounting_counts_every_array(plenty_of_memory):
    cache = FeatureCache(1)
    a, b = _output(seed=1), _output(n_pieces=11, seed=2, with_index=False)
    cache.put(b"a", a)
    cache.put(b"b", b)
    cache.put(b"a", a)  # already there: not counted twice
    expected = (
        a.layers.numel() * 2 + a.piece_counts.nbytes + a.piece_index.nbytes
        + b.layers.numel() * 2 + b.piece_counts.nbytes
    )
    assert cache.n_bytes == expected
    stored = [entry[0] for entry in cache._entries.values()]
    assert all(t.dtype == torch.float16 for t in stored)
    cache.clear()
    assert cache.n_bytes == 0 and len(cache) == 0


def test_eviction_warns_once_and_keeps_the_bound(plenty_of_memory):
    one = _output()
    size = one.layers.numel() * 2 + one.piece_counts.nbytes + one.piece_index.nbytes
    cache = FeatureCache(2.5 * size / 2**20)  # room for two entries
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(5):
            cache.put(bytes([i]), _output(seed=i))
    messages = [str(w.message) for w in caught if "evicting" in str(w.message)]
    assert len(messages) == 1 and "feature_cache_mb" in messages[0] and "shuffled" in messages[0]
    assert len(cache) == 2 and cache.evictions == 3 and cache.n_bytes <= cache.max_bytes
    assert cache.get(bytes([0]), torch.device("cpu")) is None  # oldest went first
    assert cache.get(bytes([4]), torch.device("cpu")) is not None


def test_memory_cap_warns_once_naming_the_setting(monkeypatch):
    monkeypatch.setattr(fc, "available_memory_bytes", lambda: 100 * 2**20)
    cache = FeatureCache(4096)
    with pytest.warns(UserWarning, match="feature_cache_mb") as caught:
        cache.put(b"a", _output())
        cache.put(b"b", _output(seed=1))
    assert len([w for w in caught if "capped" in str(w.message)]) == 1
    assert cache.max_bytes == int(100 * 2**20 * fc.MEMORY_FRACTION)
    # Unknown available memory: the setting is used as is.
    monkeypatch.setattr(fc, "available_memory_bytes", lambda: None)
    assert FeatureCache(8).max_bytes == 8 * 2**20


def test_available_memory_reader_gives_a_plausible_number():
    available = fc.available_memory_bytes()
    assert available is None or available > 2**20


def test_component_miss_equals_uncached_encoder_rounded(tiny_bert_dir, plenty_of_memory):
    outputs = []
    for mb in (0, 64):
        nlp = _pipeline(tiny_bert_dir, frozen=True, feature_cache_mb=mb)
        nlp.initialize(lambda: _examples(nlp))
        component = _encoder(nlp)
        docs = [eg.predicted for eg in _examples(nlp)]
        raw, _ = component._encode(docs, None, fc_mode())
        outputs.append((raw, component._encode_without_grads(docs, None)))
    (raw0, off), (raw1, on) = outputs
    for r0, r1, a, b in zip(raw0, raw1, off, on):
        assert torch.equal(r0.layers, r1.layers)
        assert torch.equal(a.layers, r0.layers)  # cache off: the encoder's float32 as is
        assert torch.equal(b.layers, round_output(r0).layers)  # cache on: rounded on a miss too
        assert torch.allclose(a.layers, b.layers, rtol=1e-3, atol=1e-3)


def fc_mode():
    from spacy_ctx.pipeline.component import GradMode

    return GradMode.FROZEN


def test_frozen_training_with_cache_still_learns(tiny_bert_dir, plenty_of_memory):
    nlp = _pipeline(tiny_bert_dir, frozen=True, feature_cache_mb=64)
    history = _train(nlp, 12)
    cache = _encoder(nlp).feature_cache
    assert cache.hits > 0 and len(cache) > 0
    # NER's first step has no transition history yet (its loss jumps at step 2), so
    # compare from step 2 on.
    assert history[-1]["ner"] < history[1]["ner"]
    assert history[-1]["textcat"] < history[0]["textcat"]
