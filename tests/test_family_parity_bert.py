"""The post-norm BERT-shaped families equal Hugging Face transformers, and load strictly.

For bert, roberta, xlm-roberta, camembert, electra (embeddings narrower than the
layers) and distilbert: a tiny random model saved with ``save_pretrained`` (bare
and with a head) is loaded through :func:`load_encoder`; every layer equals HF's
``output_hidden_states`` on a padded batch, and padding does not change the real
positions. Then the strict loader: another family's checkpoint, unknown model
types, missing, extra and misshapen tensors, unknown heads; our own save format
and the export back to Hugging Face names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from spacy_ctx.encoders.bert import BertEncoder
from spacy_ctx.encoders.checkpoint import OUR_METADATA, export_state_dict, load_encoder, save_encoder
from spacy_ctx.errors import CheckpointError

from .tiny_models import BERT_LIKE, model_class_name, write_tiny_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEADS = {
    "bert": "mlm",
    "roberta": "mlm",
    "xlm-roberta": "mlm",
    "camembert": "mlm",
    "electra": "pretraining",  # the discriminator as published (google/electra-*-discriminator)
    "distilbert": "mlm",
}
PREFIX = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta.", "camembert": "roberta.",
          "electra": "electra.", "distilbert": "distilbert."}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Written on first use: (model_type, head) -> directory."""
    cache = {}

    def get(model_type: str, head=None, **overrides) -> Path:
        key = (model_type, head, tuple(sorted(overrides.items())))
        if key not in cache:
            name = f"{model_type}-{head or 'bare'}-{len(cache)}"
            cache[key] = write_tiny_model(
                model_type, tmp_path_factory.mktemp(name), seed=len(cache) + 1, head=head, **overrides
            )
        return cache[key]

    return get


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a module is built (other than on the meta device, for shapes)."""
    build = BertEncoder.__init__

    def refuse(self, config):
        if torch.get_default_device().type != "meta":
            pytest.fail(f"an encoder was built for a bad checkpoint ({config})")
        build(self, config)

    monkeypatch.setattr(BertEncoder, "__init__", refuse)


def copy(path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(path, tmp_path / "ckpt"))


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def padded_batch(config, pad_id: int):
    """Three rows of random non-special ids, two of them padded on the right."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, config.vocab_size, (3, 20), generator=generator)
    input_ids[input_ids == pad_id] = 3
    mask = torch.ones_like(input_ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    input_ids[mask == 0] = pad_id
    return input_ids, mask


def hf_hidden_states(model_dir: Path, input_ids, mask):
    config = json.loads((model_dir / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    model = model_class.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states


# -- parity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("with_head", [False, True], ids=["bare", "head"])
@pytest.mark.parametrize("model_type", BERT_LIKE)
def test_every_layer_matches_hf_on_a_padded_batch(checkpoints, model_type, with_head):
    model_dir = checkpoints(model_type, HEADS[model_type] if with_head else None)
    family, config, ours = load_encoder(model_dir)
    assert model_type in family.model_types
    input_ids, mask = padded_batch(config, config.pad_token_id)
    with torch.no_grad():
        mine = ours(input_ids, mask)
    theirs = hf_hidden_states(model_dir, input_ids, mask)
    assert len(mine) == len(theirs) == config.num_hidden_layers + 1 == ours.n_layers
    real = mask.bool()
    for layer, (a, b) in enumerate(zip(mine, theirs)):
        assert a.shape == b.shape == (3, 20, config.hidden_size)
        # Padding positions are undefined (and differ between implementations).
        torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0, msg=f"layer {layer}")
    # Padding does not change the real positions: each row alone equals its row in the batch.
    with torch.no_grad():
        for row in range(3):
            n = int(mask[row].sum())
            alone = ours(input_ids[row : row + 1, :n])
            for layer, (a, b) in enumerate(zip(alone, mine)):
                torch.testing.assert_close(a[0], b[row, :n], atol=1e-5, rtol=0, msg=f"row {row} layer {layer}")


def test_distilbert_with_sinusoidal_positions(checkpoints):
    model_dir = checkpoints("distilbert", None, sinusoidal_pos_embds=True)
    _, config, ours = load_encoder(model_dir)
    input_ids, mask = padded_batch(config, 0)
    with torch.no_grad():
        mine = ours(input_ids, mask)
    theirs = hf_hidden_states(model_dir, input_ids, mask)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "model_type,usable", [("bert", 64), ("roberta", 64), ("electra", 64), ("distilbert", 64)]
)
def test_family_facts(checkpoints, model_type, usable):
    family, config, encoder = load_encoder(checkpoints(model_type))
    assert family.usable_positions(config) == usable
    # Common attributes every family config exposes.
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "pad_token_id",
                 "model_type", "max_position_embeddings"):
        assert getattr(config, name) is not None, name
    assert config.raw == json.loads((checkpoints(model_type) / "config.json").read_text())
    assert encoder.width == 64 and encoder.layer_names[0] == "embeddings"
    too_long = torch.full((1, usable + 1), 5)
    with pytest.raises(ValueError, match="windows"):
        encoder(too_long)


def test_roberta_usable_positions_follow_the_pad_offset(checkpoints):
    family, config, _ = load_encoder(checkpoints("roberta"))
    assert config.max_position_embeddings == 66 and config.pad_token_id == 1
    assert family.usable_positions(config) == 64  # 514 -> 512 for roberta-base


# -- strict loading --------------------------------------------------------------------------
def raises(path: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_encoder(path)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


@pytest.mark.parametrize(
    "source,claimed,needles",
    [
        ("roberta", "bert", ["'roberta.'", "'bert'", "'xlm-roberta'"]),
        ("distilbert", "bert", ["'distilbert.'", "'bert'"]),
        ("bert", "roberta", ["'bert.'", "'roberta'"]),
        ("electra", "distilbert", ["'electra.'", "'distilbert'"]),
    ],
)
def test_another_familys_checkpoint_is_a_clear_error(checkpoints, tmp_path, no_build, source, claimed, needles):
    path = copy(checkpoints(source, HEADS[source]), tmp_path)
    edit_config(path, model_type=claimed)
    raises(path, str(path / "model.safetensors"), "different model families", *needles)


def test_bare_checkpoint_of_another_family_is_an_error(checkpoints, tmp_path, no_build):
    path = copy(checkpoints("distilbert"), tmp_path)
    config = json.loads((path / "config.json").read_text())
    edit_config(path, model_type="bert", hidden_size=config["dim"], num_hidden_layers=config["n_layers"],
                num_attention_heads=config["n_heads"], intermediate_size=config["hidden_dim"])
    raises(path, str(path / "model.safetensors"), "transformer.layer.0.")


def test_deberta_keys_with_model_type_bert(checkpoints, tmp_path, no_build):
    path = copy(checkpoints("bert", "mlm"), tmp_path)
    weights = path / "model.safetensors"
    state = {k.replace("bert.", "deberta.", 1): v for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))
    raises(path, str(weights), "'deberta.'", "model_type='bert'")


@pytest.mark.parametrize("model_type", ["gpt7", None, 3])
def test_unknown_model_type_lists_the_supported_ones(checkpoints, tmp_path, no_build, model_type):
    path = copy(checkpoints("bert"), tmp_path)
    edit_config(path, model_type=model_type)
    raises(path, str(path / "config.json"), repr(model_type), *(f"{t}" for t in BERT_LIKE))


@pytest.mark.parametrize(
    "model_type, head, key, value, needles",
    [
        ("roberta", "mlm", "roberta.encoder.layer.1.attention.self.key.weight", None, ["missing"]),
        (
            "electra",
            "pretraining",
            "electra.encoder.layer.0.attention.self.rel_bias.weight",
            torch.zeros(4, 7),
            ["unexpected", "(4, 7)"],
        ),
        (
            "distilbert",
            "mlm",
            "distilbert.transformer.layer.2.ffn.lin1.weight",
            torch.zeros(96, 64),
            ["(96, 64)", "(128, 64)"],
        ),
        ("bert", "mlm", "mystery_head.weight", torch.zeros(3), ["'mystery_head.weight'", "not a known task head"]),
    ],
    ids=["missing_key", "extra_key_inside_the_encoder", "shape_mismatch", "unknown_key_outside_the_prefix"],
)
def test_bad_weight_file(checkpoints, tmp_path, no_build, model_type, head, key, value, needles):
    """A tensor removed (``value`` None), added or replaced in the weight file."""
    path = copy(checkpoints(model_type, head), tmp_path)
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    if value is None:
        del state[key]
    else:
        state[key] = value
    save_file(state, str(weights))
    raises(path, str(weights), key, *needles)


@pytest.mark.parametrize("model_type,head", [("bert", "sequence"), ("roberta", "qa"), ("distilbert", "sequence"),
                                             ("electra", "token")])
def test_generic_task_heads_are_skipped(checkpoints, model_type, head):
    family, _, _ = load_encoder(checkpoints(model_type, head))
    assert family.name in (model_type, "roberta")


def test_sentence_transformers_prefix(checkpoints, tmp_path):
    """``0.auto_model.`` in front of a checkpoint's names (a SentenceTransformer's state)."""
    path = copy(checkpoints("bert"), tmp_path)
    weights = path / "model.safetensors"
    save_file({"0.auto_model." + k: v for k, v in load_file(str(weights)).items()}, str(weights))
    _, _, wrapped = load_encoder(path)
    _, _, plain = load_encoder(checkpoints("bert"))
    for (name, a), (_, b) in zip(wrapped.state_dict().items(), plain.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# -- our save format and the export to Hugging Face names -------------------------------------------
@pytest.mark.parametrize("model_type", ["electra", "distilbert", "xlm-roberta"])
def test_save_encoder_writes_a_hugging_face_checkpoint(checkpoints, tmp_path, model_type):
    """save_encoder writes HF names and the original config.json: the folder loads
    back here bit for bit, and in transformers with no missing or unexpected keys."""
    source = checkpoints(model_type, HEADS[model_type])
    family, config, encoder = load_encoder(source)
    save_encoder(encoder, family, config, tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as handle:
        assert set(handle.keys()) == set(export_state_dict(encoder, family))
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == json.loads(
        (source / "config.json").read_text()
    )
    family2, config2, reloaded = load_encoder(tmp_path / "saved")
    assert family2 == family and config2 == config
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), encoder.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    kwargs = {} if model_type in ("electra", "distilbert") else {"add_pooling_layer": False}
    _, info = transformers.AutoModel.from_pretrained(
        str(tmp_path / "saved"), output_loading_info=True, **kwargs
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_our_names_format_is_read_strictly(checkpoints, tmp_path):
    """Safetensors files marked as holding our own names load as they are, strictly."""
    family, config, encoder = load_encoder(checkpoints("electra"))
    saved = tmp_path / "saved"
    save_encoder(encoder, family, config, saved)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(saved / "model.safetensors"), metadata=OUR_METADATA)
    _, _, reloaded = load_encoder(saved)
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), encoder.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    del state["layers.1.ffn.inner.bias"]
    save_file(state, str(saved / "model.safetensors"), metadata=OUR_METADATA)
    raises(saved, "missing", "'layers.1.ffn.inner.bias'")


@pytest.mark.parametrize("model_type", BERT_LIKE)
def test_export_to_hugging_face_names(checkpoints, model_type):
    model_dir = checkpoints(model_type)
    family, config, encoder = load_encoder(model_dir)
    exported = export_state_dict(encoder, family)
    hf_config = transformers.AutoConfig.from_pretrained(str(model_dir))
    kwargs = {} if model_type in ("electra", "distilbert") else {"add_pooling_layer": False}
    model_class = getattr(transformers, model_class_name(model_type))
    hf = model_class(hf_config, **kwargs).eval()
    result = hf.load_state_dict(exported, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    input_ids, mask = padded_batch(config, config.pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        mine = encoder(input_ids, mask)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-4, rtol=0)
    # With the family's prefix, as a head model's checkpoint would hold it.
    prefixed = export_state_dict(encoder, family, prefix=PREFIX[model_type])
    assert set(prefixed) == {PREFIX[model_type] + k for k in exported}


@pytest.mark.parametrize(
    "model_type,changes,needle",
    [
        ("distilbert", {"dim": 64.5}, "dim"),
        ("distilbert", {"n_heads": 5}, "divisible"),
        ("distilbert", {"activation": "sparkle"}, "activation"),
        ("distilbert", {"sinusoidal_pos_embds": "yes"}, "sinusoidal_pos_embds"),
        ("distilbert", {"n_layers": 10_000}, "n_layers"),
        ("electra", {"embedding_size": 0}, "embedding_size"),
        ("electra", {"embedding_size": 48}, "implies (400, 48)"),
        ("roberta", {"max_position_embeddings": 4}, "max_position_embeddings"),
        ("roberta", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("camembert", {"type_vocab_size": 2}, "(2, 64)"),
    ],
)
def test_bad_family_config_fails_before_building(checkpoints, tmp_path, no_build, model_type, changes, needle):
    path = copy(checkpoints(model_type), tmp_path)
    edit_config(path, **changes)
    message = raises(path, needle)
    assert str(path / "config.json") in message or str(path / "model.safetensors") in message
