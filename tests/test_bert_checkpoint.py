"""Strict BERT checkpoint loading (issue 7: 2.2, 2.3, 2.5, 2.8, BERT details).

A bad ``config.json``, weight file, safetensors index, tokenizer or ``backend.json``
must fail with a :class:`CheckpointError` that names the file (and the key)
before the model is built, so nothing of the size the config claims is ever
allocated. Every test here patches ``BertEncoder.__init__`` where building the
model would already be a bug (building it on the ``meta`` device to learn its
shapes is allowed: that allocates nothing).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spacy_ctx.backends import load_backend
from spacy_ctx.backends.bert import TransformerBackend
from spacy_ctx.encoders.bert import BERT, BertConfig, BertEncoder
from spacy_ctx.encoders.checkpoint import load_encoder
from spacy_ctx.encoders.blocks import PostNormLayer
from spacy_ctx.errors import CheckpointError

from .bert_utils import tiny_config

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture
def ckpt(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may break."""
    return Path(shutil.copytree(tiny_bert_dir, tmp_path / "ckpt"))


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if the model gets built."""

    build = BertEncoder.__init__

    def refuse(self, config):
        if torch.get_default_device().type != "meta":  # meta: shapes only, no memory
            pytest.fail(f"BertEncoder was built for a bad checkpoint ({config})")
        build(self, config)

    monkeypatch.setattr(BertEncoder, "__init__", refuse)


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def raises_fast(path: Path, *needles: str) -> str:
    """Load ``path``; expect a CheckpointError mentioning every needle.

    "Fast" means before any real allocation (the ``no_build`` fixture checks that);
    wall time is not asserted, as it depends on the machine's load.
    """
    with pytest.raises(CheckpointError) as info:
        load_encoder(path)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------
# 2.2 config.json validated, then checked against the weight file's header
# --------------------------------------------------------------------------

# (change to config.json, what the message must name besides the file)
CONFIG_CASES = {
    "intermediate_size_200000": ({"intermediate_size": 200_000}, "implies (200000,"),
    "num_hidden_layers_1000": ({"num_hidden_layers": 1000}, "encoder.layer.2."),
    "num_hidden_layers_1e6": ({"num_hidden_layers": 1_000_000}, "num_hidden_layers"),
    "hidden_size_1e9_float": ({"hidden_size": 1e9}, "hidden_size"),
    "hidden_size_1e9_int": ({"hidden_size": 1_000_000_000}, "hidden_size"),
    "hidden_size_4096": ({"hidden_size": 4096}, "4096"),
    "max_position_embeddings_1e8_float": ({"max_position_embeddings": 1e8}, "max_position_embeddings"),
    "max_position_embeddings_1e8_int": ({"max_position_embeddings": 100_000_000}, "max_position_embeddings"),
    "max_position_embeddings_1e6": ({"max_position_embeddings": 1_000_000}, "position_embeddings.weight"),
    "vocab_size_1e7": ({"vocab_size": 10_000_000}, "word_embeddings.weight"),
    "num_attention_heads_0": ({"num_attention_heads": 0}, "num_attention_heads"),
    "num_attention_heads_5": ({"num_attention_heads": 5}, "divisible"),
    "hidden_size_negative": ({"hidden_size": -32}, "hidden_size"),
    "intermediate_size_zero": ({"intermediate_size": 0}, "intermediate_size"),
    "vocab_size_negative": ({"vocab_size": -1}, "vocab_size"),
    "hidden_size_float": ({"hidden_size": 32.5}, "hidden_size"),
    "hidden_size_integral_float": ({"hidden_size": 32.0}, "hidden_size"),
    "hidden_size_string": ({"hidden_size": "32"}, "hidden_size"),
    "hidden_size_bool": ({"hidden_size": True}, "hidden_size"),
    "num_hidden_layers_null": ({"num_hidden_layers": None}, "num_hidden_layers"),
    "type_vocab_size_zero": ({"type_vocab_size": 0}, "type_vocab_size"),
    "pad_token_id_outside_vocab": ({"pad_token_id": 10 ** 6}, "pad_token_id"),
    "hidden_act_unknown": ({"hidden_act": "sparkle"}, "hidden_act"),
    "hidden_act_list": ({"hidden_act": ["gelu"]}, "hidden_act"),
    "layer_norm_eps_negative": ({"layer_norm_eps": -1e-12}, "layer_norm_eps"),
    "layer_norm_eps_string": ({"layer_norm_eps": "tiny"}, "layer_norm_eps"),
    "hidden_dropout_prob_1.5": ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
    "attention_dropout_string": ({"attention_probs_dropout_prob": "0.1"}, "attention_probs_dropout_prob"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_fails_fast_before_building(ckpt: Path, no_build, case: str) -> None:
    changes, needle = CONFIG_CASES[case]
    edit_config(ckpt, **changes)
    message = raises_fast(ckpt, needle)
    # The file that is wrong is named: config.json for bad values, the weight file
    # (whose header disagrees) for values that are valid but not this model's.
    assert str(ckpt / "config.json") in message or str(ckpt / WEIGHTS) in message, message


@pytest.mark.parametrize("content", ["[1, 2, 3]", "null", '"bert"', "42"])
def test_config_that_is_not_an_object(ckpt: Path, no_build, content: str) -> None:
    (ckpt / "config.json").write_text(content)
    raises_fast(ckpt, str(ckpt / "config.json"), "JSON object")


def test_header_check_on_pytorch_bin(ckpt: Path, no_build) -> None:
    """A .bin is memory-mapped for its shapes: the same check, no model built."""
    torch.save(load_file(str(ckpt / WEIGHTS)), str(ckpt / "pytorch_model.bin"))
    (ckpt / WEIGHTS).unlink()
    edit_config(ckpt, intermediate_size=200_000)
    raises_fast(ckpt, str(ckpt / "pytorch_model.bin"), "intermediate.dense", "200000")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_weights_are_refused(ckpt: Path, no_build, dtype) -> None:
    state = load_file(str(ckpt / WEIGHTS))
    key = "encoder.layer.0.output.dense.bias"
    state[key] = state[key].to(dtype)
    save_file(state, str(ckpt / WEIGHTS))
    raises_fast(ckpt, str(ckpt / WEIGHTS), key, "floating point")


def test_family_state_shapes_match_the_module() -> None:
    config = BertConfig.from_dict(tiny_config(50, num_hidden_layers=3))
    module = {name: tuple(t.shape) for name, t in BertEncoder(config).state_dict().items()}
    assert BERT.state_shapes(config) == module
    # Every tensor has a checkpoint name, and the names map back.
    assert all(BERT.to_ours(BERT.to_checkpoint(name)) == name for name in module)


def test_config_round_trip_and_null_defaults() -> None:
    config = BertConfig.from_dict(
        {**tiny_config(50), "pad_token_id": None, "hidden_dropout_prob": None}, source="x.json"
    )
    assert config.pad_token_id == 0 and config.hidden_dropout_prob == 0.1
    assert "source" not in config.to_dict()
    assert BertConfig.from_dict(config.to_dict()) == config
    # The original dict is kept, verbatim, for saving.
    assert config.to_dict()["pad_token_id"] is None and config.raw["architectures"] == ["BertModel"]


# --------------------------------------------------------------------------
# BERT details: dropout from config.json, output blocks built with their width
# --------------------------------------------------------------------------


def test_dropout_probabilities_come_from_config(ckpt: Path) -> None:
    edit_config(ckpt, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.25)
    encoder = load_encoder(ckpt).encoder
    hidden_p = {m.p for m in encoder.modules() if isinstance(m, torch.nn.Dropout)}
    assert hidden_p == {0.0}
    assert {layer.attention.dropout_p for layer in encoder.layers} == {0.25}
    # Saved and reloaded settings keep them.
    assert encoder.config.to_dict()["attention_probs_dropout_prob"] == 0.25


def test_layers_are_the_shared_post_norm_blocks() -> None:
    config = BertConfig(vocab_size=20, hidden_size=16, num_attention_heads=2, intermediate_size=40,
                        num_hidden_layers=1, max_position_embeddings=8)
    layer = BertEncoder(config).layers[0]
    assert isinstance(layer, PostNormLayer)
    assert (layer.attention.out.in_features, layer.ffn.outer.in_features) == (16, 40)
    assert layer.ffn.inner.weight.shape == (40, 16)


def test_tf_layer_norm_names_still_load(ckpt: Path, tiny_bert_dir: Path) -> None:
    """Old TF-converted checkpoints call LayerNorm parameters gamma and beta."""
    state = load_file(str(ckpt / WEIGHTS))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    assert any(k.endswith("gamma") for k in renamed)
    save_file(renamed, str(ckpt / WEIGHTS))
    converted = load_encoder(ckpt).encoder
    original = load_encoder(tiny_bert_dir).encoder
    for (name, a), (_, b) in zip(converted.state_dict().items(), original.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------
# 2.5 non-finite weights
# --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_non_finite_weights_are_refused(ckpt: Path, value: float, fmt: str) -> None:
    state = load_file(str(ckpt / WEIGHTS))
    key = "embeddings.word_embeddings.weight" if fmt == "safetensors" else "encoder.layer.1.intermediate.dense.weight"
    state[key][7, 3] = value
    if fmt == "bin":
        (ckpt / WEIGHTS).unlink()
        path = ckpt / "pytorch_model.bin"
        torch.save(state, str(path))
    else:
        path = ckpt / WEIGHTS
        save_file(state, str(path))
    raises_fast(ckpt, str(path), key, "NaN or infinite")


def test_non_finite_weight_in_a_task_head_is_ignored(tmp_path: Path) -> None:
    """Only the tensors we load must be finite; a head we skip may hold anything."""
    from .bert_utils import write_tiny_bert

    path = write_tiny_bert(tmp_path / "mlm", head="BertForMaskedLM")
    state = load_file(str(path / WEIGHTS))
    head = next(k for k in state if k.startswith("cls.") and state[k].is_floating_point())
    state[head].view(-1)[0] = float("nan")
    save_file(state, str(path / WEIGHTS))
    load_encoder(path)


# --------------------------------------------------------------------------
# 2.8 sharded safetensors: the index is read strictly
# --------------------------------------------------------------------------


def shard(path: Path, names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")) -> dict:
    """Split ``path``'s weights into two shards plus an index; return the index."""
    state = load_file(str(path / WEIGHTS))
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for name, part in zip(names, halves):
        save_file({k: state[k] for k in part}, str(path / name))
        weight_map.update({k: name for k in part})
    (path / WEIGHTS).unlink()
    index = {"metadata": {}, "weight_map": weight_map}
    (path / INDEX).write_text(json.dumps(index))
    return index


def test_sharded_checkpoint_loads_like_one_file(ckpt: Path, tiny_bert_dir: Path) -> None:
    shard(ckpt)
    sharded = load_encoder(ckpt).encoder
    single = load_encoder(tiny_bert_dir).encoder
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_symlinked_shards_are_accepted(ckpt: Path, tmp_path: Path) -> None:
    """The Hugging Face hub cache keeps every file as a symlink into a blobs/ folder."""
    index = shard(ckpt)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for name in set(index["weight_map"].values()):
        (ckpt / name).rename(blobs / name)
        os.symlink(blobs / name, ckpt / name)
    load_encoder(ckpt)


def _retarget_first_shard(ckpt: Path, index: dict, target: str) -> None:
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    (ckpt / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("target", ["self", "other_index"])
def test_index_that_names_an_index_does_not_recurse(ckpt: Path, no_build, target: str) -> None:
    index = shard(ckpt)
    name = INDEX if target == "self" else "other.safetensors.index.json"
    if target == "other_index":
        (ckpt / name).write_text(json.dumps({"weight_map": {"x": INDEX}}))
    _retarget_first_shard(ckpt, index, name)
    raises_fast(ckpt, str(ckpt / INDEX), name, "not a .safetensors shard")


@pytest.mark.parametrize(
    "content,needle",
    [
        ("[1, 2]", "JSON object"),
        ('{"weight_map": ["model.safetensors"]}', "weight_map"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": {}}', "empty"),
        ('{"weight_map": {"a": 5}}', "shard file name"),
        ("{not json", "unreadable"),
    ],
)
def test_malformed_index(ckpt: Path, no_build, content: str, needle: str) -> None:
    (ckpt / WEIGHTS).unlink()
    (ckpt / INDEX).write_text(content)
    raises_fast(ckpt, str(ckpt / INDEX), needle)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "nested_dotdot", "windows_drive"])
def test_shards_must_stay_inside_the_checkpoint_folder(
    ckpt: Path, tmp_path: Path, no_build, kind: str
) -> None:
    index = shard(ckpt)
    outside = tmp_path / "outside"
    outside.mkdir()
    # A real, valid shard outside the folder: following the path would succeed.
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(ckpt / first, outside / first)
    target = {
        "absolute": str(outside / first),
        "dotdot": f"../outside/{first}",
        "nested_dotdot": f"sub/../../outside/{first}",
        "windows_drive": f"C:\\outside\\{first}",
    }[kind]
    _retarget_first_shard(ckpt, index, target)
    raises_fast(ckpt, str(ckpt / INDEX), "outside the checkpoint folder")


def test_missing_shard(ckpt: Path, no_build) -> None:
    index = shard(ckpt)
    _retarget_first_shard(ckpt, index, "model-00009-of-00009.safetensors")
    raises_fast(ckpt, str(ckpt / INDEX), "model-00009-of-00009.safetensors", "not found")


def test_tensor_in_two_shards(ckpt: Path, no_build) -> None:
    index = shard(ckpt)
    first, second = sorted(set(index["weight_map"].values()))
    state = load_file(str(ckpt / second))
    state.update(dict(list(load_file(str(ckpt / first)).items())[:1]))
    save_file(state, str(ckpt / second))
    raises_fast(ckpt, "exactly one shard")


# --------------------------------------------------------------------------
# 2.3 tokenizer ids beyond the embedding table
# --------------------------------------------------------------------------


def _tokenizer_json_with(ckpt: Path, *, word_id: int = None, added_id: int = None) -> Path:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    vocab = [line for line in (ckpt / "vocab.txt").read_text().splitlines() if line]
    ids = {w: i for i, w in enumerate(vocab)}
    if word_id is not None:
        ids["zebra"] = word_id
    tokenizer = Tokenizer(WordPiece(ids, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    path = ckpt / "tokenizer.json"
    tokenizer.save(str(path))
    if added_id is not None:
        data = json.loads(path.read_text())
        data["added_tokens"].append(
            {"id": added_id, "content": "<ent>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
        )
        path.write_text(json.dumps(data))
    (ckpt / "vocab.txt").unlink()
    return path


@pytest.mark.parametrize("where", ["model_vocab", "added_token"])
def test_tokenizer_id_beyond_embedding_table(ckpt: Path, where: str) -> None:
    n_rows = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    if where == "model_vocab":
        path = _tokenizer_json_with(ckpt, word_id=99_999)
    else:
        path = _tokenizer_json_with(ckpt, added_id=99_999)
    with pytest.raises(CheckpointError) as info:
        TransformerBackend.from_pretrained(ckpt, name="test")
    message = str(info.value)
    # (tokenizers renumbers an added token to the next free id: here n_rows, one too many)
    biggest = "99999" if where == "model_vocab" else str(n_rows)
    assert str(path) in message and f"up to {biggest}" in message, message
    assert f"has {n_rows} rows" in message, message


def test_tokenizer_with_largest_id_inside_the_table_loads(ckpt: Path) -> None:
    n_rows = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    _tokenizer_json_with(ckpt, word_id=n_rows - 1)  # a gap in the ids, last row used
    backend = TransformerBackend.from_pretrained(ckpt, name="test")
    assert backend.pieces.max_id == n_rows - 1


def test_pipeline_reports_the_tokenizer_file_at_first_use(ckpt: Path) -> None:
    import spacy

    path = _tokenizer_json_with(ckpt, word_id=99_999)
    nlp = spacy.blank("en")
    nlp.add_pipe("ctx_bert", config={"model": {"name": str(ckpt)}})
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        nlp("a zebra")
    assert path.is_file()


# --------------------------------------------------------------------------
# 2.8 backend.json (and pieces.json) of a saved pipeline
# --------------------------------------------------------------------------


@pytest.fixture
def saved(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "saved"
    TransformerBackend.from_pretrained(tiny_bert_dir, name="tiny").save(path)
    return path


def test_saved_backend_loads(saved: Path) -> None:
    backend = load_backend(saved)
    assert isinstance(backend, TransformerBackend) and backend.name == "tiny"


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda meta: {**meta, "colour": "blue"}, "'colour'"),
        (lambda meta: {**meta, "Window": 10}, "'Window'"),
        (lambda meta: {k: v for k, v in meta.items() if k != "name"}, "'name'"),
        (lambda meta: {**meta, "family": "gpt7"}, "gpt7"),
        (lambda meta: {**meta, "family": ["bert"]}, "family"),
        (lambda meta: [meta], "JSON object"),
    ],
)
def test_bad_backend_json(saved: Path, no_build, edit, needle: str) -> None:
    meta_path = saved / "backend.json"
    meta_path.write_text(json.dumps(edit(json.loads(meta_path.read_text()))))
    with pytest.raises(CheckpointError) as info:
        load_backend(saved)
    assert str(meta_path) in str(info.value) and needle in str(info.value), str(info.value)


def test_unknown_key_in_pieces_json(saved: Path) -> None:
    path = saved / "pieces.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "mask_token": "[MASK]"}))
    with pytest.raises(CheckpointError) as info:
        load_backend(saved)
    assert str(path) in str(info.value) and "mask_token" in str(info.value)
