"""PieceTokenizer for every family's tokenizer kind, against the transformers fast tokenizer.

Tokenizers are trained on the fly (tests/tiny_tokenizers.py) and saved the way
real checkpoints are; ours must give the ids HF gives for running text and the
specials HF adds, from tokenizer.json and from the older file layouts.
"""

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from spacy_ctx.errors import CheckpointError
from spacy_ctx.pieces.tokenizer import PieceTokenizer

from .tiny_tokenizers import KINDS, MODEL_TYPES, write_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Zürich's café didn't open — 東京 did.",
    "  two  spaces,\ttabs\tand\n\nnew lines  ",
    "Launch 🚀 today 👨‍👩‍👧 🇫🇷 e\u0301 \u200bzero",
    "See https://example.com/path?q=1 #hashtag @user",
    "مرحبا بالعالم שלום 東京は日本の首都です。",
    "",
]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def tokenizer_dir(request, tmp_path_factory):
    """``(model_type, dir, ids)`` of a tiny tokenizer saved like the family's checkpoints."""
    path = tmp_path_factory.mktemp(request.param.replace("-", "_"))
    ids = write_tokenizer(request.param, path)
    (path / "config.json").write_text(json.dumps({"model_type": request.param}))
    return request.param, path, ids


def _hf(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


def test_ids_equal_hf_on_running_text(tokenizer_dir):
    model_type, path, _ = tokenizer_dir
    ours, theirs = PieceTokenizer.from_pretrained_dir(path), _hf(path)
    assert ours.kind == KINDS[model_type]
    for text, (ids, spans) in zip(TEXTS, ours.encode_texts(TEXTS)):
        assert ids.tolist() == theirs(text, add_special_tokens=False)["input_ids"], repr(text)
        assert spans.shape == (len(ids), 2)


def test_specials_equal_hf(tokenizer_dir):
    model_type, path, info = tokenizer_dir
    ours, theirs = PieceTokenizer.from_pretrained_dir(path), _hf(path)
    for text in TEXTS[:3]:
        [(ids, _)] = ours.encode_texts([text])
        framed = ours.prefix_ids + ids.tolist() + ours.suffix_ids
        assert framed == theirs(text, add_special_tokens=True)["input_ids"]
    if model_type == "gpt2":
        assert ours.prefix_ids == [] and ours.suffix_ids == [] and ours.n_specials == 0
    else:
        assert ours.prefix_ids == [info["cls_token_id"]]
        assert ours.suffix_ids == [info["sep_token_id"]]
    assert ours.pad_id == (info["pad_token_id"] if info["pad_token_id"] is not None else 0)
    assert ours.max_id == info["vocab_size"] - 1


def test_padding_and_truncation_in_tokenizer_json_are_ignored(tokenizer_dir, tmp_path):
    """A tokenizer.json that pads and truncates (all-MiniLM-L6-v2 pads to 128) must
    not add padding to the specials nor cut documents."""
    model_type, path, _ = tokenizer_dir
    shutil.copytree(path, tmp_path / "padded")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.enable_padding(length=40, pad_id=0)
    tokenizer.enable_truncation(max_length=8)
    tokenizer.save(str(tmp_path / "padded" / "tokenizer.json"))
    plain = PieceTokenizer.from_pretrained_dir(path)
    padded = PieceTokenizer.from_pretrained_dir(tmp_path / "padded")
    assert (padded.prefix_ids, padded.suffix_ids) == (plain.prefix_ids, plain.suffix_ids)
    text = " ".join([TEXTS[0]] * 5)
    [(ids, _)] = padded.encode_texts([text])
    [(expected, _)] = plain.encode_texts([text])
    assert ids.tolist() == expected.tolist() and len(ids) > 8


def test_to_dir_from_dir_round_trip(tokenizer_dir, tmp_path):
    _, path, _ = tokenizer_dir
    ours = PieceTokenizer.from_pretrained_dir(path)
    ours.to_dir(tmp_path / "saved")
    again = PieceTokenizer.from_dir(tmp_path / "saved")
    assert (again.kind, again.prefix_ids, again.suffix_ids, again.pad_id, again.unk_id) == (
        ours.kind, ours.prefix_ids, ours.suffix_ids, ours.pad_id, ours.unk_id
    )
    for (a, sa), (b, sb) in zip(ours.encode_texts(TEXTS), again.encode_texts(TEXTS)):
        assert a.tolist() == b.tolist() and sa.tolist() == sb.tolist()


def _split_bpe_files(source: Path, target: Path) -> None:
    """vocab.json + merges.txt (+ configs) from a byte-level BPE tokenizer.json."""
    target.mkdir()
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf8"))
    model = data["model"]
    # As in real checkpoints, vocab.json also lists the special tokens.
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in data["added_tokens"]}}
    (target / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf8")
    for name in ("tokenizer_config.json", "config.json"):
        shutil.copy(source / name, target / name)


@pytest.mark.parametrize("model_type", ["roberta", "gpt2", "modernbert"])
def test_vocab_json_and_merges_only(model_type, tmp_path):
    full = tmp_path / "full"
    write_tokenizer(model_type, full)
    (full / "config.json").write_text(json.dumps({"model_type": model_type}))
    split = tmp_path / "split"
    _split_bpe_files(full, split)
    expected, got = PieceTokenizer.from_pretrained_dir(full), PieceTokenizer.from_pretrained_dir(split)
    assert got.kind == "bpe" and got.source == str(split / "vocab.json")
    assert (got.prefix_ids, got.suffix_ids, got.pad_id) == (
        expected.prefix_ids, expected.suffix_ids, expected.pad_id
    )
    texts = TEXTS + ["<s> literal specials </s> [CLS] <|endoftext|>"]
    for (a, sa), (b, sb) in zip(expected.encode_texts(texts), got.encode_texts(texts)):
        assert a.tolist() == b.tolist()
        assert sa.tolist() == sb.tolist()


def test_vocab_txt_only_equals_tokenizer_json(tmp_path):
    full = tmp_path / "full"
    write_tokenizer("bert", full)
    split = tmp_path / "split"
    split.mkdir()
    vocab = json.loads((full / "tokenizer.json").read_text(encoding="utf8"))["model"]["vocab"]
    lines = sorted(vocab, key=vocab.get)
    (split / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf8")
    shutil.copy(full / "tokenizer_config.json", split / "tokenizer_config.json")
    expected, got = PieceTokenizer.from_pretrained_dir(full), PieceTokenizer.from_pretrained_dir(split)
    assert (got.kind, got.prefix_ids, got.suffix_ids, got.pad_id) == (
        "wordpiece", expected.prefix_ids, expected.suffix_ids, expected.pad_id
    )
    for (a, _), (b, _) in zip(expected.encode_texts(TEXTS), got.encode_texts(TEXTS)):
        assert a.tolist() == b.tolist()


@pytest.mark.parametrize("name", ["sentencepiece.bpe.model", "spm.model"])
def test_sentencepiece_model_only_is_a_clear_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00not really a model")
    (tmp_path / "config.json").write_text('{"model_type": "xlm-roberta"}')
    with pytest.raises(CheckpointError) as err:
        PieceTokenizer.from_pretrained_dir(tmp_path)
    message = str(err.value)
    assert name in message and "tokenizer.json" in message
    assert "save_pretrained" in message and "sentencepiece" in message


def test_no_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="vocab.json \\+ merges.txt"):
        PieceTokenizer.from_pretrained_dir(tmp_path)


def test_old_pieces_json_still_loads(tmp_path):
    """Pipelines saved before PieceTokenizer wrote special-token names, not ids."""
    write_tokenizer("bert", tmp_path / "hf")
    shutil.copy(tmp_path / "hf" / "tokenizer.json", tmp_path / "tokenizer.json")
    old = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
    (tmp_path / "pieces.json").write_text(json.dumps(old))
    loaded = PieceTokenizer.from_dir(tmp_path)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert loaded.prefix_ids == [tokenizer.token_to_id("[CLS]")]
    assert loaded.suffix_ids == [tokenizer.token_to_id("[SEP]")]
    assert loaded.pad_id == 0 and loaded.kind == "wordpiece"


def test_bad_settings_file_names_the_entry(tmp_path):
    write_tokenizer("roberta", tmp_path / "hf")
    PieceTokenizer.from_pretrained_dir(tmp_path / "hf").to_dir(tmp_path / "saved")
    settings = json.loads((tmp_path / "saved" / "pieces.json").read_text())
    settings["prefix_ids"] = ["<s>"]
    (tmp_path / "saved" / "pieces.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match="prefix_ids"):
        PieceTokenizer.from_dir(tmp_path / "saved")
    settings["prefix_ids"] = [10**6]
    (tmp_path / "saved" / "pieces.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match="outside the tokenizer's ids"):
        PieceTokenizer.from_dir(tmp_path / "saved")


def test_no_post_processor_falls_back_to_config_and_family(tmp_path):
    """A tokenizer.json without post-processor: cls/sep from tokenizer_config.json, and
    GPT-2 gets no specials whatever its bos/eos are."""
    for model_type, expected in [("roberta", ("<s>", "</s>")), ("gpt2", None), ("deberta-v2", ("[CLS]", "[SEP]"))]:
        path = tmp_path / model_type
        write_tokenizer(model_type, path)
        data = json.loads((path / "tokenizer.json").read_text(encoding="utf8"))
        data["post_processor"] = None
        (path / "tokenizer.json").write_text(json.dumps(data), encoding="utf8")
        ours = PieceTokenizer.from_pretrained_dir(path, model_type)
        vocab = ours.tokenizer.get_vocab(with_added_tokens=True)
        if expected is None:
            assert ours.prefix_ids == [] and ours.suffix_ids == []
        else:
            assert ours.prefix_ids == [vocab[expected[0]]] and ours.suffix_ids == [vocab[expected[1]]]
