"""``benchmarks/train_speed.py``: the spacy-transformers config it derives from ours, the
skip row without spacy-transformers, and one short worker run of spaCy's training loop
on a tiny BERT (no speed is asserted)."""

from __future__ import annotations

import argparse
import importlib.util
import random
from pathlib import Path

import pytest
import spacy
from spacy.tokens import Doc, DocBin, Span
from spacy.util import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_train_speed", ROOT / "benchmarks" / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


train_speed = _load_benchmark()


@pytest.mark.parametrize("task, downstream", [("ner", "ner"), ("textcat", "textcat")])
def test_trf_config_swaps_only_the_encoder_and_listener(task, downstream):
    ours = load_config(ROOT / train_speed.TASKS[task])
    trf = train_speed.to_trf_config(ours, "/models/minilm", window=128, stride=96, max_batch_items=4096)
    assert trf["nlp"]["pipeline"] == ["transformer", downstream]
    assert "ctx_bert" not in trf["components"]
    model = trf["components"]["transformer"]["model"]
    assert model["@architectures"] == "spacy-transformers.TransformerModel.v3"
    assert model["name"] == "/models/minilm"
    assert model["get_spans"] == {"@span_getters": "spacy-transformers.strided_spans.v1", "window": 128, "stride": 96}
    tok2vec = trf["components"][downstream]["model"]["tok2vec"]
    assert tok2vec["@architectures"] == "spacy-transformers.TransformerListener.v1"
    assert tok2vec["pooling"] == {"@layers": "reduce_mean.v1"}
    assert tok2vec["grad_factor"] == ours["components"][downstream]["model"]["tok2vec"]["grad_factor"]
    # Everything else (downstream model, batcher, optimizer, dropout) is untouched.
    ours_model = {k: v for k, v in ours["components"][downstream]["model"].items() if k != "tok2vec"}
    trf_model = {k: v for k, v in trf["components"][downstream]["model"].items() if k != "tok2vec"}
    assert trf_model == ours_model
    for section in ("batcher", "optimizer", "dropout", "seed"):
        assert trf["training"][section] == ours["training"][section]
    # the original config is not modified
    assert ours["nlp"]["pipeline"][0] == "ctx_bert"


def _args(**overrides) -> argparse.Namespace:
    values = dict(
        task="ner", system="ctx", steps=2, warmup=1, batch_words=60, seed=0, corpus="", encoder="",
        encoder_lr=1e-4, max_batch_tokens=4096, ctx_max_batch_tokens=None, trf_window=128, trf_stride=96,
        threads=None, cprofile=None,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def test_trf_row_is_skipped_without_spacy_transformers(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        train_speed.importlib.util, "find_spec",
        lambda name, *a: None if name == "spacy_transformers" else real(name, *a),
    )
    assert train_speed.run_worker(_args(system="trf")) == {"skipped": train_speed.TRF_MISSING}
    summary = {"ner": {"ctx": train_speed.summarize([]), "trf": train_speed.summarize([{"skipped": train_speed.TRF_MISSING}])}}
    assert "skipped: spacy-transformers not installed" in train_speed.format_table(summary)


def _write_corpus(folder: Path, n_docs: int = 40) -> None:
    rng = random.Random(0)
    nlp = spacy.blank("en")
    words = "the bank of the river said hello world to new york and london".split()
    docs = []
    for _ in range(n_docs):
        doc = Doc(nlp.vocab, words=[rng.choice(words) for _ in range(rng.randint(3, 12))])
        doc.ents = [Span(doc, 0, 1, label="LOC")]
        docs.append(doc)
    (folder / "ner").mkdir(parents=True)
    DocBin(docs=docs[:30]).to_disk(folder / "ner" / "train.spacy")
    DocBin(docs=docs[30:]).to_disk(folder / "ner" / "dev.spacy")


def test_worker_times_the_steps_after_warmup(tiny_bert_dir, tmp_path):
    _write_corpus(tmp_path)
    result = train_speed.run_worker(_args(corpus=str(tmp_path), encoder=str(tiny_bert_dir), steps=3, warmup=2))
    assert result["pipeline"] == ["ctx_bert", "ner"]
    assert result["steps"] == 3
    assert 0 < result["words"] <= 3 * 60 * 1.2 + 12  # batch_by_words with tolerance 0.2
    assert result["seconds"] > 0 and result["words_per_s"] == pytest.approx(result["words"] / result["seconds"])
    assert result["peak_rss_mb"] > 0
    # a second run draws the same batches (the seed is fixed right before the loop)
    again = train_speed.run_worker(_args(corpus=str(tmp_path), encoder=str(tiny_bert_dir), steps=3, warmup=2))
    assert again["words"] == result["words"]
    summary = {"ner": {"ctx": train_speed.summarize([result, again]), "trf": train_speed.summarize([result])}}
    train_speed.add_ratios(summary)
    assert summary["ner"]["ctx"]["status"] == "ok" and "ratio_vs_trf" in summary["ner"]["ctx"]
    assert "spacy-ctx (ctx_bert)" in train_speed.format_table(summary)
