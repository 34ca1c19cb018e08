"""``ctx_bert`` on bad input: unusual texts, broken checkpoints, invalid settings.

Everything runs offline on CPU with the tiny random BERT of ``tiny_bert_dir``
(hidden size 32, 2 layers, 64 positions) and broken copies of it. Checkpoint
problems must surface as :class:`~spacy_ctx.errors.CheckpointError` and bad
settings as :class:`~spacy_ctx.errors.ConfigError`, at ``nlp.initialize()`` or
the first call at the latest, with messages that name the file (and key and
shapes), never as an error from deep inside torch.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest
import spacy
import torch
from safetensors.torch import load_file, save_file
from spacy.language import Language
from spacy.tokens import Doc

from spacy_ctx.errors import CheckpointError, ConfigError

from .bert_utils import write_tiny_bert

WIDTH = 32  # hidden_size of the tiny checkpoint
N_STORED = 3  # store="all": embeddings + 2 transformer layers
LAYER_NAMES = ["embeddings", "layer_1", "layer_2"]
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


def check_doc(doc: Doc) -> np.ndarray:
    """One finite row per token; tokens without pieces have zero rows and no vector."""
    ctx = doc._.ctx
    assert ctx is not None, "ctx_bert left no doc._.ctx"
    assert ctx.layers.shape == (N_STORED, len(doc), WIDTH)
    assert ctx.layer_names == LAYER_NAMES
    assert np.all(np.isfinite(ctx.layers))
    assert ctx.piece_counts.shape == (len(doc),)
    assert ctx.piece_counts.dtype == np.int32
    assert np.all(ctx.piece_counts >= 0)
    for token in doc:
        vector = token.vector
        assert vector.shape == (WIDTH,) and vector.dtype == np.float32
        assert np.all(np.isfinite(vector))
        np.testing.assert_array_equal(token._.ctx_vector, vector)
        if ctx.piece_counts[token.i] == 0:
            assert not token.has_vector, f"token {token.i} {token.text!r} has no pieces"
            assert not ctx.layers[:, token.i].any(), f"token {token.i} has a non-zero row"
            assert not vector.any()
            assert token.vector_norm == 0.0
        else:
            assert token.has_vector
            assert ctx.layers[:, token.i].any()
    assert doc.vector.shape == (WIDTH,) and np.all(np.isfinite(doc.vector))
    assert doc.has_vector == bool((ctx.piece_counts > 0).any())
    return ctx.layers


def first_use_raises(nlp: Language, error: type, *needles: str) -> List[str]:
    """``nlp.initialize()`` and the first call both raise ``error`` naming ``needles``."""
    assert not nlp.get_pipe("ctx_bert").is_loaded, "add_pipe must not load anything"
    messages = []
    actions: List[Callable[[], object]] = [nlp.initialize, lambda: nlp("Some text .")]
    for action in actions:
        with pytest.raises(error) as info:
            action()
        message = str(info.value)
        for needle in needles:
            assert needle in message, f"{needle!r} not in {message!r}"
        # Raised on purpose by spacy-ctx, before anything reached torch.
        assert "spacy_ctx" in str(info.traceback[-1].path), info.traceback[-1]
        assert not nlp.get_pipe("ctx_bert").is_loaded
        messages.append(message)
    return messages


def edit_config(path: Path, **changes: object) -> None:
    config_path = path / "config.json"
    config = json.loads(config_path.read_text(encoding="utf8"))
    config.update(changes)
    config_path.write_text(json.dumps(config), encoding="utf8")


# --------------------------------------------------------------------------
# unusual texts
# --------------------------------------------------------------------------

BAD_TEXTS = {
    "empty": "",
    "whitespace_only": "   \n\t  \n ",
    "control": "a\x01b \x02\x03 \x7f\x1b[0m ok \x07",
    "nul": "nul\x00byte \x00 end",
    "nul_only": "\x00",
    "long_token": "x" * 5000,
    "long_token_many_pieces": "before " + "中" * 5000 + " after",
    "long_punct_token": "a!" * 2500,
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "hebrew": "שלום עולם! מה שלומך?",
    "rtl_override": "\u202eabc\u202c def",
    "mixed_scripts": "Hello мир 世界 مرحبا שלום नमस्ते 123 café!",
    "zero_width": "zero\u200bwidth \u200b a\u200cb\u200d \ufeff soft\u00adhyphen",
    "emoji": "I love 🍕 and 🚀! 👩‍👩‍👧 🇫🇷 👍🏽 😀😀",
    "replacement_char": "x \ufffd y",
}


@pytest.mark.parametrize("kind", sorted(BAD_TEXTS))
def test_unusual_text(nlp: Language, kind: str) -> None:
    doc = nlp(BAD_TEXTS[kind])
    layers = check_doc(doc)
    if kind == "empty":
        assert len(doc) == 0 and layers.shape == (N_STORED, 0, WIDTH)
        assert not doc.has_vector
        assert doc.similarity(doc) == 0.0
    if kind in ("whitespace_only", "nul_only"):
        assert len(doc) > 0
        assert doc._.ctx.piece_counts.tolist() == [0] * len(doc)
        assert not layers.any() and not doc.has_vector
        assert not doc.vector.any()
    if kind.startswith("long"):
        assert doc._.ctx.piece_counts.sum() >= 1
        assert doc._.ctx.piece_counts.max() <= 5000


def test_long_token_with_thousands_of_pieces_is_windowed(nlp: Language) -> None:
    doc = nlp(BAD_TEXTS["long_token_many_pieces"])
    assert [t.text for t in doc][::2] == ["before", "after"]
    assert doc._.ctx.piece_counts[1] == 5000  # one piece per CJK character
    check_doc(doc)


@pytest.mark.parametrize(
    "text,no_pieces",
    [
        ("hello \u200b world", [1]),
        ("a  \n\n b", [1]),
        ("hello\t\tworld", [1]),
        ("\x00", [0]),
        ("\x01\x02 \x7f", [0, 1]),
        ("ok \u200d\u200c ok", [1]),
        ("x \ufeff y", [1]),
    ],
)
def test_tokens_without_pieces_get_zero_vectors(
    nlp: Language, text: str, no_pieces: List[int]
) -> None:
    doc = nlp(text)
    counts = doc._.ctx.piece_counts
    assert [i for i in range(len(doc)) if counts[i] == 0] == no_pieces, [t.text for t in doc]
    check_doc(doc)
    for i in no_pieces:
        token = doc[i]
        assert not token.has_vector
        np.testing.assert_array_equal(token.vector, np.zeros((WIDTH,), dtype=np.float32))
        span = doc[i : i + 1]
        assert not span.has_vector and not span.vector.any()
        assert token.similarity(doc[0]) == 0.0  # zero vector: 0, never nan
    # The doc vector averages only the tokens that have pieces.
    with_pieces = [t.vector for t in doc if t.has_vector]
    if with_pieces:
        np.testing.assert_allclose(doc.vector, np.mean(with_pieces, axis=0), rtol=1e-6, atol=1e-7)


def test_unusual_docs_in_one_batch(nlp: Language) -> None:
    # The two texts with thousands of pieces are left out only to keep this fast.
    slow = ("long_token_many_pieces", "long_punct_token")
    texts = [text for kind, text in BAD_TEXTS.items() if kind not in slow]
    texts += TEXTS
    docs = list(nlp.pipe(texts, batch_size=len(texts)))
    for text, doc in zip(texts, docs):
        check_doc(doc)
        alone = nlp(text)
        np.testing.assert_array_equal(doc._.ctx.piece_counts, alone._.ctx.piece_counts)
        np.testing.assert_allclose(doc._.ctx.layers, alone._.ctx.layers, rtol=1e-5, atol=1e-5)


def test_all_empty_batch(nlp: Language) -> None:
    docs = list(nlp.pipe(["", "", " ", "\x00"]))
    assert [d._.ctx.layers.shape for d in docs] == [
        (N_STORED, 0, WIDTH), (N_STORED, 0, WIDTH), (N_STORED, 1, WIDTH), (N_STORED, 1, WIDTH)
    ]
    for doc in docs:
        check_doc(doc)
        assert not doc.has_vector


def test_unusual_words_as_doc_tokens(nlp: Language) -> None:
    words = ["\x00", "\x01\x02", "y" * 5000, "مرحبا", "👩‍👩‍👧", "\u200b", " ", "a"]
    doc = nlp(Doc(nlp.vocab, words=words))
    check_doc(doc)
    counts = doc._.ctx.piece_counts.tolist()
    assert counts[0] == counts[1] == counts[5] == counts[6] == 0
    assert counts[2] >= 1 and counts[3] >= 1 and counts[4] >= 1 and counts[7] == 1


# --------------------------------------------------------------------------
# broken checkpoints
# --------------------------------------------------------------------------


def test_missing_weights_file(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    saved = weights.read_bytes()
    weights.unlink()
    nlp = make_nlp(ckpt)  # building the pipeline does no I/O
    first_use_raises(nlp, CheckpointError, str(ckpt), "model.safetensors", "pytorch_model.bin")
    # Nothing half-loaded is kept: once the file is back, the same pipeline works.
    weights.write_bytes(saved)
    check_doc(nlp("Some text ."))


@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "header_only", "empty"])
def test_corrupt_safetensors(ckpt: Path, damage: str) -> None:
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    if damage == "random_bytes":
        weights.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "header_only":
        weights.write_bytes(data[:8])
    else:
        weights.write_bytes(b"")
    first_use_raises(make_nlp(ckpt), CheckpointError, str(weights))


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
    texts = TEXTS + [BAD_TEXTS["emoji"], BAD_TEXTS["whitespace_only"]]
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
    "component,needles",
    [
        ({"store": "bogus"}, ["store", "bogus"]),
        ({"store_dtype": "int8"}, ["store_dtype", "int8"]),
        ({"max_batch_tokens": 0}, ["max_batch_tokens"]),
        ({"store": "none", "vector_hooks": True}, ["vector_hooks", "store"]),
        ({"model": {"device": "not-a-device"}}, ["not-a-device"]),
    ],
)
def test_invalid_component_settings_fail_at_add_pipe(
    tiny_bert_dir: Path, component: Dict, needles: List[str]
) -> None:
    component = dict(component)
    model = component.pop("model", None)
    with pytest.raises(ConfigError) as info:
        make_nlp(tiny_bert_dir, model=model, **component)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "model,needles",
    [
        ({"window": MAX_WINDOW + 1}, [str(MAX_WINDOW + 1), str(MAX_WINDOW)]),
        ({"window": 1000}, ["1000", str(MAX_WINDOW)]),
        ({"window": 0}, ["window"]),
        ({"window": 8, "stride": 9}, ["stride"]),
        ({"stride": 0}, ["stride"]),
        ({"overlap": "sideways"}, ["overlap", "sideways"]),
        ({"mixed_precision": "fp8"}, ["mixed_precision", "fp8"]),
    ],
)
def test_invalid_model_settings_fail_at_first_use(
    tiny_bert_dir: Path, model: Dict, needles: List[str]
) -> None:
    first_use_raises(make_nlp(tiny_bert_dir, model=model), ConfigError, *needles)


def test_largest_window_is_accepted(tiny_bert_dir: Path, nlp: Language) -> None:
    doc = make_nlp(tiny_bert_dir, model={"window": MAX_WINDOW})(TEXTS[2])
    np.testing.assert_array_equal(doc._.ctx.layers, nlp(TEXTS[2])._.ctx.layers)
