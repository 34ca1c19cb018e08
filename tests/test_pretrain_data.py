"""Pretraining data (issue 9): raw-text reading and bad input, dynamic MLM masking
statistics, packing documents into sequences with spaCy word ids, NSP pairs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import List

import numpy as np
import pytest
import spacy
import torch
from spacy.tokens import DocBin

from spacy_ctx.errors import ConfigError, SpacyCtxError
from spacy_ctx.pieces.tokenizer import PieceTokenizer
from spacy_ctx.training.corpus import (
    RawText,
    RawTextError,
    chunk_text,
    is_heldout,
    read_raw_texts,
    split_heldout,
)
from spacy_ctx.training.masking import IGNORE_INDEX, mask_for_mlm
from spacy_ctx.training.packing import (
    DocPieces,
    NspPair,
    collate,
    doc_pieces,
    encode_documents,
    make_nsp_pairs,
    mask_id_of,
    pack_sequences,
    sentence_pieces,
    sentence_splitter,
    special_ids_of,
)

from .tiny_tokenizers import CORPUS, write_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS: List[str] = CORPUS + [
    "Dr. Smith went to Washington. He arrived late! Nobody waited for him? The end.",
    "It rained all day. The river rose. Boats stayed in the harbour; the market closed early.",
    "Short one.",
]


@pytest.fixture(scope="module", params=["bert", "roberta", "xlm-roberta"])
def tokenizer(request, tmp_path_factory) -> PieceTokenizer:
    path = tmp_path_factory.mktemp(f"tok_{request.param}")
    write_tokenizer(request.param, path)
    return PieceTokenizer.from_pretrained_dir(path, request.param)


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory) -> PieceTokenizer:
    path = tmp_path_factory.mktemp("tok_bert_only")
    write_tokenizer("bert", path)
    return PieceTokenizer.from_pretrained_dir(path, "bert")


# -- masking ------------------------------------------------------------------------------------
VOCAB = 1000
SPECIALS = (0, 1, 2, 3, 4)  # pad, unk, cls, sep, mask
MASK_ID = 4


def synthetic_batch(seed: int, batch: int = 16, length: int = 64):
    """Sequences of words 1-4 pieces long, [CLS]/[SEP] around, padded to ``length``."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), dtype=np.int64)
    words = np.full((batch, length), -1, dtype=np.int64)
    special = np.ones((batch, length), dtype=bool)
    attention = np.zeros((batch, length), dtype=np.int64)
    for row in range(batch):
        n = int(rng.integers(length // 2, length + 1))
        content = n - 2
        pieces, word, position = [], [], 0
        while position < content:
            size = min(int(rng.integers(1, 5)), content - position)
            word.extend([len(set(word))] * size)
            position += size
        pieces = rng.integers(len(SPECIALS), VOCAB, size=content)
        ids[row, :n] = np.concatenate([[2], pieces, [3]])
        words[row, 1 : n - 1] = word
        special[row, 1 : n - 1] = False
        attention[row, :n] = 1
    return {
        "input_ids": torch.as_tensor(ids),
        "word_ids": torch.as_tensor(words),
        "special_mask": torch.as_tensor(special),
        "attention_mask": torch.as_tensor(attention),
    }


def run_masking(mode: str, n_batches: int, seed: int = 0, length: int = 64):
    generator = torch.Generator().manual_seed(seed)
    results = []
    for index in range(n_batches):
        batch = synthetic_batch(index, length=length)
        masked, labels = mask_for_mlm(
            batch["input_ids"],
            special_mask=batch["special_mask"],
            word_ids=batch["word_ids"],
            mode=mode,
            mask_id=MASK_ID,
            vocab_size=VOCAB,
            generator=generator,
            special_ids=SPECIALS,
        )
        results.append((batch, masked, labels))
    return results


@pytest.mark.parametrize("mode", ["piece", "word", "span"])
def test_masking_statistics(mode):
    results = run_masking(mode, 120)
    maskable = chosen = n_mask = n_random = n_keep = 0
    for batch, masked, labels in results:
        selected = labels != IGNORE_INDEX
        # Never a special or a padding position; labels are the original ids.
        assert not (selected & batch["special_mask"]).any()
        assert not (selected & (batch["attention_mask"] == 0)).any()
        assert torch.equal(labels[selected], batch["input_ids"][selected])
        # Unchosen positions are untouched.
        assert torch.equal(masked[~selected], batch["input_ids"][~selected])
        maskable += int((~batch["special_mask"]).sum())
        chosen += int(selected.sum())
        got, original = masked[selected], batch["input_ids"][selected]
        n_mask += int((got == MASK_ID).sum())
        n_keep += int((got == original).sum())
        is_random = (got != MASK_ID) & (got != original)
        n_random += int(is_random.sum())
        # Random replacements come from the non-special vocabulary.
        assert not any(int(i) in SPECIALS for i in got[is_random])
    assert abs(chosen / maskable - 0.15) < 0.01, chosen / maskable
    assert abs(n_mask / chosen - 0.8) < 0.02
    assert abs(n_random / chosen - 0.1) < 0.02
    assert abs(n_keep / chosen - 0.1) < 0.02


def unit_runs(words: torch.Tensor, selected: torch.Tensor):
    """Per row: {word id: chosen?} (asserting all pieces agree) and lengths of runs of
    consecutive chosen words."""
    runs = []
    for row in range(words.shape[0]):
        status = {}
        for word, flag in zip(words[row].tolist(), selected[row].tolist()):
            if word < 0:
                continue
            assert status.setdefault(word, flag) == flag, "a spaCy token was split by the mask"
        run = 0
        for word in sorted(status):
            if status[word]:
                run += 1
            elif run:
                runs.append(run)
                run = 0
        if run:
            runs.append(run)
    return runs


def test_word_masking_keeps_tokens_whole():
    runs = []
    for batch, _, labels in run_masking("word", 20):
        runs += unit_runs(batch["word_ids"], labels != IGNORE_INDEX)
    assert np.mean(runs) < 1.5  # independent words: runs are mostly single words


def test_span_masking_contiguous_whole_words():
    runs = []
    for batch, _, labels in run_masking("span", 10, length=384):
        runs += unit_runs(batch["word_ids"], labels != IGNORE_INDEX)
    # Geometric(0.2) lengths clipped at 10 have mean ~4.5 words; spans are cut by
    # the budget (15% of ~290 pieces, ~17 words) and the sequence end.
    assert np.mean(runs) > 3.0, np.mean(runs)


@pytest.mark.parametrize("mode", ["piece", "word", "span"])
def test_masking_dynamic_and_deterministic(mode):
    first = run_masking(mode, 3, seed=7)
    again = run_masking(mode, 3, seed=7)
    for (_, m1, l1), (_, m2, l2) in zip(first, again):
        assert torch.equal(m1, m2) and torch.equal(l1, l2)
    # The same batch masked twice with one generator gets different masks.
    batch = synthetic_batch(0)
    generator = torch.Generator().manual_seed(7)
    kwargs = dict(special_mask=batch["special_mask"], word_ids=batch["word_ids"], mode=mode,
                  mask_id=MASK_ID, vocab_size=VOCAB, generator=generator, special_ids=SPECIALS)
    _, labels_a = mask_for_mlm(batch["input_ids"], **kwargs)
    _, labels_b = mask_for_mlm(batch["input_ids"], **kwargs)
    assert not torch.equal(labels_a, labels_b)


def test_masking_refuses_bad_arguments():
    batch = synthetic_batch(0, batch=2, length=8)
    generator = torch.Generator().manual_seed(0)
    base = dict(special_mask=batch["special_mask"], mask_id=MASK_ID, vocab_size=VOCAB, generator=generator)
    with pytest.raises(ConfigError, match="word_ids"):
        mask_for_mlm(batch["input_ids"], mode="word", **base)
    with pytest.raises(ConfigError, match="masking"):
        mask_for_mlm(batch["input_ids"], mode="whole", **base)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="replace"):
        mask_for_mlm(batch["input_ids"], replace=(0.8, 0.1, 0.2), **base)
    with pytest.raises(ConfigError, match="shape"):
        mask_for_mlm(batch["input_ids"][:, :4], **base)


# -- packing ---------------------------------------------------------------------------------------
def encoded(tokenizer: PieceTokenizer, texts=TEXTS, sentences: bool = False) -> List[DocPieces]:
    make_doc = sentence_splitter("en") if sentences else spacy.blank("en").make_doc
    return list(encode_documents(texts, tokenizer, make_doc, sentences=sentences, batch_size=4))


def test_word_ids_follow_spacy_tokens(bert_tokenizer):
    doc = spacy.blank("en")("I don't think")
    ids, counts, index = bert_tokenizer.encode_docs([doc])[0]
    pieces = doc_pieces(ids, counts, index)
    names = [bert_tokenizer.tokenizer.id_to_token(int(i)) for i in ids]
    assert names[:4] == ["i", "don", "'", "t"]
    # "do" and "n't" share the piece "don", so they are one unit; "i" is its own.
    assert pieces.word_ids[:4].tolist() == [0, 1, 1, 1]
    assert pieces.word_ids[4] == 2 and np.all(np.diff(pieces.word_ids) >= 0)


@pytest.mark.parametrize("seq_len", [8, 13, 32, 64])
def test_pack_sequences(tokenizer, seq_len):
    docs = encoded(tokenizer)
    prefix, suffix = tokenizer.prefix_ids, tokenizer.suffix_ids
    sequences = list(pack_sequences(docs, seq_len, prefix, suffix))
    content = []
    unit_home = {}  # (doc, unit) -> sequence index
    doc_cursor = [0, 0]  # doc index, piece position
    for number, seq in enumerate(sequences):
        assert len(seq) <= seq_len
        assert seq.ids[: len(prefix)].tolist() == prefix and seq.ids[len(seq) - len(suffix):].tolist() == suffix
        assert np.array_equal(seq.special_mask, seq.word_ids < 0)
        # One special between documents, never a separator right before the suffix.
        assert not (seq.special_mask[len(prefix):-1] & seq.special_mask[len(prefix) + 1:]).any()
        words = seq.word_ids[~seq.special_mask]
        assert np.all(np.diff(words) >= 0) and words[0] == 0  # unique per unit, in order
        for piece_id, special in zip(seq.ids.tolist(), seq.special_mask.tolist()):
            if special:
                continue
            content.append(piece_id)
            doc, position = doc_cursor
            while position >= len(docs[doc].ids):
                doc, position = doc + 1, 0
            assert docs[doc].ids[position] == piece_id
            unit_home.setdefault((doc, int(docs[doc].word_ids[position])), set()).add(number)
            doc_cursor = [doc, position + 1]
    # Every piece exactly once, in order.
    assert content == np.concatenate([d.ids for d in docs]).tolist()
    # A unit that fits a sequence is never split across two.
    capacity = seq_len - len(prefix) - len(suffix)
    for (doc, unit), homes in unit_home.items():
        if int((docs[doc].word_ids == unit).sum()) <= capacity:
            assert len(homes) == 1
    # Separators between documents inside a sequence are specials.
    inner = sum(int(seq.special_mask.sum()) - len(prefix) - len(suffix) for seq in sequences)
    assert inner <= len(docs) - 1


def test_pack_splits_a_unit_longer_than_a_sequence():
    long_word = DocPieces(np.arange(10, 60, dtype=np.int64), np.zeros(50, dtype=np.int64))
    short = DocPieces(np.array([7, 8, 9]), np.array([0, 1, 1]))
    sequences = list(pack_sequences([short, long_word, short], 16, [2], [3]))
    content = [i for seq in sequences for i, s in zip(seq.ids.tolist(), seq.special_mask.tolist()) if not s]
    assert content == [7, 8, 9] + list(range(10, 60)) + [7, 8, 9]
    assert all(len(seq) <= 16 for seq in sequences)
    with pytest.raises(ConfigError, match="seq_len"):
        list(pack_sequences([short], 3, [2], [3]))


def test_pack_without_specials_gpt2_style():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    sequences = list(pack_sequences(docs, 4, [], [], separator_ids=[99]))
    # The separator goes between documents inside a sequence, never at its end;
    # plain id lists make every piece a unit, so a document may continue in the next.
    assert [s.ids.tolist() for s in sequences] == [[10, 11, 12], [20, 21, 99, 30], [31, 32, 33, 34]]
    assert [s.word_ids.tolist() for s in sequences] == [[0, 1, 2], [0, 1, -1, 2], [0, 1, 2, 3]]


def test_collate_pads(bert_tokenizer):
    sequences = list(pack_sequences(encoded(bert_tokenizer), 24, bert_tokenizer.prefix_ids, bert_tokenizer.suffix_ids))
    batch = collate(sequences[-3:], bert_tokenizer.pad_id, pad_to=30)
    assert batch["input_ids"].shape == (3, 30) and batch["input_ids"].dtype == torch.long
    padding = batch["attention_mask"] == 0
    assert padding.any()
    assert (batch["input_ids"][padding] == bert_tokenizer.pad_id).all()
    assert batch["special_mask"][padding].all() and (batch["word_ids"][padding] == -1).all()
    assert (batch["token_type_ids"] == 0).all() and "next_sentence_label" not in batch
    # The batch masks as it is: nothing chosen at specials or padding.
    generator = torch.Generator().manual_seed(0)
    _, labels = mask_for_mlm(batch["input_ids"], special_mask=batch["special_mask"], word_ids=batch["word_ids"],
                             mode="word", mask_id=mask_id_of(bert_tokenizer), vocab_size=bert_tokenizer.max_id + 1,
                             generator=generator, special_ids=special_ids_of(bert_tokenizer))
    assert ((labels != IGNORE_INDEX) <= ~batch["special_mask"]).all()


def test_special_and_mask_ids(tokenizer):
    specials = special_ids_of(tokenizer)
    mask_id = mask_id_of(tokenizer)
    assert mask_id in specials and set(tokenizer.prefix_ids) <= specials and tokenizer.pad_id in specials
    assert tokenizer.tokenizer.id_to_token(mask_id) in ("[MASK]", "<mask>")


# -- NSP -------------------------------------------------------------------------------------------
def test_sentences_from_spacy(bert_tokenizer):
    docs = encoded(bert_tokenizer, sentences=True)
    index = TEXTS.index("Dr. Smith went to Washington. He arrived late! Nobody waited for him? The end.")
    sentences = docs[index].sentences()
    assert len(sentences) == 4
    assert np.concatenate([s.ids for s in sentences]).tolist() == docs[index].ids.tolist()
    assert all(s.word_ids[0] == 0 for s in sentences)


def test_nsp_pairs(bert_tokenizer):
    rng = np.random.default_rng(0)
    # 200 documents of 3-8 sentences of 3-12 pieces.
    docs = [
        [list(rng.integers(10, 300, size=int(rng.integers(3, 13)))) for _ in range(int(rng.integers(3, 9)))]
        for _ in range(200)
    ]
    seq_len = 40
    pairs = list(make_nsp_pairs(docs, seq_len, random.Random(0), prefix_ids=[2], sep_ids=[3]))
    assert len(pairs) > 300
    share = np.mean([pair.is_next for pair in pairs])
    assert 0.44 < share < 0.56, share
    for pair in pairs:
        ids, types, is_next = pair
        assert len(ids) <= seq_len and ids[0] == 2 and ids[-1] == 3
        seps = np.flatnonzero(ids == 3)
        assert len(seps) == 2 and seps[0] >= 2 and seps[1] > seps[0] + 1
        assert types.tolist() == [0] * (seps[0] + 1) + [1] * (len(ids) - seps[0] - 1)
        assert pair.special_mask.tolist() == [i in (0, seps[0], seps[1]) for i in range(len(ids))]
    again = list(make_nsp_pairs(docs, seq_len, random.Random(0), prefix_ids=[2], sep_ids=[3]))
    assert all(np.array_equal(a.ids, b.ids) and a.is_next == b.is_next for a, b in zip(pairs, again))
    batch = collate(pairs[:4], 0)
    assert batch["next_sentence_label"].tolist() == [0 if p.is_next else 1 for p in pairs[:4]]
    assert batch["token_type_ids"].sum() > 0


def test_nsp_segments_come_from_the_right_documents():
    rng = np.random.default_rng(1)
    docs = [[list(rng.integers(10, 300, size=int(rng.integers(3, 7)))) for _ in range(int(rng.integers(2, 6)))]
            for _ in range(100)]
    where = {tuple(sentence[:3]): (d, s) for d, doc in enumerate(docs) for s, sentence in enumerate(doc)}
    assert len(where) == sum(len(doc) for doc in docs)  # sentence starts are unambiguous

    def locate(segment):
        """(document, first sentence, n sentences) of a run of whole consecutive sentences."""
        d, s = where[tuple(segment[:3])]
        taken, k = [], s
        while len(taken) < len(segment):
            taken += docs[d][k]
            k += 1
        assert taken == segment
        return d, s, k - s

    # Long sequences and no short targets: nothing is trimmed.
    pairs = list(make_nsp_pairs(docs, 512, random.Random(0), prefix_ids=[2], sep_ids=[3], short_seq_prob=0.0))
    assert 0.4 < np.mean([p.is_next for p in pairs]) < 0.6
    for pair in pairs:
        sep = int(np.flatnonzero(pair.ids == 3)[0])
        doc_a, first_a, n_a = locate(pair.ids[1:sep].tolist())
        doc_b, first_b, _ = locate(pair.ids[sep + 1 : -1].tolist())
        if pair.is_next:  # B: the sentences right after A
            assert (doc_b, first_b) == (doc_a, first_a + n_a)
        else:  # B: consecutive sentences of another document
            assert doc_b != doc_a


def test_nsp_from_real_text(bert_tokenizer):
    docs = encoded(bert_tokenizer, TEXTS * 3, sentences=True)
    pairs = list(make_nsp_pairs(sentence_pieces(docs), 32, random.Random(1), prefix_ids=bert_tokenizer.prefix_ids,
                                sep_ids=bert_tokenizer.suffix_ids))
    assert pairs and all(len(p) <= 32 for p in pairs)
    assert all(isinstance(p, NspPair) and (p.word_ids[~p.special_mask] >= 0).all() for p in pairs)
    # One document only: no random B exists, so every pair is a real next pair.
    single = list(make_nsp_pairs([sentence_pieces(docs)[12]], 64, random.Random(0), prefix_ids=[2], sep_ids=[3]))
    assert single and all(p.is_next for p in single)


# -- raw text and bad input --------------------------------------------------------------------------
def test_read_txt_jsonl_and_skips(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes("\ufeffFirst doc.\r\n\n   \nSecond doc\n".encode("utf8"))
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(
        b'{"text": "good one"}\n'
        b'{"body": "no text key"}\n'
        b"{not json\n"
        b'{"text": "caf\xe9 latin-1"}\n'
        b'{"text": 42}\n'
        b"[1, 2]\n"
        b'{"text": "   "}\n'
        b'{"text": "last good \xc3\xa9"}\n'
        b'{"text": "cut emoji \\ud83d"}\n'
    )
    raw = read_raw_texts([txt, jsonl])
    items = list(raw)
    assert [t.text for t in items] == ["First doc.", "Second doc", "good one", "last good é"]
    assert items[0] == RawText(f"{txt}:1", "First doc.") and items[-1].source == f"{jsonl}:8"
    reasons = {(Path(s.file).name, s.line): s.reason for s in raw.skipped}
    assert reasons[("a.txt", 2)] == "empty line" and reasons[("a.txt", 3)] == "empty line"
    assert reasons[("b.jsonl", 2)].startswith("missing text key")
    assert reasons[("b.jsonl", 3)].startswith("invalid JSON")
    assert reasons[("b.jsonl", 4)].startswith("not UTF-8")
    assert reasons[("b.jsonl", 5)].startswith("text is not a string")
    assert reasons[("b.jsonl", 6)].startswith("not a JSON object")
    assert reasons[("b.jsonl", 7)] == "empty line"
    assert reasons[("b.jsonl", 9)].startswith("invalid Unicode (lone surrogate U+D83D")
    assert raw.stats.documents == 4 and raw.stats.skipped == 9
    assert "4 documents" in raw.stats.summary() and "9 line(s) skipped" in raw.stats.summary()
    # Re-iterable, same order, and the text key is configurable.
    assert [t.text for t in raw] == [t.text for t in items]
    other = tmp_path / "c.jsonl"
    other.write_text(json.dumps({"body": "x y"}) + "\n")
    assert list(read_raw_texts(other, text_key="body").texts()) == ["x y"]


def test_spacy_docbin(tmp_path):
    nlp = spacy.blank("en")
    doc_bin = DocBin()
    for text in ("One doc here.", "Another  one.", " "):
        doc_bin.add(nlp.make_doc(text))
    path = tmp_path / "docs.spacy"
    doc_bin.to_disk(path)
    raw = read_raw_texts(path)
    assert list(raw.texts()) == ["One doc here.", "Another  one."]
    assert raw.skipped[0].line == 3 and raw.skipped[0].reason == "empty line"
    broken = tmp_path / "broken.spacy"
    broken.write_bytes(b"not a docbin at all")
    with pytest.raises(RawTextError, match="broken.spacy.*DocBin"):
        read_raw_texts(broken)


def test_directory_of_files(tmp_path):
    (tmp_path / "b.txt").write_text("from b\n")
    (tmp_path / "a.jsonl").write_text('{"text": "from a"}\n')
    (tmp_path / "notes.md").write_text("ignored\n")
    assert list(read_raw_texts(tmp_path).texts()) == ["from a", "from b"]


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.txt", b"", r"empty\.txt: no document in this file \(0 documents\)"),
        ("blank.txt", b"\n   \n\t\n", r"blank\.txt: no document.*3\+ line\(s\) skipped.*empty line"),
        ("bad.jsonl", b"nope\n{\"x\": 1}\n", r"bad\.jsonl: no document.*invalid JSON"),
        ("latin1.txt", "Café\n".encode("latin-1"), r"latin1\.txt: no document.*not UTF-8"),
        ("data.csv", b"text\nhello\n", r"data\.csv: unknown raw-text format"),
    ],
)
def test_files_without_documents(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RawTextError, match=match) as info:
        read_raw_texts([path])
    assert isinstance(info.value, SpacyCtxError) and isinstance(info.value, ConfigError)


def test_missing_file(tmp_path):
    with pytest.raises(RawTextError, match=r"nowhere\.txt: raw-text file not found"):
        read_raw_texts([tmp_path / "nowhere.txt"])


def test_one_bad_file_among_good_names_the_bad_one(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RawTextError, match="empty.jsonl"):
        read_raw_texts([good, empty])


def test_million_character_lines(tmp_path, bert_tokenizer):
    words = ("lorem ipsum dolor sit amet " * 40_000)[:1_000_000]
    path = tmp_path / "huge.txt"
    path.write_text("before\n" + words + "\n" + "x" * 1_000_000 + "\nafter\n")
    raw = read_raw_texts(path)  # max_chars = 100_000
    items = list(raw)
    assert items[0].text == "before" and items[-1].text == "after"
    assert all(len(item.text) <= 100_000 for item in items)
    assert raw.stats.chunked_lines == 2 and raw.stats.chunks == len(items) - 2
    assert "2 long line(s) cut into" in raw.stats.summary()
    spaced = [item.text for item in items if item.source.startswith(f"{path}:2#")]
    assert " ".join(spaced).split() == words.split()  # cut at whitespace: no word lost or split
    hard = [item.text for item in items if item.source.startswith(f"{path}:3#")]
    assert "".join(hard) == "x" * 1_000_000 and len(hard) == 10
    # A chunk goes through the tokenizer and packing without trouble.
    docs = list(encode_documents([spaced[0][:20_000]], bert_tokenizer, spacy.blank("en").make_doc))
    sequences = list(pack_sequences(docs, 128, bert_tokenizer.prefix_ids, bert_tokenizer.suffix_ids))
    assert sum(int((~s.special_mask).sum()) for s in sequences) == len(docs[0].ids)


def test_chunk_text():
    assert chunk_text("aaa bbb ccc", 7) == ["aaa bbb", "ccc"]
    assert chunk_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    assert chunk_text("  a  ", 10) == ["a"]


def test_split_heldout(tmp_path):
    texts = [f"document number {i}" for i in range(2000)]
    train, heldout = split_heldout(texts, 0.1, seed=3)
    train_list, heldout_list = list(train), list(heldout)
    assert sorted(train_list + heldout_list) == sorted(texts)
    assert 150 < len(heldout_list) < 250
    # By content: order and the other texts do not matter; the seed does.
    _, reversed_heldout = split_heldout(texts[::-1], 0.1, seed=3)
    assert sorted(reversed_heldout) == sorted(heldout_list)
    assert all(is_heldout(t, 0.1, 3) for t in heldout_list)
    assert list(split_heldout(texts, 0.1, seed=4)[1]) != heldout_list
    # RawTexts work too, and the views re-iterate.
    path = tmp_path / "t.txt"
    path.write_text("\n".join(texts[:100]) + "\n")
    raw_train, raw_heldout = split_heldout(read_raw_texts(path), 0.1, seed=3)
    assert [t.text for t in raw_heldout] == [t for t in texts[:100] if is_heldout(t, 0.1, 3)]
    assert len(list(raw_train)) + len(list(raw_heldout)) == 100
    with pytest.raises(ConfigError):
        split_heldout(texts, 1.0)
    with pytest.raises(ConfigError, match="re-iterable"):
        split_heldout(iter(texts), 0.1)


def test_pieces_without_a_word_are_units_of_their_own():
    generator = torch.Generator().manual_seed(0)
    chosen = maskable = 0
    for index in range(60):
        batch = synthetic_batch(index)
        words = torch.where(batch["special_mask"], batch["word_ids"], torch.full_like(batch["word_ids"], -1))
        for mode in ("word", "span"):
            _, labels = mask_for_mlm(batch["input_ids"], special_mask=batch["special_mask"], word_ids=words,
                                     mode=mode, mask_id=MASK_ID, vocab_size=VOCAB, generator=generator)
            assert not ((labels != IGNORE_INDEX) & batch["special_mask"]).any()
            chosen += int((labels != IGNORE_INDEX).sum())
            maskable += int((~batch["special_mask"]).sum())
    assert abs(chosen / maskable - 0.15) < 0.01
