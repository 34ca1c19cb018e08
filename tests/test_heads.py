"""Pretraining heads: loading HF checkpoints with their MLM/LM/NSP heads, creating
missing heads, and exporting Hugging Face-format folders that ``transformers``
and ``ctx_bert`` load (issue 9, parts 1 and 3).

Every check compares with ``transformers`` on the same tiny random weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pytest
import spacy
import torch

from spacy_ctx.encoders.checkpoint import load_encoder
from spacy_ctx.encoders.heads import LMHead, NSPHead, word_embedding
from spacy_ctx.encoders.pretraining_checkpoint import load_pretraining_model, save_pretrained
from spacy_ctx.errors import CheckpointError

from .tiny_models import write_tiny_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (id, model_type, writer head, writer overrides, transformers class that loads the export)
CASES = [
    ("bert", "bert", "mlm", {}, "AutoModelForMaskedLM"),
    ("roberta", "roberta", "mlm", {}, "AutoModelForMaskedLM"),
    ("distilbert", "distilbert", "mlm", {}, "AutoModelForMaskedLM"),
    ("electra", "electra", "mlm", {}, "AutoModelForMaskedLM"),
    ("deberta-v2", "deberta-v2", "mlm", {}, "AutoModelForMaskedLM"),
    ("deberta-v2-lm_predictions", "deberta-v2", "mlm", {"legacy": False}, "AutoModelForMaskedLM"),
    ("modernbert", "modernbert", "mlm", {}, "AutoModelForMaskedLM"),
    ("gpt2", "gpt2", "lm", {}, "AutoModelForCausalLM"),
]
SAMPLE = "The bank raised interest rates."


def _batch(vocab_size: int, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of two: 12 pieces, and 8 pieces plus 4 padding."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size - 1, (2, 12), generator=generator)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    ids[1, 8:] = pad_id
    return ids, mask


def _hf(class_name: str, path: Path, **kwargs: Any):
    cls = getattr(transformers, class_name)
    try:
        return cls.from_pretrained(str(path), attn_implementation="eager", **kwargs)
    except (ValueError, TypeError):  # a class without the eager switch
        return cls.from_pretrained(str(path), **kwargs)


def _hf_logits(model, ids, mask, types=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    kwargs: Dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        kwargs["token_type_ids"] = types
    with torch.no_grad():
        out = model.eval()(**kwargs)
    if hasattr(out, "prediction_logits"):
        return out.prediction_logits, out.seq_relationship_logits
    return out.logits, None


def _ours(model, ids, mask, types=None):
    with torch.no_grad():
        return model.eval()(ids, mask, types)


def _assert_close_real(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> None:
    """Equal at the real pieces (padding positions are undefined)."""
    real = mask.bool()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)


def _clean(info: Dict[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in info.items() if value}


def _pad_id(model) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


@pytest.fixture(scope="module", params=CASES, ids=[case[0] for case in CASES])
def case(request, tmp_path_factory):
    name, model_type, head, overrides, class_name = request.param
    folder = tmp_path_factory.mktemp(name.replace("-", "_"))
    path = write_tiny_model(model_type, folder, head=head, **overrides)
    return name, path, class_name


# -- heads from checkpoints -----------------------------------------------------------------
def test_head_loaded_equals_hf(case):
    name, path, class_name = case
    model = load_pretraining_model(path)
    assert model.loaded_heads == ["lm"]
    hf = _hf(class_name, path)
    ids, mask = _batch(model.config.vocab_size, _pad_id(model))
    ours, nsp = _ours(model, ids, mask)
    assert nsp is None
    _assert_close_real(ours, _hf_logits(hf, ids, mask)[0], mask)


def test_decoder_is_the_word_embedding(case):
    _, path, _ = case
    model = load_pretraining_model(path)
    embedding = word_embedding(model.encoder)
    assert model.lm_head.decoder.weight is embedding
    # One parameter, counted once; a gradient step on the logits reaches the embeddings.
    assert sum(p is embedding for p in model.parameters()) == 1
    ids, mask = _batch(model.config.vocab_size, _pad_id(model))
    logits, _ = model.train()(ids, mask)
    logits[..., 7].sum().backward()
    assert embedding.grad is not None and embedding.grad[7].abs().sum() > 0


def test_export_loads_in_transformers_with_same_logits(case, tmp_path):
    name, path, class_name = case
    model = load_pretraining_model(path)
    out = save_pretrained(model, path, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    hf, info = _hf(class_name, out, output_loading_info=True)
    assert _clean(info) == {}, info
    assert config["architectures"] == [type(hf).__name__]
    assert (out / "tokenizer.json").is_file()
    ids, mask = _batch(model.config.vocab_size, _pad_id(model))
    _assert_close_real(_ours(model, ids, mask)[0], _hf_logits(hf, ids, mask)[0], mask)
    # And back: our loader reads the export to the same model.
    again = load_pretraining_model(out)
    assert again.loaded_heads == ["lm"]
    _assert_close_real(_ours(again, ids, mask)[0], _ours(model, ids, mask)[0], mask)


def test_ctx_bert_loads_the_export(case, tmp_path):
    _, path, _ = case
    out = save_pretrained(load_pretraining_model(path), path, tmp_path / "export")

    def layers(model_dir: Path) -> np.ndarray:
        nlp = spacy.blank("en")
        nlp.add_pipe("ctx_bert", config={"store": "all", "model": {"name": str(model_dir)}})
        return nlp(SAMPLE)._.ctx.layers

    np.testing.assert_allclose(layers(out), layers(path), atol=1e-6)


# -- new heads ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["bert", "roberta", "modernbert", "gpt2"])
def test_bare_checkpoint_gets_a_new_tied_head(model_type, tmp_path):
    path = write_tiny_model(model_type, tmp_path / "bare")
    model = load_pretraining_model(path, seed=3)
    # GPT-2's LM head is the word embeddings alone: nothing to create.
    assert model.loaded_heads == (["lm"] if model_type == "gpt2" else [])
    head = model.lm_head
    assert isinstance(head, LMHead)
    assert head.decoder.weight is word_embedding(model.encoder)
    if head.dense is not None:  # GPT-2's head is the decoder alone
        assert torch.all(head.norm.weight == 1)
        if head.norm.bias is not None:
            assert torch.all(head.norm.bias == 0)
        assert 0.01 < float(head.dense.weight.detach().std()) < 0.03  # normal(0, 0.02)
    if head.bias is not None:
        assert torch.all(head.bias == 0)
    # The seed decides the new head; the encoder is the checkpoint's.
    same = load_pretraining_model(path, seed=3)
    other = load_pretraining_model(path, seed=4)
    states = (head.state_dict(), same.lm_head.state_dict(), other.lm_head.state_dict())
    for (name, a), b, c in zip(states[0].items(), states[1].values(), states[2].values()):
        assert torch.equal(a, b)
        if name.startswith("dense.") and name.endswith("weight"):
            assert not torch.equal(a, c)
    # The export is a complete HF model with the new head.
    class_name = "AutoModelForCausalLM" if model_type == "gpt2" else "AutoModelForMaskedLM"
    out = save_pretrained(model, path, tmp_path / "export")
    hf, info = _hf(class_name, out, output_loading_info=True)
    assert _clean(info) == {}, info
    ids, mask = _batch(model.config.vocab_size, _pad_id(model))
    _assert_close_real(_ours(model, ids, mask)[0], _hf_logits(hf, ids, mask)[0], mask)


def test_bare_checkpoint_refused_without_create(tmp_path):
    path = write_tiny_model("bert", tmp_path / "bare")
    with pytest.raises(CheckpointError, match="no language-model head"):
        load_pretraining_model(path, create_missing=False)


# -- next-sentence prediction -----------------------------------------------------------------
@pytest.fixture(scope="module")
def pretraining_dir(tmp_path_factory) -> Path:
    return write_tiny_model("bert", tmp_path_factory.mktemp("bert_pretraining"), head="pretraining")


def _pair_batch(vocab_size: int):
    ids, mask = _batch(vocab_size, 0)
    types = torch.zeros_like(ids)
    types[0, 6:] = 1
    types[1, 4:8] = 1
    return ids, mask, types


def test_nsp_head_equals_bert_for_pretraining(pretraining_dir, tmp_path):
    model = load_pretraining_model(pretraining_dir, nsp=True)
    assert model.loaded_heads == ["lm", "nsp"]
    assert isinstance(model.nsp_head, NSPHead)
    hf = _hf("BertForPreTraining", pretraining_dir)
    ids, mask, types = _pair_batch(model.config.vocab_size)
    lm, nsp = _ours(model, ids, mask, types)
    ref_lm, ref_nsp = _hf_logits(hf, ids, mask, types)
    _assert_close_real(lm, ref_lm, mask)
    torch.testing.assert_close(nsp, ref_nsp, atol=1e-4, rtol=0)
    # Token types matter: the NSP head sees segment B.
    assert not torch.allclose(_ours(model, ids, mask)[1], nsp)

    out = save_pretrained(model, pretraining_dir, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    hf2, info = _hf("BertForPreTraining", out, output_loading_info=True)
    assert _clean(info) == {}, info
    lm2, nsp2 = _hf_logits(hf2, ids, mask, types)
    _assert_close_real(lm, lm2, mask)
    torch.testing.assert_close(nsp, nsp2, atol=1e-4, rtol=0)


def test_nsp_off_ignores_the_nsp_head(pretraining_dir, tmp_path):
    model = load_pretraining_model(pretraining_dir)
    assert model.nsp_head is None and model.loaded_heads == ["lm"]
    out = save_pretrained(model, pretraining_dir, tmp_path / "export")
    hf, info = _hf("AutoModelForMaskedLM", out, output_loading_info=True)
    assert _clean(info) == {}, info


def test_new_nsp_head_on_mlm_checkpoint(tmp_path):
    path = write_tiny_model("bert", tmp_path / "mlm", head="mlm")
    model = load_pretraining_model(path, nsp=True)
    assert model.loaded_heads == ["lm"]
    assert torch.all(model.nsp_head.pooler.bias == 0)
    out = save_pretrained(model, path, tmp_path / "export")
    hf, info = _hf("BertForPreTraining", out, output_loading_info=True)
    assert _clean(info) == {}, info
    ids, mask, types = _pair_batch(model.config.vocab_size)
    theirs = _hf_logits(hf, ids, mask, types)[1]
    torch.testing.assert_close(_ours(model, ids, mask, types)[1], theirs, atol=1e-4, rtol=0)


def test_nsp_needs_bert(tmp_path):
    path = write_tiny_model("roberta", tmp_path / "roberta", head="mlm")
    with pytest.raises(CheckpointError, match="next-sentence prediction needs a BERT"):
        load_pretraining_model(path, nsp=True)


def test_token_types_refused_by_families_without_them(tmp_path):
    model = load_pretraining_model(write_tiny_model("gpt2", tmp_path / "gpt2", head="lm"))
    ids, mask = _batch(model.config.vocab_size, 0)
    with pytest.raises(ValueError, match="token_type_ids"):
        model(ids, mask, torch.zeros_like(ids))


# -- strict loading ---------------------------------------------------------------------------
def _rewrite(path: Path, edit) -> Path:
    """Apply ``edit(state)`` to the checkpoint's model.safetensors in place."""
    file = path / "model.safetensors"
    state = dict(safetensors_torch.load_file(str(file)))
    edit(state)
    safetensors_torch.save_file(state, str(file), metadata={"format": "pt"})
    return path


@pytest.fixture
def mlm_dir(tmp_path) -> Path:
    return write_tiny_model("bert", tmp_path / "mlm", head="mlm")


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda state: state.pop("cls.predictions.transform.dense.bias"),
            r"model\.safetensors.*missing key\(s\) 'cls\.predictions\.transform\.dense\.bias'",
        ),
        (
            lambda state: state.update({"cls.predictions.bias": torch.zeros(7)}),
            r"'cls\.predictions\.bias' has shape \(7,\) but config\.json implies \(\d+,\)",
        ),
        (
            lambda state: state.update({"cls.predictions.transform.extra.weight": torch.zeros(3)}),
            r"unexpected key\(s\) 'cls\.predictions\.transform\.extra\.weight'",
        ),
        (
            lambda state: state["cls.predictions.transform.dense.weight"][0, 0].fill_(float("nan")),
            "NaN or infinite",
        ),
    ],
    ids=["partial_head", "head_shape_mismatch", "unknown_name_in_head", "nan_in_head"],
)
def test_broken_head_is_an_error(mlm_dir, edit, expected):
    _rewrite(mlm_dir, edit)
    with pytest.raises(CheckpointError, match=expected):
        load_pretraining_model(mlm_dir)


def test_old_checkpoint_with_stored_tied_decoder(mlm_dir):
    """transformers 4 wrote the tied decoder weight and bias; they load (and are
    checked), and the model equals HF's."""

    def edit(state):
        state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()

    _rewrite(mlm_dir, edit)
    model = load_pretraining_model(mlm_dir)
    assert model.loaded_heads == ["lm"]
    hf = _hf("AutoModelForMaskedLM", mlm_dir)
    ids, mask = _batch(model.config.vocab_size, 0)
    _assert_close_real(_ours(model, ids, mask)[0], _hf_logits(hf, ids, mask)[0], mask)

    _rewrite(mlm_dir, lambda s: s.update({"cls.predictions.decoder.weight": torch.zeros(100, 8)}))
    with pytest.raises(CheckpointError, match=r"'cls\.predictions\.decoder\.weight' has shape \(100, 8\)"):
        load_pretraining_model(mlm_dir)


def test_export_from_piece_tokenizer(mlm_dir, tmp_path):
    """A PieceTokenizer instead of a folder: its files are written."""
    from spacy_ctx.pieces.tokenizer import PieceTokenizer

    model = load_pretraining_model(mlm_dir)
    out = save_pretrained(model, PieceTokenizer.from_pretrained_dir(mlm_dir), tmp_path / "export")
    assert (out / "tokenizer.json").is_file()
    assert load_encoder(out).family.name == "bert"


def test_export_without_tokenizer_files_is_an_error(mlm_dir, tmp_path):
    model = load_pretraining_model(mlm_dir)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        save_pretrained(model, tmp_path / "empty", tmp_path / "export")


def test_predict_selects_positions(mlm_dir):
    """``predict`` runs the LM head only where asked: the same logits as the full
    output at those positions."""
    model = load_pretraining_model(mlm_dir).eval()
    ids, mask = _batch(model.config.vocab_size, 0)
    predict = torch.zeros_like(ids, dtype=torch.bool)
    predict[0, [1, 5]] = True
    predict[1, 3] = True
    with torch.no_grad():
        full, _ = model(ids, mask)
        some, _ = model(ids, mask, predict=predict)
    assert some.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(some, full[predict], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="predict must have"):
        model(ids, mask, predict=predict[:, :4])


def test_unknown_head_activation_is_an_error(tmp_path):
    path = write_tiny_model("modernbert", tmp_path / "modernbert", head="mlm")
    config = json.loads((path / "config.json").read_text())
    config["classifier_activation"] = "swoosh"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: cannot build the LM head.*swoosh"):
        load_pretraining_model(path)
