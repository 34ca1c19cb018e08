"""``ctx_bert`` on bad input of its own: broken checkpoint files, invalid window settings.

Everything runs offline on CPU with the tiny random BERT of ``tiny_bert_dir``
(hidden size 32, 2 layers, 64 positions) and broken copies of it. Checkpoint
problems must surface as :class:`~spacy_ctx.errors.CheckpointError` and bad
settings as :class:`~spacy_ctx.errors.ConfigError`, at ``nlp.initialize()`` or
the first call at the latest, with messages that name the file (and key and
shapes), never as an error from deep inside torch.

Bad input that every encoder family meets (unusual texts and words, a missing
or corrupt weights file, invalid component settings) is tested per family in
test_component.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import spacy
import torch
from safetensors.torch import load_file, save_file
from spacy.language import Language

from spacy_ctx.errors import CheckpointError, ConfigError

from .bert_utils import write_tiny_bert
from .families import first_use_raises

MAX_WINDOW = 64 - 2  # max_position_embeddings minus [CLS] and [SEP]
TEXTS = ["Hello world.", "The bank rose by the river bank .", "the company said " * 30]


# --------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------


def make_nlp(path: Path, *, model: Dict | None = None, **component: object) -> Language:
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "ctx_bert",
        config={"model": {"name": str(path), **(model or {})}, "store": "all", **component},
    )
    return nlp


@pytest.fixture(scope="module")
def nlp(tiny_bert_dir: Path) -> Language:
    return make_nlp(tiny_bert_dir)


@pytest.fixture
def ckpt(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may break."""
    return Path(shutil.copytree(tiny_bert_dir, tmp_path / "ckpt"))


def edit_config(path: Path, **changes: object) -> None:
    config_path = path / "config.json"
    config = json.loads(config_path.read_text(encoding="utf8"))
    config.update(changes)
    config_path.write_text(json.dumps(config), encoding="utf8")


# --------------------------------------------------------------------------
# broken checkpoints
# --------------------------------------------------------------------------


def _shapes_in(message: str):
    match = re.search(r"tensor '([^']+)' has shape (\([^)]*\)).*implies (\([^)]*\))", message)
    assert match, f"no key and shapes in {message!r}"
    return match.group(1), match.group(2), match.group(3)


@pytest.mark.parametrize(
    "setting,value,old,new",
    [
        ("hidden_size", 48, 32, 48),
        ("intermediate_size", 128, 64, 128),
        ("max_position_embeddings", 128, 64, 128),
        ("vocab_size", None, None, None),  # vocab_size + 7
    ],
)
def test_config_and_weights_shape_mismatch(ckpt: Path, setting: str, value, old, new) -> None:
    weights = ckpt / "model.safetensors"
    state = load_file(str(weights))
    if setting == "vocab_size":
        old = state["embeddings.word_embeddings.weight"].shape[0]
        new = value = old + 7
    edit_config(ckpt, **{setting: value})
    message = first_use_raises(make_nlp(ckpt), CheckpointError, str(weights))[0]
    key, found, expected = _shapes_in(message)
    assert key in state, f"{key!r} is not a key of the file"
    assert found == str(tuple(state[key].shape))
    assert str(old) in found and str(new) in expected
    assert expected == found.replace(str(old), str(new))


@pytest.mark.parametrize("n_layers,needle", [(3, "encoder.layer.2."), (1, "encoder.layer.1.")])
def test_config_and_weights_layer_count_mismatch(ckpt: Path, n_layers: int, needle: str) -> None:
    edit_config(ckpt, num_hidden_layers=n_layers)
    first_use_raises(make_nlp(ckpt), CheckpointError, str(ckpt / "model.safetensors"), needle)


@pytest.mark.parametrize(
    "key",
    [
        "encoder.layer.1.output.dense.weight",
        "embeddings.LayerNorm.bias",
        "encoder.layer.0.attention.self.query.weight",
        "embeddings.word_embeddings.weight",
    ],
)
def test_missing_tensor(ckpt: Path, key: str) -> None:
    weights = ckpt / "model.safetensors"
    state = load_file(str(weights))
    del state[key]
    save_file(state, str(weights))
    first_use_raises(make_nlp(ckpt), CheckpointError, str(weights), key)


def test_pooler_and_position_ids_are_optional(ckpt: Path, nlp: Language) -> None:
    weights = ckpt / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("pooler.")}
    save_file(state, str(weights))
    doc = make_nlp(ckpt)(TEXTS[1])
    np.testing.assert_array_equal(doc._.ctx.layers, nlp(TEXTS[1])._.ctx.layers)


def test_missing_config_json(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    first_use_raises(make_nlp(ckpt), CheckpointError, str(ckpt / "config.json"))


def test_invalid_config_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{not json", encoding="utf8")
    first_use_raises(make_nlp(ckpt), CheckpointError, str(ckpt / "config.json"), "JSON")


def test_missing_tokenizer_files(ckpt: Path) -> None:
    (ckpt / "vocab.txt").unlink()
    first_use_raises(make_nlp(ckpt), CheckpointError, str(ckpt), "vocab.txt", "tokenizer.json")


def test_corrupt_tokenizer_json(ckpt: Path) -> None:
    (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": 42}', encoding="utf8")
    first_use_raises(make_nlp(ckpt), CheckpointError, str(ckpt / "tokenizer.json"))


def test_missing_directory(tmp_path: Path) -> None:
    first_use_raises(make_nlp(tmp_path / "no_such_model"), CheckpointError, "no_such_model")


def _to_pytorch_bin(path: Path) -> Path:
    """Leave ``pytorch_model.bin`` (a torch-saved state dict) as the only weights file."""
    bin_path = path / "pytorch_model.bin"
    safetensors_path = path / "model.safetensors"
    if not bin_path.exists():
        # transformers >= 5 writes safetensors even when asked for the .bin format.
        torch.save(load_file(str(safetensors_path)), str(bin_path))
    safetensors_path.unlink(missing_ok=True)
    return bin_path


def test_pytorch_bin_checkpoint_matches_safetensors(tmp_path: Path, nlp: Language) -> None:
    path = write_tiny_bert(tmp_path / "bin", weights_format="bin", seed=0)
    _to_pytorch_bin(path)
    assert sorted(p.name for p in path.glob("*.bin")) == ["pytorch_model.bin"]
    assert not list(path.glob("*.safetensors"))
    bin_nlp = make_nlp(path)
    # Emoji (flags, skin tones, ZWJ sequences) and a whitespace-only text.
    texts = TEXTS + ["I love 🍕 and 🚀! 👩‍👩‍👧 🇫🇷 👍🏽 😀😀", "   \n\t  \n "]
    for doc, ref in zip(bin_nlp.pipe(texts), nlp.pipe(texts)):
        np.testing.assert_array_equal(doc._.ctx.piece_counts, ref._.ctx.piece_counts)
        np.testing.assert_allclose(doc._.ctx.layers, ref._.ctx.layers, rtol=0, atol=1e-6)


class _Payload:
    """Unpickling this would create a file: a weights_only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("damage", ["pickled_code", "random_bytes", "not_a_dict"])
def test_bad_pytorch_bin(ckpt: Path, tmp_path: Path, damage: str) -> None:
    bin_path = _to_pytorch_bin(ckpt)
    marker = tmp_path / "unpickled"
    if damage == "pickled_code":
        state = torch.load(str(bin_path), weights_only=True)
        state["evil"] = _Payload(marker)
        torch.save(state, str(bin_path))
    elif damage == "random_bytes":
        bin_path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        torch.save([torch.zeros(3)], str(bin_path))
    first_use_raises(make_nlp(ckpt), CheckpointError, str(bin_path))
    assert not marker.exists(), "the checkpoint was unpickled with arbitrary code"


# --------------------------------------------------------------------------
# invalid settings
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model,needles",
    [
        ({"window": MAX_WINDOW + 1}, [str(MAX_WINDOW + 1), str(MAX_WINDOW)]),
        ({"window": 1000}, ["1000", str(MAX_WINDOW)]),
        ({"window": 0}, ["window"]),
        ({"window": 8, "stride": 9}, ["stride"]),
        ({"stride": 0}, ["stride"]),
        ({"overlap": "sideways"}, ["overlap", "sideways"]),
    ],
)
def test_invalid_model_settings_fail_at_first_use(
    tiny_bert_dir: Path, model: Dict, needles: List[str]
) -> None:
    first_use_raises(make_nlp(tiny_bert_dir, model=model), ConfigError, *needles)


def test_largest_window_is_accepted(tiny_bert_dir: Path, nlp: Language) -> None:
    doc = make_nlp(tiny_bert_dir, model={"window": MAX_WINDOW})(TEXTS[2])
    np.testing.assert_array_equal(doc._.ctx.layers, nlp(TEXTS[2])._.ctx.layers)
