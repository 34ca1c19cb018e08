"""The alignment rule (spacy_ctx/pieces/alignment.py) on every tokenizer kind, and pooling
with a piece index.

The model reads ``doc.text`` as running text; pieces map to tokens by their
character offsets (whitespace trimmed), a piece overlapping several tokens counts
for each, whitespace tokens and tokens without pieces count 0. Expectations are
computed here from HF's own ids and ``offset_mapping`` with a plain loop.
"""

import numpy as np
import pytest
import spacy
import torch
from thinc.api import reduce_first, reduce_last, reduce_max, reduce_mean
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import BPE, WordPiece

from spacy_ctx.backends.base import CtxOutput, pool_pieces
from spacy_ctx.pieces.alignment import align_offsets, identity_or_none, trim_offsets
from spacy_ctx.pieces.tokenizer import PieceTokenizer
from spacy_ctx.thinc_layers.listeners import build_head

from .bert_utils import write_tiny_bert
from .tiny_tokenizers import write_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOSTILE = {
    "spaces": "  leading, trailing and   multiple   spaces  ",
    "newlines": "line one\n\nline two\r\nthree\n",
    "tabs": "col1\tcol2\t\tcol3\t",
    "control": "bell\x07 null\x00 esc\x1b del\x7f nbsp\u00a0x soft\u00adhyphen",
    "zero_width": "zero\u200bwidth join\u200dme non\u200cjoin \ufeffbom",
    "combining": "e\u0301 a\u0300\u0301 n\u0303o Zu\u0308rich",
    "emoji": "family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 keycap 1️⃣ ❤️ 🚀🚀",
    "rtl": "مرحبا بالعالم שלום עולם mixed עברית and English",
    "cjk": "東京は日本の首都です。北京欢迎你！서울은",
    "long_token": "x" * 5000 + " short",
    "urls": "See https://example.com/path?q=1&r=two#frag www.test.org/x_y #hashtag @user",
    "punctuation": "Well...!?! (yes) -- no; 'quoted' \"double\" $5.00 50% don't",
    "empty": "",
    "only_space": "   \n\t ",
}
# One family per tokenizer kind, plus GPT-2 (no specials) and DeBERTa-v3 (own specials).
KIND_MODEL_TYPES = ["bert", "roberta", "gpt2", "xlm-roberta", "deberta-v2"]


@pytest.fixture(scope="module")
def nlp():
    return spacy.blank("en")


@pytest.fixture(scope="module", params=KIND_MODEL_TYPES)
def tokenizers_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param.replace("-", "_"))
    write_tokenizer(request.param, path)
    ours = PieceTokenizer.from_pretrained_dir(path, request.param)
    return ours, transformers.AutoTokenizer.from_pretrained(str(path))


def _expected(doc, hf_tokenizer):
    """HF ids, and per token the pieces whose whitespace-trimmed span overlaps it."""
    text = doc.text
    enc = hf_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for start, end in enc["offset_mapping"]:
        piece = text[start:end]
        spans.append((start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())))
    per_token = []
    for token in doc:
        lo, hi = token.idx, token.idx + len(token)
        per_token.append(
            [] if token.is_space else [p for p, (s, e) in enumerate(spans) if s < e and s < hi and e > lo]
        )
    return enc["input_ids"], per_token


def _per_token(counts, index):
    starts = np.cumsum(counts) - counts
    return [index[s : s + c].tolist() for s, c in zip(starts, counts)]


def _check(doc, ours, hf_tokenizer):
    [(ids, counts, index)] = ours.encode_docs([doc])
    hf_ids, per_token = _expected(doc, hf_tokenizer)
    assert ids.dtype == np.int64 and counts.dtype == np.int32 and index.dtype == np.int64
    assert ids.tolist() == hf_ids
    assert counts.shape == (len(doc),) and len(index) == counts.sum()
    assert ((0 <= index) & (index < len(ids))).all()
    assert _per_token(counts, index) == per_token
    for token, count in zip(doc, counts):
        if token.is_space:
            assert count == 0
    return ids, counts, index


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_text(nlp, tokenizers_pair, name):
    ours, theirs = tokenizers_pair
    _check(nlp(HOSTILE[name]), ours, theirs)


def test_batch_equals_one_by_one(nlp, tokenizers_pair):
    ours, _ = tokenizers_pair
    docs = [nlp(text) for text in HOSTILE.values()]
    for doc, batched in zip(docs, ours.encode_docs(docs)):
        [alone] = ours.encode_docs([doc])
        for a, b in zip(alone, batched):
            np.testing.assert_array_equal(a, b)


def test_leading_space_convention_is_kept(nlp, tokenizers_pair):
    """'world' after a space is encoded as in running text (Ġworld/▁world), not alone."""
    ours, theirs = tokenizers_pair
    doc = nlp("hello world")
    [(ids, counts, index)] = ours.encode_docs([doc])
    assert ids.tolist() == theirs("hello world", add_special_tokens=False)["input_ids"]
    world = [ours.tokenizer.id_to_token(int(ids[i])) for i in _per_token(counts, index)[1]]
    if ours.kind == "bpe":
        assert world[0].startswith("Ġ")
    elif ours.kind == "unigram":
        assert world[0].startswith("▁")


@pytest.mark.parametrize("files", [("vocab.txt",), ("tokenizer.json",)])
@pytest.mark.parametrize("lowercase", [True, False])
def test_tiny_bert_checkpoint_files(nlp, tmp_path, files, lowercase):
    model_dir = write_tiny_bert(tmp_path / "m", tokenizer_files=files, lowercase=lowercase)
    ours = PieceTokenizer.from_pretrained_dir(model_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    for text in HOSTILE.values():
        _check(nlp(text), ours, theirs)


@pytest.mark.parametrize("name", ["punctuation", "emoji", "cjk", "urls", "spaces"])
def test_minilm(nlp, minilm, name):
    ours = PieceTokenizer.from_pretrained_dir(minilm)
    _check(nlp(HOSTILE[name]), ours, transformers.AutoTokenizer.from_pretrained(str(minilm)))


def test_tokenizer_config_overrides_tokenizer_json(nlp, tmp_path):
    """tokenizer_config.json's do_lower_case wins over tokenizer.json, as in HF."""
    model_dir = write_tiny_bert(tmp_path / "m", tokenizer_files=("tokenizer.json",), lowercase=True)
    (model_dir / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    ours = PieceTokenizer.from_pretrained_dir(model_dir)
    [(upper, _, _), (lower, _, _)] = ours.encode_docs([nlp("Apple"), nlp("apple")])
    assert upper.tolist() != lower.tolist()


def test_unknown_token_gets_unk(nlp, tiny_bert_dir):
    ours = PieceTokenizer.from_pretrained_dir(tiny_bert_dir)
    [(ids, counts, _)] = ours.encode_docs([nlp("Ωμέγα")])
    assert ours.unk_id in ids.tolist()
    assert counts.tolist() == [len(ids)]


# -- pieces spanning several spaCy tokens -----------------------------------------------
def test_wordpiece_piece_over_two_tokens(nlp):
    """spaCy splits "don't" into "do" + "n't"; the piece "don" belongs to both."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "i", "don", "'", "t", "know"])}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    ours = PieceTokenizer(tokenizer, prefix_ids=[2], suffix_ids=[3])
    doc = nlp("i don't know")
    assert [t.text for t in doc] == ["i", "do", "n't", "know"]
    [(ids, counts, index)] = ours.encode_docs([doc])
    pieces = [ours.tokenizer.id_to_token(int(i)) for i in ids]
    assert pieces == ["i", "don", "'", "t", "know"]
    assert _per_token(counts, index) == [[0], [1], [1, 2, 3], [4]]
    assert identity_or_none(index, len(ids)) is not None


def test_byte_bpe_piece_over_two_tokens(nlp):
    """A byte-level BPE piece "Ġdon" spans spaCy's "do" and "n't"."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [("Ġ", "d"), ("Ġd", "o"), ("Ġdo", "n"), ("'", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tokenizer = Tokenizer(BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ours = PieceTokenizer(tokenizer, prefix_ids=[], suffix_ids=[])
    doc = nlp("I don't")
    [(ids, counts, index)] = ours.encode_docs([doc])
    pieces = [ours.tokenizer.id_to_token(int(i)) for i in ids]
    assert pieces == ["I", "Ġdon", "'t"]
    assert _per_token(counts, index) == [[0], [1], [1, 2]]


def test_trim_and_align_by_hand():
    text = "ab  cd\n"
    spans = trim_offsets(text, [(0, 2), (2, 6), (3, 4), (6, 7), (0, 0)])
    assert spans.tolist() == [[0, 2], [4, 6], [4, 4], [7, 7], [0, 0]]
    # tokens: "ab", " " (space), "cd", "\n" (space)
    counts, index = align_offsets(
        spans, np.array([0, 2, 4, 6]), np.array([2, 4, 6, 7]), np.array([False, True, False, True])
    )
    assert counts.tolist() == [1, 0, 1, 0] and index.tolist() == [0, 1]


# -- pooling with a piece index ----------------------------------------------------------------
COUNTS = np.array([2, 0, 3, 1, 0, 2], dtype=np.int32)
INDEX = np.array([0, 1, 1, 2, 4, 6, 6, 7], dtype=np.int64)  # piece 1 and 6 shared, 3 and 5 unused


def _hand_pool(layers, counts, index, method):
    out = torch.zeros((layers.shape[0], len(counts), layers.shape[2]), dtype=layers.dtype)
    pos = 0
    for t, c in enumerate(counts):
        rows = layers[:, index[pos : pos + c]]
        pos += c
        if c == 0:
            continue
        out[:, t] = {
            "mean": lambda r: r.mean(1),
            "first": lambda r: r[:, 0],
            "last": lambda r: r[:, -1],
            "max": lambda r: r.max(1).values,
        }[method](rows)
    return out


@pytest.mark.parametrize("method", ["mean", "first", "last", "max"])
def test_pool_with_index_equals_hand_loop(method):
    layers = torch.randn((2, 8, 3), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        pool_pieces(layers, COUNTS, method, INDEX), _hand_pool(layers, COUNTS, INDEX, method)
    )
    assert torch.equal(CtxOutput(layers, COUNTS, INDEX).pool(method), pool_pieces(layers, COUNTS, method, INDEX))


@pytest.mark.parametrize("method", ["mean", "first", "last", "max"])
def test_pool_with_index_gradcheck(method):
    layers = torch.randn((2, 8, 3), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layers.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pool_pieces(x, COUNTS, method, INDEX), (layers,))


def test_identity_index_is_the_fast_path():
    layers = torch.randn((1, 4, 2))
    counts = np.array([1, 2, 0, 1], dtype=np.int32)
    assert identity_or_none(np.arange(4), 4) is None
    assert identity_or_none(np.arange(3), 4) is not None  # a piece aligned to no token
    torch.testing.assert_close(
        pool_pieces(layers, counts, "mean", np.arange(4)), pool_pieces(layers, counts, "mean")
    )


@pytest.mark.parametrize(
    "method,reduce", [("mean", reduce_mean), ("first", reduce_first), ("last", reduce_last), ("max", reduce_max)]
)
def test_listener_head_gathers_by_index(method, reduce):
    """The listener head pools like pool_pieces and its gradient equals autograd's
    (shared pieces receive the sum of their tokens' gradients)."""
    head = build_head(reduce(), None)
    head.initialize()
    gen = torch.Generator().manual_seed(2)
    outputs = [
        CtxOutput(torch.randn((2, 8, 3), generator=gen), COUNTS, INDEX),
        CtxOutput(torch.randn((2, 3, 3), generator=gen), np.array([1, 0, 2], dtype=np.int32), None),
    ]
    Ys, backprop = head(outputs, is_train=True)
    dYs = [np.random.default_rng(3).normal(size=y.shape).astype("float32") for y in Ys]
    d_layers = backprop(dYs)
    for output, y, dy, d in zip(outputs, Ys, dYs, d_layers):
        layers = output.layers.clone().requires_grad_(True)
        pooled = pool_pieces(layers, output.piece_counts, method, output.piece_index)[-1]
        np.testing.assert_allclose(y, pooled.detach().numpy(), atol=1e-6)
        (pooled * torch.from_numpy(dy)).sum().backward()
        np.testing.assert_allclose(d, layers.grad.numpy(), atol=1e-6)
