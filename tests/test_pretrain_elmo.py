"""ELMo biLM pretraining (issue 9 parts 5-6): the LM head, the hdf5 writer, the
vocabulary, training from raw text, the output folder and evaluate_lm.

Tiny models only (the ``tiny`` preset: LSTM 2 x 64 cells, projection 16, three
char filters) on a small repetitive text; one torch thread.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

from spacy_ctx.encoders.elmo import ElmoBiLM  # noqa: E402
from spacy_ctx.encoders.elmo_checkpoint import load_elmo, write_elmo_weights  # noqa: E402
from spacy_ctx.encoders.elmo_lm import (  # noqa: E402
    ElmoLanguageModel,
    LogUniformSampler,
    full_softmax_loss,
    sampled_softmax_loss,
)
from spacy_ctx.encoders.elmo_options import ElmoOptions  # noqa: E402
from spacy_ctx.errors import CheckpointError, ConfigError  # noqa: E402
from spacy_ctx.pieces.chars import BOS_TOKEN, EOS_TOKEN, elmo_char_ids  # noqa: E402
from spacy_ctx.training.elmo_pretrain import (  # noqa: E402
    ELMO_PRESETS,
    evaluate_lm,
    load_language_model,
    pretrain_elmo,
    read_elmo_settings,
    split_sentences,
)
from spacy_ctx.training.lm_vocab import LmVocab, build_vocab  # noqa: E402

from .elmo_utils import elmo_options, hdf5_shapes, refdata_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUBJECTS = ["The cat", "A dog", "The bird", "My friend", "The teacher", "Her brother"]
VERBS = ["sees", "likes", "finds", "follows", "watches"]
OBJECTS = ["the ball", "a tree", "the house", "some food", "the river", "a car"]
ENDS = ["today.", "again.", "in the park.", "every morning."]
MODEL_FILES = ("options.json", "weights.hdf5", "vocab.txt", "softmax.safetensors", "lm.json")


def make_text(n_docs: int, seed: int) -> str:
    """Documents (one per line) of three template sentences each."""
    rng = random.Random(seed)

    def sentence() -> str:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDS)}"

    return "\n".join(" ".join(sentence() for _ in range(3)) for _ in range(n_docs)) + "\n"


def elmo_config(raw_text: Path, heldout: Path = None, **settings) -> dict:
    pretraining = {
        "objective": "elmo",
        "preset": "tiny",
        "max_steps": 300,
        "eval_frequency": 100,
        "batch_tokens": 256,
        "learn_rate": 0.003,
        "dropout": 0.0,
        "max_sentence_length": 30,
        **settings,
    }
    paths = {"raw_text": str(raw_text), "heldout": None if heldout is None else str(heldout)}
    return {"paths": paths, "pretraining": pretraining}


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("elmo_text")
    train, heldout = folder / "train.txt", folder / "heldout.txt"
    train.write_text(make_text(200, seed=0), encoding="utf-8")
    heldout.write_text(make_text(10, seed=1), encoding="utf-8")
    return train, heldout


@pytest.fixture(scope="module")
def trained(texts, tmp_path_factory, one_torch_thread):
    """A tiny biLM trained for 300 steps (full softmax), and a 1-step run for contrast."""
    train, heldout = texts
    output = tmp_path_factory.mktemp("elmo_run")
    summary = pretrain_elmo(elmo_config(train, heldout), output)
    untrained = tmp_path_factory.mktemp("elmo_run_1_step")
    pretrain_elmo(elmo_config(train, heldout, max_steps=1), untrained)
    return output, summary, untrained


def random_bilm(options: dict, seed: int = 0) -> ElmoBiLM:
    """A random biLM with every parameter (biases included) non-zero, except the
    char embedding's padding row, which stays zero as in training (padding_idx)."""
    torch.manual_seed(seed)
    model = ElmoBiLM(ElmoOptions.from_dict(options))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        model.char_encoder.char_embedding.weight[0] = 0.0
    return model


# --------------------------------------------------------------------------
# Softmax head
# --------------------------------------------------------------------------


def test_sampled_softmax_with_every_class_equals_full_softmax():
    torch.manual_seed(0)
    n, dim, vocab = 12, 8, 30
    hidden, weight, bias = torch.randn(n, dim), torch.randn(vocab, dim), torch.randn(vocab)
    targets = torch.randint(0, vocab, (n,))
    full = full_softmax_loss(hidden, targets, weight, bias)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, reduction="none")
    torch.testing.assert_close(full, reference, rtol=0, atol=1e-6)
    sampled = sampled_softmax_loss(
        hidden, targets, weight, bias, torch.arange(vocab), torch.zeros(vocab), torch.zeros(n)
    )
    torch.testing.assert_close(sampled, full, rtol=0, atol=1e-5)


def test_log_uniform_sampler_statistics():
    vocab, n_samples, draws = 40, 10, 4000
    sampler = LogUniformSampler(vocab, n_samples)
    p = sampler.probabilities(torch.arange(vocab))
    assert abs(float(p.sum()) - 1.0) < 1e-9
    generator = torch.Generator().manual_seed(0)
    included = torch.zeros(vocab)
    for _ in range(draws):
        ids, log_q = sampler.sample(generator)
        assert torch.equal(ids, torch.unique(ids)) and ids.min() >= 0 and ids.max() < vocab
        torch.testing.assert_close(log_q, sampler.log_expected_count(ids))
        included[ids] += 1
    expected = torch.exp(sampler.log_expected_count(torch.arange(vocab)))
    # Binomial standard error of each inclusion frequency; 5 sigma.
    stderr = torch.sqrt(expected * (1 - expected) / draws)
    assert bool(((included / draws - expected).abs() <= 5 * stderr + 1e-3).all())
    assert included[0] > included[-1]  # Zipf: small ids (frequent words) drawn more


def test_sampled_softmax_is_used_above_the_full_softmax_limit_and_trains(texts, tmp_path):
    train, heldout = texts
    summary = pretrain_elmo(
        elmo_config(train, max_steps=20, eval_frequency=20, full_softmax_max_vocab=10, n_samples=12),
        tmp_path,
    )  # no held-out file: a seeded hash of each sentence picks heldout_fraction of them
    assert summary["softmax"] == "sampled"
    assert 0 < summary["n_heldout_sentences"] < 0.15 * summary["n_train_sentences"]
    assert summary["model"].sampler is not None and summary["model"].sampler.n_samples == 12
    options = json.loads((tmp_path / "model-last" / "options.json").read_text())
    assert options["n_negative_samples_batch"] == 12
    assert math.isfinite(summary["last"]["forward_ppl"]) and math.isfinite(summary["last"]["train_loss"])


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    options = ElmoOptions.from_dict(ELMO_PRESETS["tiny"])
    model = ElmoLanguageModel(ElmoBiLM(options), vocab_size=7)
    words = [[BOS_TOKEN, "a", "b", "c", EOS_TOKEN], [BOS_TOKEN, "b", EOS_TOKEN]]
    word_ids = {BOS_TOKEN: 0, EOS_TOKEN: 1, "a": 3, "b": 4, "c": 5}
    char_ids = torch.zeros(2, 5, 50, dtype=torch.long)
    ids = torch.zeros(2, 5, dtype=torch.long)
    for row, sentence in enumerate(words):
        char_ids[row, : len(sentence)] = torch.from_numpy(elmo_char_ids(sentence))
        ids[row, : len(sentence)] = torch.tensor([word_ids[w] for w in sentence])
    lengths = torch.tensor([5, 3])
    embeddings = model.bilm.char_encoder(char_ids.view(-1, 50)).view(2, 5, -1)
    losses = model.losses(embeddings, lengths, ids)
    assert losses.n_predictions == 4 + 2
    losses.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), name


# --------------------------------------------------------------------------
# hdf5 writer
# --------------------------------------------------------------------------


def test_writer_reader_round_trip_is_exact(tmp_path):
    options = elmo_options(proj=8, dim=16)  # with a char projection (filters sum to 28)
    model = random_bilm(options)
    path = write_elmo_weights(model, options, tmp_path / "weights.hdf5")
    (tmp_path / "options.json").write_text(json.dumps(options))
    loaded = load_elmo(tmp_path / "options.json", path)
    for (name, value), (name2, value2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name2 and torch.equal(value, value2), name
    # The layout written down independently in tests/elmo_utils.py.
    with h5py.File(path, "r") as handle:
        found = {}
        handle.visititems(lambda n, o: found.update({n: o.shape}) if isinstance(o, h5py.Dataset) else None)
        assert all(handle[n].dtype == np.float32 for n in found)
    assert found == hdf5_shapes(options)


def test_writer_refuses_options_of_another_model(tmp_path):
    model = random_bilm(elmo_options())
    with pytest.raises(CheckpointError, match="do not describe the model"):
        write_elmo_weights(model, elmo_options(dim=32), tmp_path / "weights.hdf5")
    assert not (tmp_path / "weights.hdf5").exists()


def test_hdf5_layout_matches_the_allennlp_fixture(tmp_path):
    fixture = refdata_dir()
    if fixture is None:
        pytest.skip("the AllenNLP ELMo fixture (../shared/refdata/elmo-allennlp-fixture) is absent")
    options = json.loads((fixture / "options.json").read_text())
    path = write_elmo_weights(random_bilm(options), options, tmp_path / "weights.hdf5")

    def layout(file):
        with h5py.File(file, "r") as handle:
            items = {}
            handle.visititems(
                lambda n, o: items.update({n: (o.shape, o.dtype.str) if isinstance(o, h5py.Dataset) else "group"})
            )
        return items

    assert layout(path) == layout(fixture / "lm_weights.hdf5")


# --------------------------------------------------------------------------
# Vocabulary and sentences
# --------------------------------------------------------------------------


def test_vocab_order_limits_and_file_round_trip(tmp_path):
    sentences = [["b", "a", "a"], ["c", "a", "b", "<S>"], ["d"]]
    vocab = build_vocab(sentences)
    assert vocab.words == ["<S>", "</S>", "<UNK>", "a", "b", "c", "d"]  # ties: first seen
    assert build_vocab(sentences, min_count=2).words == ["<S>", "</S>", "<UNK>", "a", "b"]
    assert build_vocab(sentences, max_size=4).words == ["<S>", "</S>", "<UNK>", "a"]
    assert vocab.id_of("zzz") == vocab.unk_id == 2
    odd = LmVocab([*vocab.words, "x\u2028y", "é"])
    path = odd.to_file(tmp_path)
    assert path.name == "vocab.txt" and LmVocab.from_file(tmp_path).words == odd.words
    with pytest.raises(ConfigError):
        LmVocab(["a", "<S>", "</S>"])


def test_sentences_are_cut_and_spaces_dropped():
    text = "One two three four five.  Six seven.\n\nEight"
    sentences = list(split_sentences([text], "en", max_length=3))
    assert sentences == [["One", "two", "three"], ["four", "five", "."], ["Six", "seven", "."], ["Eight"]]


# --------------------------------------------------------------------------
# Training and output
# --------------------------------------------------------------------------


def heldout_unigram_perplexity(heldout: Path, vocab: LmVocab) -> float:
    """Perplexity of the held-out text under its own unigram distribution (the best
    any unigram model can do), over the forward LM's targets: words and </S>."""
    counts: Counter = Counter()
    for sentence in split_sentences([heldout.read_text()], "en", 30):
        counts.update(vocab.id_of(w) for w in sentence)
        counts[vocab.eos_id] += 1
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return math.exp(entropy)


def test_training_lowers_heldout_perplexity_far_below_unigram(trained, texts):
    output, summary, untrained = trained
    _, heldout = texts
    vocab = LmVocab.from_file(output / "model-last")
    unigram = heldout_unigram_perplexity(heldout, vocab)
    last = summary["last"]
    assert summary["step"] == 300 and summary["softmax"] == "full"
    assert last["forward_ppl"] < 0.5 * unigram, (last, unigram)
    assert last["backward_ppl"] < 0.5 * unigram, (last, unigram)
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [100, 200, 300]
    assert rows[-1]["forward_ppl"] < rows[0]["forward_ppl"]
    assert set(rows[0]) >= {"step", "train_loss", "forward_ppl", "backward_ppl", "words_per_second"}
    for folder in ("model-last", "model-best"):
        assert all((output / folder / name).is_file() for name in MODEL_FILES)
    best = json.loads((output / "model-best" / "lm.json").read_text())
    assert best["step"] == summary["best"]["step"]


def test_evaluate_lm_perplexities_drop_after_training(trained, texts):
    output, summary, untrained = trained
    _, heldout = texts
    after = evaluate_lm(output / "model-last", heldout)
    before = evaluate_lm(untrained / "model-last", heldout)
    for scores in (before, after):
        assert set(scores) == {"forward_ppl", "backward_ppl", "n_tokens"}
        assert math.isfinite(scores["forward_ppl"]) and math.isfinite(scores["backward_ppl"])
    assert after["n_tokens"] == before["n_tokens"] == summary["last"]["heldout_tokens"] > 0
    assert after["forward_ppl"] < 0.5 * before["forward_ppl"]
    assert after["backward_ppl"] < 0.5 * before["backward_ppl"]
    # The files hold what the run measured.
    assert after["forward_ppl"] == pytest.approx(summary["last"]["forward_ppl"], rel=1e-4)
    assert after["backward_ppl"] == pytest.approx(summary["last"]["backward_ppl"], rel=1e-4)


def test_written_model_loads_in_ctx_elmo_with_the_same_activations(trained):
    spacy = pytest.importorskip("spacy")
    output, summary, _ = trained
    model_dir = output / "model-last"
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "ctx_elmo",
        config={"model": {"options": str(model_dir / "options.json"), "weights": str(model_dir / "weights.hdf5")}},
    )
    doc = nlp("The teacher follows a car in the park")
    words = [BOS_TOKEN, *(t.text for t in doc), EOS_TOKEN]
    bilm = summary["model"].bilm
    with torch.no_grad():
        expected = bilm(torch.from_numpy(elmo_char_ids(words))[None], [len(words)])[:, 0, 1:-1]
    layers = doc._.ctx.layers
    assert layers.shape == tuple(expected.shape) == (3, len(doc), 32)
    np.testing.assert_allclose(layers, expected.numpy(), rtol=0, atol=1e-5)
    # The trained layout is the one written down independently of the writer.
    with h5py.File(model_dir / "weights.hdf5", "r") as handle:
        found = {}
        handle.visititems(lambda n, o: found.update({n: o.shape}) if isinstance(o, h5py.Dataset) else None)
    assert found == hdf5_shapes(json.loads((model_dir / "options.json").read_text()))


def test_language_model_folder_round_trip(trained):
    output, summary, _ = trained
    model, vocab, info = load_language_model(output / "model-last")
    trained_model = summary["model"]
    assert len(vocab) == trained_model.vocab_size and info["lang"] == "en"
    for (name, value), (_, value2) in zip(trained_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(value, value2), name


def test_resume_continues_exactly(texts, tmp_path):
    train, heldout = texts
    settings = dict(max_steps=8, eval_frequency=4, checkpoint_frequency=4, dropout=0.1, full_softmax_max_vocab=10,
                    n_samples=12)  # dropout and sampling: the random states must be restored too
    whole = pretrain_elmo(elmo_config(train, heldout, **settings), tmp_path / "whole")
    pretrain_elmo(elmo_config(train, heldout, **{**settings, "max_steps": 4}), tmp_path / "split")
    resumed = pretrain_elmo(elmo_config(train, heldout, **settings), tmp_path / "split", resume=True)
    assert resumed["step"] == 8
    for (name, value), (_, value2) in zip(whole["model"].state_dict().items(), resumed["model"].state_dict().items()):
        assert torch.equal(value, value2), name
    with pytest.raises(ConfigError, match="other settings"):
        pretrain_elmo(elmo_config(train, heldout, **{**settings, "learn_rate": 0.01}), tmp_path / "split", resume=True)


# --------------------------------------------------------------------------
# Settings and bad input
# --------------------------------------------------------------------------


def test_presets_describe_the_published_shapes():
    small = ElmoOptions.from_dict(ELMO_PRESETS["small"])
    assert (small.lstm_dim, small.projection_dim, small.n_filters_total, small.n_highway) == (1024, 128, 2048, 1)
    original = ElmoOptions.from_dict(ELMO_PRESETS["original"])
    assert (original.lstm_dim, original.projection_dim, original.n_highway) == (4096, 512, 2)
    assert ElmoOptions.from_dict(ELMO_PRESETS["medium"]).lstm_dim == 2048


def test_config_file_and_errors(texts, tmp_path):
    train, _ = texts
    from spacy_ctx.training.pretrain_config import load_config

    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "pretrain_elmo.cfg",
        {"paths.raw_text": str(train), "pretraining.preset": "tiny"},
    )
    settings = read_elmo_settings(config)
    assert settings.options == ELMO_PRESETS["tiny"] and settings.raw_text == [train]
    bad = [
        ({"preset": "huge"}, "preset"),
        ({"learn_rate": -1}, "learn_rate"),
        ({"colour": 1}, "unknown keys"),
        ({"options": {"lstm": {"dim": 10**9}}}, "lstm.dim"),
        ({"optimizer": "sgd"}, "optimizer"),
    ]
    for override, message in bad:
        with pytest.raises(ConfigError, match=message):
            read_elmo_settings(elmo_config(train, **override))
    with pytest.raises(ConfigError, match="raw_text"):
        read_elmo_settings({"paths": {"raw_text": str(tmp_path / "missing.txt")}, "pretraining": {}})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError):
        pretrain_elmo(elmo_config(empty), tmp_path / "out")
    assert not (tmp_path / "out" / "model-last").exists()


def test_hostile_raw_text_is_skipped_or_cut_not_a_crash(tmp_path):
    raw = tmp_path / "raw.txt"
    long_line = " ".join(["word"] * 2000)  # 9,999 characters, no sentence end
    raw.write_bytes(b"\xff\xfe not utf-8 \x80\n" + b"A dog sees a tree.\n" + long_line.encode() + b"\n")
    summary = pretrain_elmo(
        elmo_config(raw, max_steps=2, eval_frequency=2, max_chars=1000, heldout_fraction=0.0), tmp_path / "out"
    )
    # The bad line is skipped; the long one is cut into chunks, then into sentences of <= 30 tokens.
    assert summary["step"] == 2 and summary["n_heldout_sentences"] == 0
    assert summary["n_train_sentences"] >= 2000 // 30
    vocab = LmVocab.from_file(tmp_path / "out" / "model-best")
    assert "word" in vocab and "not" not in vocab


def test_adagrad_as_in_bilm_tf_trains(texts, tmp_path):
    train, heldout = texts
    summary = pretrain_elmo(
        elmo_config(train, heldout, optimizer="adagrad", learn_rate=0.2, max_steps=30, eval_frequency=15), tmp_path
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [15, 30]
    assert rows[1]["forward_ppl"] < rows[0]["forward_ppl"] and math.isfinite(summary["last"]["backward_ppl"])
