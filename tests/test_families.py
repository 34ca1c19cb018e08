"""Every transformer family end to end through ``ctx_bert``: token vectors equal
Hugging Face outputs pooled by the documented alignment rule, hostile text,
long documents, serialization, ``spacy train`` and ``info``.

Each family gets a tiny random HF checkpoint with a tokenizer of its own kind
(``tests/tiny_models.py``), written once per module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import spacy
import torch
from spacy.tokens import DocBin

from spacy_ctx.backends.windows import plan_windows
from spacy_ctx.cli import main as cli_main

from .hf_reference import hf_token_vectors
from .tiny_models import write_tiny_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL_TYPES = [
    "bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra",
    "deberta-v2", "modernbert", "gpt2",
]
REPO = Path(__file__).resolve().parents[1]

SAMPLE = "Zürich's café didn't open — 東京 did. The bank raised rates; we sat by the river bank."
HOSTILE = [
    "  leading and trailing spaces  ",
    "multiple   spaces\n\nand newlines\tand\ttabs",
    "nul\x00and control\x07\x1b chars",
    "zero\u200bwidth\u200djoiners and e\u0301 combining marks",
    "emoji 👩‍👩‍👧‍👦 family 🇨🇭 flag 👍🏽",
    "RTL: שלום עולם مرحبا بالعالم",
    "CJK: 東京都は日本の首都です。한국어 텍스트",
    "a" * 5000,
    "see https://example.com/a?b=c&d=e #hashtag @user",
    "\n",
    " ",
    "",
]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def model_dir(request, tmp_path_factory) -> Path:
    return write_tiny_model(request.param, tmp_path_factory.mktemp(request.param.replace("-", "_")))


def _nlp(model_dir: Path, **model) -> spacy.Language:
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"store": "all", "model": {"name": str(model_dir), **model}})
    return nlp


def test_token_vectors_equal_hf_pooled(model_dir):
    nlp = _nlp(model_dir)
    doc = nlp(SAMPLE)
    ours = doc._.ctx.layers
    theirs = hf_token_vectors(model_dir, doc)
    assert ours.shape == (len(theirs), len(doc), theirs[0].shape[1])
    for layer, expected in enumerate(theirs):
        np.testing.assert_allclose(ours[layer], expected, atol=1e-4, err_msg=f"layer {layer}")


@pytest.mark.parametrize("text", HOSTILE, ids=lambda t: repr(t[:12]))
def test_hostile_text(model_dir, text):
    nlp = _nlp(model_dir)
    doc = nlp(text)
    ctx = doc._.ctx
    assert ctx.layers.shape[1] == len(doc)
    assert np.isfinite(ctx.layers).all()
    for token in doc:
        if token.is_space:
            assert not token.has_vector
            assert not ctx.layers[:, token.i].any()


def test_batch_equals_single(model_dir):
    """Padding never changes results: each doc alone vs in a mixed-length batch."""
    nlp = _nlp(model_dir)
    texts = ["Short one.", SAMPLE * 2, "Medium length text about the river bank."]
    batched = [d._.ctx.layers for d in nlp.pipe(texts, batch_size=8)]
    for text, layers in zip(texts, batched):
        np.testing.assert_allclose(nlp(text)._.ctx.layers, layers, atol=1e-5)


def test_long_document_windows_stitch_exactly(model_dir):
    """A document longer than the window: every token finite; each piece equals the
    window it is taken from, encoded alone."""
    nlp = _nlp(model_dir, window=12, stride=6)
    doc = nlp(" ".join([SAMPLE] * 6))
    assert np.isfinite(doc._.ctx.layers).all()
    backend = nlp.get_pipe("ctx_bert").backend
    [(ids, _, _)] = backend.pieces.encode_docs([doc])
    output = backend.encode_docs([doc], max_batch_tokens=4096)[0].layers
    plan = plan_windows(len(ids), 12, 6, "best", causal=backend.causal)
    assert len(plan.spans) > 3
    with torch.no_grad():
        for start, end, weights in plan.windows():
            alone = backend._encode_batch([ids[start:end]])
            n_prefix = len(backend.pieces.prefix_ids)
            for offset in np.flatnonzero(weights == 1):
                for layer in range(output.shape[0]):
                    torch.testing.assert_close(
                        output[layer, start + offset], alone[layer][0, n_prefix + offset],
                        atol=1e-5, rtol=1e-5,
                    )


def test_serialization_round_trip(model_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(model_dir, source)
    nlp = _nlp(source)
    before = nlp(SAMPLE)._.ctx.layers
    nlp.to_disk(tmp_path / "pipeline")
    shutil.rmtree(source)
    again = spacy.load(tmp_path / "pipeline")
    np.testing.assert_allclose(again(SAMPLE)._.ctx.layers, before, atol=1e-6)


def test_info_command(model_dir, capsys):
    assert cli_main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    config = json.loads((model_dir / "config.json").read_text())
    assert info["model_type"] == config["model_type"]
    hf = transformers.AutoModel.from_pretrained(str(model_dir))
    # HF's bare models add a pooler for sequence classification; ctx_bert skips it.
    assert info["parameters"] == sum(
        p.numel() for name, p in hf.named_parameters() if not name.startswith("pooler.")
    )
    assert len(info["layer_names"]) == info["layers"] + 1


def test_info_command_unknown_model_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert cli_main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "t5" in err and "roberta" in err and "modernbert" in err


TRAIN = [
    ("Apple is buying a startup in London.", [(0, 5, "ORG"), (29, 35, "GPE")]),
    ("The bank in Paris raised rates.", [(12, 17, "GPE")]),
    ("Google opened an office in Zürich.", [(0, 6, "ORG"), (27, 33, "GPE")]),
]


@pytest.mark.parametrize("model_type", ["roberta", "deberta-v2", "modernbert"])
def test_spacy_train_smoke(model_type, tmp_path):
    encoder = write_tiny_model(model_type, tmp_path / "encoder")
    nlp = spacy.blank("en")
    db = DocBin()
    for text, ents in TRAIN:
        doc = nlp.make_doc(text)
        doc.ents = [doc.char_span(s, e, label=label) for s, e, label in ents]
        db.add(doc)
    db.to_disk(tmp_path / "train.spacy")
    corpus = str(tmp_path / "train.spacy")
    cmd = [sys.executable, "-m", "spacy", "train", str(REPO / "configs" / "ner_bert.cfg"),
           "--output", str(tmp_path / "out"), "--paths.train", corpus, "--paths.dev", corpus,
           "--paths.encoder", str(encoder), "--training.max_steps", "4",
           "--training.eval_frequency", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trained = spacy.load(tmp_path / "out" / "model-last")
    doc = trained("Apple is buying a startup in London.")
    assert doc._.ctx is None or doc._.ctx.layers.shape[1] == len(doc)
