"""Component settings reach the encoder as arguments, and first loads happen once."""

import threading
import time

import spacy
import torch

from spacy_ctx.backends import bert as bert_backend
from spacy_ctx.thinc_layers.backend_layer import get_backend

from .test_listeners import _examples, _pipeline, _train


def _recorded_calls(monkeypatch):
    """Record (max_batch_tokens, keep_layers, grad enabled) of every backend encode call."""
    calls = []
    original = bert_backend.TransformerBackend.encode_docs

    def recording(self, docs, *, max_batch_tokens, keep_layers=None):
        calls.append((max_batch_tokens, keep_layers, torch.is_grad_enabled()))
        return original(self, docs, max_batch_tokens=max_batch_tokens, keep_layers=keep_layers)

    monkeypatch.setattr(bert_backend.TransformerBackend, "encode_docs", recording)
    return calls


def test_max_batch_tokens_and_layers_are_passed_per_call(tiny_bert_dir, monkeypatch):
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}, "max_batch_tokens": 77})
    calls = _recorded_calls(monkeypatch)
    nlp("A short text")
    assert calls == [(77, [2], False)]  # store="last": only the last of 3 layers
    component = nlp.get_pipe("ctx_bert")
    # Nothing is left behind on the Thinc model for the next call to trip over.
    assert set(component.model.attrs) == {
        "loader", "device", "runtime_settings", "replace_listener", "replace_listener_cfg"
    }
    # The runtime settings are the config's, unchanged by the call.
    assert component.model.attrs["runtime_settings"] == {"mixed_precision": None, "quantize": None}


def test_standalone_copy_keeps_frozen_and_batch_budget(tiny_bert_dir, monkeypatch):
    nlp = _pipeline(tiny_bert_dir, frozen=True, ner=None, textcat="last", max_batch_tokens=99)
    _train(nlp, 1)
    nlp.replace_listeners("ctx_bert", "textcat", ["model.tok2vec"])
    nlp.remove_pipe("ctx_bert")
    tok2vec_cfg = nlp.config["components"]["textcat"]["model"]["tok2vec"]
    assert tok2vec_cfg["frozen"] is True and tok2vec_cfg["max_batch_tokens"] == 99
    calls = _recorded_calls(monkeypatch)
    examples = _examples(nlp)
    before = {k: v.detach().clone() for k, v in _standalone_params(nlp)}
    optimizer = nlp.resume_training()
    nlp.update(examples, sgd=optimizer)
    # Frozen: encoded without autograd, last layer only, with the component's budget.
    assert calls and all(c == (99, [-1], False) for c in calls)
    after = dict(_standalone_params(nlp))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_standalone_copy_of_trainable_encoder_trains(tiny_bert_dir, monkeypatch):
    nlp = _pipeline(tiny_bert_dir, frozen=False, ner=None, textcat="last")
    _train(nlp, 1)
    nlp.replace_listeners("ctx_bert", "textcat", ["model.tok2vec"])
    nlp.remove_pipe("ctx_bert")
    calls = _recorded_calls(monkeypatch)
    before = {k: v.detach().clone() for k, v in _standalone_params(nlp)}
    optimizer = nlp.resume_training()
    nlp.update(_examples(nlp), sgd=optimizer)
    assert calls and all(c[2] for c in calls)  # gradients tracked
    after = dict(_standalone_params(nlp))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _standalone_params(nlp):
    for node in nlp.get_pipe("textcat").model.walk():
        if node.name == "ctx_backend":
            return get_backend(node).named_parameters()
    raise AssertionError("no ctx_backend layer in the standalone textcat model")


def test_concurrent_first_calls_load_the_checkpoint_once(tiny_bert_dir, monkeypatch):
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(tiny_bert_dir)}})
    loads = []
    original = bert_backend.TransformerBackend.from_pretrained.__func__
    barrier = threading.Barrier(4)

    def slow_load(cls, *args, **kwargs):
        loads.append(1)
        time.sleep(0.2)  # widen the window in which a second thread could start loading
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(bert_backend.TransformerBackend, "from_pretrained", classmethod(slow_load))
    errors = []

    def work():
        try:
            barrier.wait()
            nlp("Two threads, one load")
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(loads) == 1
