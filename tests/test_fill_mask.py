"""fill-mask and next-sentence scoring (issue 9, part 4): equal to transformers'
``pipeline("fill-mask")`` and ``BertForPreTraining`` on the same tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spacy_ctx.encoders.pretraining_checkpoint import load_pretraining_model, save_pretrained
from spacy_ctx.errors import CheckpointError
from spacy_ctx.training.fill_mask import fill_mask, format_fill_mask, next_sentence

from .tiny_models import write_tiny_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MASKS = {"bert": "[MASK]", "roberta": "<mask>"}
TEXTS = [
    "The {m} raised interest rates.",
    "{m} bank raised rates, didn't it?",
    "The {m} raised {m} rates!",  # two masks: one list each
    "The{m} raised interest rates.",
]


@pytest.fixture(scope="module", params=["bert", "roberta"])
def mlm_dir(request, tmp_path_factory) -> Path:
    return write_tiny_model(request.param, tmp_path_factory.mktemp(request.param), head="mlm")


@pytest.fixture(scope="module")
def pretraining_dir(tmp_path_factory) -> Path:
    return write_tiny_model("bert", tmp_path_factory.mktemp("bert_pretraining"), head="pretraining")


def _assert_same(ours, theirs) -> None:
    if theirs and isinstance(theirs[0], dict):  # one mask: the pipeline returns a flat list
        theirs = [theirs]
    assert len(ours) == len(theirs)
    for our_options, their_options in zip(ours, theirs):
        assert [o["token"] for o in our_options] == [t["token"] for t in their_options]
        for o, t in zip(our_options, their_options):
            assert o["token_str"] == t["token_str"]
            assert o["sequence"] == t["sequence"]
            assert abs(o["score"] - t["score"]) <= 1e-4


@pytest.mark.parametrize("template", TEXTS)
def test_fill_mask_equals_pipeline(mlm_dir, template):
    model_type = "roberta" if "roberta" in mlm_dir.name else "bert"
    text = template.format(m=MASKS[model_type])
    pipe = transformers.pipeline("fill-mask", model=str(mlm_dir))
    ours = fill_mask(mlm_dir, text, top_k=7)
    assert len(ours) == text.count(MASKS[model_type])
    assert all(len(options) == 7 for options in ours)
    _assert_same(ours, pipe(text, top_k=7))


def test_fill_mask_after_export(mlm_dir, tmp_path):
    """The folder save_pretrained writes gives the same predictions, here and in HF."""
    out = save_pretrained(load_pretraining_model(mlm_dir), mlm_dir, tmp_path / "export")
    mask = "<mask>" if "roberta" in mlm_dir.name else "[MASK]"
    text = f"The {mask} raised interest rates."
    ours = fill_mask(out, text)
    _assert_same(ours, fill_mask(mlm_dir, text))
    _assert_same(ours, transformers.pipeline("fill-mask", model=str(out))(text))


def test_text_without_mask_is_an_error(mlm_dir):
    with pytest.raises(ValueError, match="has no mask token"):
        fill_mask(mlm_dir, "No mask in this text.")


def test_bare_checkpoint_cannot_fill_masks(tmp_path):
    path = write_tiny_model("bert", tmp_path / "bare")
    with pytest.raises(CheckpointError, match="no language-model head"):
        fill_mask(path, "The [MASK] raised rates.")


def test_top_k_must_be_positive(mlm_dir):
    with pytest.raises(ValueError, match="top_k"):
        fill_mask(mlm_dir, "The [MASK] raised rates.", top_k=0)


def test_format_table(pretraining_dir):
    results = fill_mask(pretraining_dir, "The [MASK] raised [MASK] rates.", top_k=3)
    table = format_fill_mask(results)
    assert "mask 1" in table and "mask 2" in table
    for options in results:
        for option in options:
            assert repr(option["token_str"]) in table
            assert f"{option['score']:.4f}" in table


# -- next sentence ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "first, second",
    [
        ("The bank raised interest rates.", "Markets fell sharply."),
        ("Hello!", "A much longer second sentence, with commas."),
    ],
)
def test_next_sentence_equals_bert_for_pretraining(pretraining_dir, first, second):
    hf = transformers.BertForPreTraining.from_pretrained(str(pretraining_dir), attn_implementation="eager")
    hf.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(pretraining_dir))
    with torch.no_grad():
        logits = hf(**tokenizer(first, second, return_tensors="pt")).seq_relationship_logits
    expected = float(logits.softmax(-1)[0, 0])
    assert next_sentence(pretraining_dir, first, second) == pytest.approx(expected, abs=1e-5)


def test_next_sentence_after_export(pretraining_dir, tmp_path):
    model = load_pretraining_model(pretraining_dir, nsp=True)
    out = save_pretrained(model, pretraining_dir, tmp_path / "export")
    a, b = "The bank raised interest rates.", "Markets fell."
    assert next_sentence(out, a, b) == pytest.approx(next_sentence(pretraining_dir, a, b), abs=1e-6)


def test_next_sentence_without_head_is_an_error(tmp_path):
    path = write_tiny_model("bert", tmp_path / "mlm", head="mlm")
    with pytest.raises(CheckpointError, match="no next-sentence head"):
        next_sentence(path, "A.", "B.")


def test_next_sentence_needs_bert(tmp_path):
    path = write_tiny_model("roberta", tmp_path / "roberta", head="mlm")
    with pytest.raises(CheckpointError, match="needs a BERT checkpoint"):
        next_sentence(path, "A.", "B.")
