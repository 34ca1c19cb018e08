"""Per-token piece counts equal HF's fast tokenizer on the same pre-split words."""

import numpy as np
import pytest
import spacy

from spacy_ctx.pieces.wordpiece import WordPieceTokenizer

from .bert_utils import write_tiny_bert

transformers = pytest.importorskip("transformers")

TEXTS = {
    "punctuation": "Well...!?! (yes) -- no; 'quoted' \"double\" a/b/c $5.00 50% #tag @user",
    "accented": "Crème brûlée, naïve façade, Ångström, São Paulo, Dvořák",
    "cjk": "東京は日本の首都です。北京欢迎你！",
    "emoji": "Launch 🚀🚀 today 😀👍🏽 family 👨‍👩‍👧",
    "url": "See https://example.com/path?q=1&r=two#frag or www.test.org/x_y",
    "whitespace": "two  spaces\tand\ttabs\n\nnew lines   end",
    "control": "bell\x07 null\x00 zero\u200bwidth soft\u00adhyphen",
    "long_token": "x" * 300 + " short",
}


def _hf_counts(tokenizer, words):
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    counts = np.zeros(len(words), dtype=np.int32)
    for word in enc.word_ids():
        if word is not None:
            counts[word] += 1
    return enc["input_ids"], counts


def _check(model_dir, texts):
    nlp = spacy.blank("en")
    ours = WordPieceTokenizer.from_pretrained_dir(model_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    docs_words = [[t.text for t in nlp(text)] for text in texts]
    for words, (ids, counts) in zip(docs_words, ours.encode(docs_words)):
        hf_ids, hf_counts = _hf_counts(theirs, words)
        np.testing.assert_array_equal(counts, hf_counts, err_msg=repr(words))
        assert ids.tolist() == hf_ids
        assert counts.sum() == len(ids)


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_minilm_alignment(minilm, kind):
    _check(minilm, [TEXTS[kind]])


@pytest.mark.parametrize("files", [("vocab.txt",), ("tokenizer.json",)])
@pytest.mark.parametrize("lowercase", [True, False])
def test_tiny_alignment_vocab_and_tokenizer_json(tmp_path, files, lowercase):
    model_dir = write_tiny_bert(tmp_path / "m", tokenizer_files=files, lowercase=lowercase)
    _check(model_dir, list(TEXTS.values()))


def test_tokenizer_config_overrides_tokenizer_json(tmp_path):
    """tokenizer_config.json's do_lower_case wins over tokenizer.json, as in HF."""
    model_dir = write_tiny_bert(tmp_path / "m", tokenizer_files=("tokenizer.json",), lowercase=True)
    (model_dir / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    ours = WordPieceTokenizer.from_pretrained_dir(model_dir)
    [(ids, _)] = ours.encode([["Apple"]])
    [(ids_lower, _)] = ours.encode([["apple"]])
    assert ids.tolist() != ids_lower.tolist()


def test_whitespace_tokens_have_no_pieces(minilm):
    nlp = spacy.blank("en")
    doc = nlp("a  b\n\nc")
    ours = WordPieceTokenizer.from_pretrained_dir(minilm)
    [(_, counts)] = ours.encode([[t.text for t in doc]])
    for token, count in zip(doc, counts):
        assert (count == 0) == token.is_space


def test_unknown_token_gets_unk(tiny_bert_dir):
    ours = WordPieceTokenizer.from_pretrained_dir(tiny_bert_dir)
    [(ids, counts)] = ours.encode([["Ωμέγα"]])
    assert ours.unk_id in ids.tolist()
    assert counts.tolist() == [len(ids)]
