"""Listeners, training through spaCy, gradient flow, feature cache, replace_listeners."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import spacy
import torch
from spacy.tokens import DocBin
from spacy.training import Example

from spacy_ctx.thinc_layers.scalar_mix import ScalarMix

from .bert_utils import write_tiny_bert
from .elmo_utils import write_random_elmo
from .families import Family

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRAIN = [
    ("Apple is buying a startup in London", [(0, 5, "ORG"), (29, 35, "GPE")], "BIZ"),
    ("We sat on the river bank in Paris today", [(28, 33, "GPE")], "OTHER"),
    ("The company said rates fell in New York", [(31, 39, "GPE")], "BIZ"),
    ("I said hello to the world", [], "OTHER"),
]


def _examples(nlp):
    examples = []
    for text, ents, cat in TRAIN:
        doc = nlp.make_doc(text)
        examples.append(
            Example.from_dict(doc, {"entities": ents, "cats": {"BIZ": cat == "BIZ", "OTHER": cat == "OTHER"}})
        )
    return examples


def _listener(kind, upstream="ctx_bert", **extra):
    if kind == "last":
        return {"@architectures": "spacy_ctx.LastLayerListener.v1", "upstream": upstream, **extra}
    return {"@architectures": "spacy_ctx.ScalarMixListener.v1", "upstream": upstream, **extra}


def _ner(tok2vec):
    return {"model": {"@architectures": "spacy.TransitionBasedParser.v2", "state_type": "ner",
                      "extra_state_tokens": False, "hidden_width": 16, "maxout_pieces": 2,
                      "use_upper": True, "tok2vec": tok2vec}}


def _textcat(tok2vec):
    return {"model": {"@architectures": "spacy.TextCatReduce.v1", "exclusive_classes": True,
                      "use_reduce_first": False, "use_reduce_last": False, "use_reduce_max": False,
                      "use_reduce_mean": True, "tok2vec": tok2vec}}


# A key parameter of the first and of the last encoder layer, per family.
FIRST_AND_LAST_PARAMS = {
    "bert": ("encoder.embeddings.word.weight", "encoder.layers.1.ffn.outer.weight"),
    "elmo": ("bilm.char_encoder.char_embedding.weight", "bilm.lstm.layers.1.input_weight"),
}


def _pipeline(source, *, frozen=False, ner="last", textcat="mix", grad_factor=1.0, **encoder_cfg):
    """An encoder with listening ner/textcat; ``source`` is a Family or a BERT directory."""
    family = source if isinstance(source, Family) else Family("bert", (Path(source),))
    nlp = spacy.blank("en")
    config = {"model": family.model_config(**encoder_cfg.pop("model", {})), "frozen": frozen,
              "store": "none", "vector_hooks": False, **encoder_cfg}
    nlp.add_pipe(family.pipe, config=config)
    if ner:
        nlp.add_pipe("ner", config=_ner(_listener(ner, upstream=family.pipe, grad_factor=grad_factor)))
    if textcat:
        nlp.add_pipe("textcat", config=_textcat(_listener(textcat, upstream=family.pipe, grad_factor=grad_factor)))
    return nlp


def _encoder(nlp):
    return nlp.get_pipe(nlp.pipe_names[0])


def _encoder_params(nlp):
    return _encoder(nlp).backend.named_parameters()


def _snapshot(nlp):
    return {k: v.detach().clone() for k, v in _encoder_params(nlp)}


def _train(nlp, n_steps, seed=0):
    spacy.util.fix_random_seed(seed)
    examples = _examples(nlp)
    optimizer = nlp.initialize(lambda: examples)
    history = []
    for _ in range(n_steps):
        losses = {}
        nlp.update(examples, sgd=optimizer, losses=losses)
        history.append(losses)
    return history


# -- gradient flow ------------------------------------------------------------------------------
def test_trainable_encoder_weights_change(family):
    nlp = _pipeline(family)
    _train(nlp, 1)
    before = _snapshot(nlp)
    _train_more(nlp, 3)
    after = _snapshot(nlp)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    first, last = FIRST_AND_LAST_PARAMS[family.name]
    assert first in changed and last in changed


def test_predictions_after_fine_tuning_use_the_updated_weights(family):
    """After optimizer steps the encoder computes with the new weights: its output equals
    a fresh copy's. (ELMo caches derived inference weights; Thinc's optimizer writes the
    parameters through numpy views, invisible to the caches' version checks, so the
    component must drop them after each step.)"""
    nlp = _pipeline(family, ner=None)
    docs = [nlp.make_doc(text) for text, _, _ in TRAIN]
    spacy.util.fix_random_seed(0)
    examples = _examples(nlp)
    optimizer = nlp.initialize(lambda: examples)
    backend = _encoder(nlp).backend

    def encode(b):
        b.eval()  # nlp.update leaves the module in training mode (dropout)
        with torch.inference_mode():
            return [out.layers.clone() for out in b.encode_docs(docs, max_batch_tokens=4096)]

    before = encode(backend)  # fills the caches
    for _ in range(2):
        nlp.update(examples, sgd=optimizer)
    after = encode(backend)
    fresh = encode(copy.deepcopy(backend))
    for old, new, ref in zip(before, after, fresh):
        assert not torch.allclose(old, new)  # the training steps changed the outputs
        torch.testing.assert_close(new, ref, rtol=0, atol=1e-6)


def _train_more(nlp, n_steps):
    examples = _examples(nlp)
    optimizer = nlp.create_optimizer()
    for _ in range(n_steps):
        nlp.update(examples, sgd=optimizer)


def test_frozen_encoder_is_bit_identical(family):
    nlp = _pipeline(family, frozen=True)
    spacy.util.fix_random_seed(0)
    nlp.initialize(lambda: _examples(nlp))
    before = _snapshot(nlp)
    history = _train(nlp, 5)
    after = _snapshot(nlp)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for _, p in _encoder_params(nlp))
    assert history[-1]["ner"] < history[1]["ner"]  # the heads still learn


def test_grad_factor_zero_builds_no_graph(family):
    nlp = _pipeline(family, grad_factor=0.0)
    _train(nlp, 3)
    assert all(p.grad is None for _, p in _encoder_params(nlp))
    component = _encoder(nlp)
    assert not component._tracks_grads()


def test_gradients_are_summed_from_both_listeners(family):
    """The encoder gradient with two listeners = sum of the single-listener gradients."""
    grads = {}
    for name, kw in {"both": {}, "ner": {"textcat": None}, "textcat": {"ner": None}}.items():
        nlp = _pipeline(family, **kw)
        spacy.util.fix_random_seed(0)
        examples = _examples(nlp)
        nlp.initialize(lambda: examples)
        # Make the task heads' initial gradients non-zero and identical across runs.
        for pipe_name in ("ner", "textcat"):
            if pipe_name in nlp.pipe_names:
                model = nlp.get_pipe(pipe_name).model
                rng = np.random.default_rng(1)
                for node in model.walk():
                    for param in node.param_names:
                        if node.has_param(param):
                            value = node.get_param(param)
                            node.set_param(param, rng.normal(0, 0.1, value.shape).astype("f"))
        nlp.update(examples, sgd=None, drop=0.0)
        param = dict(_encoder_params(nlp))[FIRST_AND_LAST_PARAMS[family.name][1]]
        grads[name] = param.grad.clone()
    torch.testing.assert_close(grads["both"], grads["ner"] + grads["textcat"], atol=1e-5, rtol=1e-4)


# -- one encoder pass, both heads learn ---------------------------------------------------------------
def test_one_encoder_pass_per_update_and_both_heads_learn(family, monkeypatch):
    nlp = _pipeline(family)
    spacy.util.fix_random_seed(0)
    examples = _examples(nlp)
    optimizer = nlp.initialize(lambda: examples)
    backend = _encoder(nlp).backend
    calls = []
    original = backend.encode_docs
    monkeypatch.setattr(backend, "encode_docs", lambda docs, **kw: calls.append(len(docs)) or original(docs, **kw))
    history = []
    for _ in range(50):
        losses = {}
        nlp.update(examples, sgd=optimizer, losses=losses)
        history.append(losses)
    assert calls == [len(examples)] * 50

    def mean(name, steps):
        return float(np.mean([history[i][name] for i in steps]))

    assert mean("ner", range(45, 50)) < 0.5 * mean("ner", range(0, 5))
    # The tiny random ELMo's vectors vary little between texts, so its textcat learns slowly.
    textcat_factor = 0.8 if family.name == "bert" else 0.99
    assert mean("textcat", range(45, 50)) < textcat_factor * mean("textcat", range(0, 5))


def test_batch_mismatch_gives_spacy_error(tiny_bert_dir):
    nlp = _pipeline(tiny_bert_dir, textcat=None)
    examples = _examples(nlp)
    nlp.initialize(lambda: examples)
    nlp.get_pipe("ctx_bert").update(examples[:2])
    ner = nlp.get_pipe("ner")
    with pytest.raises(ValueError, match="Mismatched IDs"):
        ner.update(examples[2:])


# -- frozen encoders, feature cache ------------------------------------------------------------
def test_feature_cache_hit_on_second_epoch_with_identical_outputs(family, monkeypatch):
    nlp = _pipeline(family, frozen=True)
    examples = _examples(nlp)
    nlp.initialize(lambda: examples)
    component = _encoder(nlp)
    cache = component.feature_cache
    cache.clear()
    hits = cache.hits
    docs = [eg.predicted for eg in examples]
    first = component._encode_without_grads(docs, None)
    assert cache.hits == hits and len(cache) == len(docs)
    monkeypatch.setattr(component.backend, "encode_docs", lambda *a, **k: pytest.fail("encoder ran on epoch 2"))
    second = component._encode_without_grads([eg.predicted for eg in _examples(nlp)], None)
    assert cache.hits == hits + len(docs)
    for a, b in zip(first, second):
        assert torch.equal(a.layers, b.layers)
        np.testing.assert_array_equal(a.piece_counts, b.piece_counts)


def test_feature_cache_off_switch_and_bound(tiny_bert_dir):
    nlp = _pipeline(tiny_bert_dir, frozen=True, feature_cache_mb=0)
    _train(nlp, 2)
    assert len(nlp.get_pipe("ctx_bert").feature_cache) == 0
    nlp = _pipeline(tiny_bert_dir, frozen=True, feature_cache_mb=0.001)  # ~1 KB: evicts
    _train(nlp, 2)
    cache = nlp.get_pipe("ctx_bert").feature_cache
    assert cache.n_bytes <= cache.max_bytes


# -- replace_listeners ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["last", "mix"])
def test_replace_listeners_predicts_the_same(family, tmp_path, kind):
    nlp = _pipeline(family, ner=None, textcat=kind)
    _train(nlp, 3)
    text = "Apple is buying a startup in London"
    expected = nlp(text).cats
    nlp.replace_listeners(family.pipe, "textcat", ["model.tok2vec"])
    assert nlp.get_pipe(family.pipe).listening_components == []
    nlp.remove_pipe(family.pipe)
    got = nlp(text).cats
    assert got == pytest.approx(expected, abs=1e-5)
    assert nlp.config["components"]["textcat"]["model"]["tok2vec"]["@architectures"] == "spacy_ctx.StandaloneEncoder.v1"
    nlp.to_disk(tmp_path / "standalone")
    reloaded = spacy.load(tmp_path / "standalone")
    assert reloaded(text).cats == pytest.approx(expected, abs=1e-5)


# -- scalar mix maths ---------------------------------------------------------------------------
@pytest.mark.parametrize("layer_norm", [False, True])
def test_scalar_mix_gradients_match_finite_differences(layer_norm):
    mix = ScalarMix(3, layer_norm=layer_norm)
    mix.initialize()
    rng = np.random.default_rng(0)
    mix.set_param("weights", rng.normal(size=3).astype("f"))
    mix.set_param("gamma", np.array([1.3], dtype="f"))
    Xs = [rng.normal(size=(3, n, 4)).astype("f") for n in (5, 2)]
    dYs = [rng.normal(size=(n, 4)).astype("f") for n in (5, 2)]

    def loss(params=None, X=None):
        Ys, _ = mix(X if X is not None else Xs, is_train=False)
        return sum(float((Y * dY).sum()) for Y, dY in zip(Ys, dYs))

    _, backprop = mix(Xs, is_train=False)
    dXs = backprop(dYs)
    eps = 1e-2
    for name in ("weights", "gamma"):
        value = mix.get_param(name).copy()
        grad = mix.get_grad(name)
        for i in range(len(value)):
            for sign, store in ((1, "plus"), (-1, "minus")):
                shifted = value.copy()
                shifted[i] += sign * eps
                mix.set_param(name, shifted)
                if store == "plus":
                    plus = loss()
                else:
                    minus = loss()
            mix.set_param(name, value)
            assert grad[i] == pytest.approx((plus - minus) / (2 * eps), rel=2e-2, abs=2e-3)
    X_var = [x.astype("float64") for x in Xs]
    for index in [(0, 1, 2), (2, 4, 0)]:
        plus = [x.copy() for x in X_var]
        minus = [x.copy() for x in X_var]
        plus[0][index] += eps
        minus[0][index] -= eps
        numeric = (loss(X=[p.astype("f") for p in plus]) - loss(X=[m.astype("f") for m in minus])) / (2 * eps)
        assert dXs[0][index] == pytest.approx(numeric, rel=2e-2, abs=2e-3)


def test_scalar_mix_equals_formula():
    mix = ScalarMix(3)
    mix.initialize()
    mix.set_param("weights", np.array([0.1, -1.0, 2.0], dtype="f"))
    mix.set_param("gamma", np.array([0.5], dtype="f"))
    X = np.random.default_rng(1).normal(size=(3, 4, 2)).astype("f")
    [Y], _ = mix([X], is_train=False)
    w = np.exp([0.1, -1.0, 2.0]) / np.exp([0.1, -1.0, 2.0]).sum()
    np.testing.assert_allclose(Y, 0.5 * np.tensordot(w, X, axes=(0, 0)), rtol=1e-5)


# -- spacy train on every ready config -----------------------------------------------------------
def _write_corpus(path: Path) -> Path:
    nlp = spacy.blank("en")
    db = DocBin()
    for text, ents, cat in TRAIN * 2:
        doc = nlp.make_doc(text)
        doc.ents = [doc.char_span(s, e, label=label) for s, e, label in ents]
        doc.cats = {"BIZ": float(cat == "BIZ"), "OTHER": float(cat == "OTHER")}
        db.add(doc)
    db.to_disk(path)
    return path


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_assets")
    bert = write_tiny_bert(root / "bert")
    options, weights = write_random_elmo(root / "elmo")
    return {"corpus": _write_corpus(root / "train.spacy"), "bert": bert, "options": options, "weights": weights}


# The ready spaCy training configs; pretrain_*.cfg are spacy_ctx pretrain configs
# (tests/test_pretrain_mlm.py, tests/test_pretrain_elmo.py).
CONFIGS = sorted(
    p.name for p in (REPO / "configs").glob("*.cfg") if not p.name.startswith("pretrain_")
)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_spacy_train_on_ready_config(config_name, train_assets, tmp_path):
    corpus = str(train_assets["corpus"])
    cmd = [sys.executable, "-m", "spacy", "train", str(REPO / "configs" / config_name),
           "--output", str(tmp_path / "out"), "--paths.train", corpus, "--paths.dev", corpus,
           "--training.max_steps", "6", "--training.eval_frequency", "3"]
    if "elmo" in config_name:
        cmd += ["--paths.elmo_options", str(train_assets["options"]),
                "--paths.elmo_weights", str(train_assets["weights"])]
    else:
        cmd += ["--paths.encoder", str(train_assets["bert"])]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    best = tmp_path / "out" / "model-last"
    nlp = spacy.load(best)
    texts = [t for t, _, _ in TRAIN]
    first = [(d.ents, d.cats) for d in nlp.pipe(texts)]
    again = spacy.load(best)
    second = [(d.ents, d.cats) for d in again.pipe(texts)]
    assert [[(e.start, e.end, e.label_) for e in ents] for ents, _ in first] == [
        [(e.start, e.end, e.label_) for e in ents] for ents, _ in second
    ]
    for (_, cats_a), (_, cats_b) in zip(first, second):
        assert cats_a == pytest.approx(cats_b, abs=1e-6)


def test_encoder_excluded_from_updates_still_feeds_listeners(family):
    """As with spaCy's frozen_components: no encoder update, listeners fall back."""
    nlp = _pipeline(family)
    spacy.util.fix_random_seed(0)
    examples = _examples(nlp)
    optimizer = nlp.initialize(lambda: examples)
    before = _snapshot(nlp)
    history = []
    for _ in range(30):
        losses = {}
        nlp.update(examples, sgd=optimizer, losses=losses, exclude=[family.pipe])
        history.append(losses)
    after = _snapshot(nlp)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert history[-1]["textcat"] < history[0]["textcat"]
    assert history[-1]["ner"] < history[1]["ner"]


def test_encoder_optimizer_setting_is_used(tiny_bert_dir):
    """A separate encoder optimizer with learning rate 0 keeps the encoder fixed."""
    nlp = _pipeline(tiny_bert_dir, optimizer={"@optimizers": "Adam.v1", "learn_rate": 0.0})
    _train(nlp, 1)
    before = _snapshot(nlp)
    history = _train_and_record(nlp, 10)
    after = _snapshot(nlp)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert history[-1]["ctx_bert"] > 0  # gradients did reach the encoder


def _train_and_record(nlp, n_steps):
    examples = _examples(nlp)
    optimizer = nlp.create_optimizer()
    history = []
    for _ in range(n_steps):
        losses = {}
        nlp.update(examples, sgd=optimizer, losses=losses)
        history.append(losses)
    return history


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda(tiny_bert_dir, precision):
    nlp = _pipeline(tiny_bert_dir, model={"name": str(tiny_bert_dir), "device": "cuda:0",
                                          "mixed_precision": precision})
    _train(nlp, 1)
    before = _snapshot(nlp)
    history = _train_and_record(nlp, 5)
    after = _snapshot(nlp)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert np.isfinite(history[-1]["ner"])


def test_encoder_in_annotating_components_still_trains(tiny_bert_dir):
    """Predicting right after the update must not replace the training outputs."""
    nlp = _pipeline(tiny_bert_dir)
    spacy.util.fix_random_seed(0)
    examples = _examples(nlp)
    optimizer = nlp.initialize(lambda: examples)
    nlp.update(examples, sgd=optimizer, annotates=["ctx_bert"])
    before = _snapshot(nlp)
    losses = {}
    for _ in range(3):
        nlp.update(examples, sgd=optimizer, losses=losses, annotates=["ctx_bert"])
    after = _snapshot(nlp)
    assert losses["ctx_bert"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_prediction_runs_the_encoder_once_per_batch(family, monkeypatch):
    """The parser predicts on re-sorted sub-batches; listeners still reuse the encoder pass."""
    nlp = _pipeline(family)
    _train(nlp, 2)
    texts = [t for t, _, _ in TRAIN] * 5 + ["a b c d e f g h i j k l"]
    expected = [(d.ents, d.cats) for d in nlp.pipe(texts, batch_size=8)]
    component = _encoder(nlp)
    backend = component.backend
    calls = []
    original = backend.encode_docs
    monkeypatch.setattr(backend, "encode_docs", lambda docs, **kw: calls.append(len(docs)) or original(docs, **kw))
    got = [(d.ents, d.cats) for d in nlp.pipe(texts, batch_size=8)]
    assert calls == [8, 8, 5]
    assert [[(e.start, e.end, e.label_) for e in a] for a, _ in got] == [
        [(e.start, e.end, e.label_) for e in a] for a, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, abs=1e-6)
    for listener in component.listeners:  # nothing left behind after the last batch
        assert listener.attrs["link"].predicted == {}


def test_feature_cache_never_serves_a_trainable_encoder(family):
    nlp = _pipeline(family)
    _train(nlp, 2)
    component = _encoder(nlp)
    docs = [eg.predicted for eg in _examples(nlp)]
    first = component.encode_for_listener(docs, "last")
    _train_more(nlp, 3)  # the weights change
    second = component.encode_for_listener(docs, "last")
    assert len(component.feature_cache) == 0
    assert not torch.equal(first[0].layers, second[0].layers)
