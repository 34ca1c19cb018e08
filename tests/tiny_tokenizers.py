"""Tiny tokenizers of every family's kind, trained on the fly and saved like real checkpoints.

``write_tokenizer(model_type, path)`` trains a small WordPiece, byte-level BPE or
Unigram (Metaspace) tokenizer with the ``tokenizers`` library on a fixed corpus
(accented, CJK and emoji text included), wraps it in the family's ``transformers``
fast tokenizer class and writes it with ``save_pretrained``, so the directory
holds what a real checkpoint holds (``tokenizer.json``, ``tokenizer_config.json``,
special tokens). Special-token ids follow the order of the real checkpoints:

- BERT/DistilBERT/ELECTRA: ``[PAD]``=0, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``;
- RoBERTa: ``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, ``<mask>`` last;
- XLM-R: fairseq order ``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, ``<mask>`` last;
- CamemBERT: ``<s>NOTUSED``=0 ``<pad>``=1 ``</s>NOTUSED``=2 ``<unk>``=3, then
  ``<unk>NOTUSED``, ``<s>``, ``</s>``, ``<mask>`` last;
- DeBERTa-v3: ``[PAD]``=0 ``[CLS]``=1 ``[SEP]``=2 ``[UNK]``=3, ``[MASK]`` last;
- ModernBERT: BPE pieces first, then ``[UNK]`` ``[CLS]`` ``[SEP]`` ``[PAD]`` ``[MASK]``;
- GPT-2: BPE pieces, then ``<|endoftext|>`` (bos = eos = unk), no pad token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE, Unigram, WordPiece

MODEL_TYPES = (
    "bert",
    "distilbert",
    "electra",
    "roberta",
    "xlm-roberta",
    "camembert",
    "deberta-v2",
    "modernbert",
    "gpt2",
)

#: Tokenizer kind of every model type (what ``PieceTokenizer.kind`` must say).
KINDS = {
    "bert": "wordpiece",
    "distilbert": "wordpiece",
    "electra": "wordpiece",
    "roberta": "bpe",
    "modernbert": "bpe",
    "gpt2": "bpe",
    "xlm-roberta": "unigram",
    "camembert": "unigram",
    "deberta-v2": "unigram",
}

CORPUS: List[str] = [
    "The bank raised interest rates. We sat on the river bank and watched the water.",
    "Apple is looking at buying a U.K. startup for $1 billion, said the report on Monday.",
    "San Francisco considers banning sidewalk delivery robots; London and Paris wait.",
    "I don't think it's done yet, isn't it? They'll see what we've got.",
    "Crème brûlée, naïve façade, Ångström, São Paulo, Dvořák and Zürich's café.",
    "Müller traf Øresund-Fahrer in Kraków; señor Ñúñez llegó à Besançon.",
    "東京は日本の首都です。北京欢迎你！ 서울은 한국의 수도입니다.",
    "Launch 🚀🚀 today 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 hearts ❤️💙",
    "See https://example.com/path?q=1&r=two#frag or www.test.org/x_y #hashtag @user",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 50% and symbols (){}[]<>-_=+*/\\|",
    "مرحبا بالعالم שלום עולם Привет мир Γειά σου κόσμε",
    "the quick brown fox jumps over the lazy dog THE QUICK BROWN FOX",
]


def _wordpiece(lowercase: bool) -> Tokenizer:
    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def _byte_bpe(leading: List[str], trailing: List[str]) -> Tokenizer:
    """Byte-level BPE with ``leading`` specials at ids 0.. and ``trailing`` ones last."""
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=leading,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    if trailing:
        tokenizer.add_special_tokens(trailing)
    return tokenizer


def _unigram(leading: List[str], trailing: List[str], unk: str) -> Tokenizer:
    """SentencePiece-style Unigram with Metaspace, ``leading`` specials at ids 0.."""
    tokenizer = Tokenizer(Unigram())
    # The pipeline transformers 5 rebuilds for these families (it keeps only a
    # Precompiled normalizer, which needs sentencepiece to produce).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=500, special_tokens=leading, unk_token=unk, show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    if trailing:
        tokenizer.add_special_tokens(trailing)
    return tokenizer


def _build(model_type: str):
    """The trained ``tokenizers.Tokenizer`` wrapped in the family's transformers class."""
    import transformers as tf

    if model_type in ("bert", "distilbert", "electra"):
        cls = {
            "bert": tf.BertTokenizerFast,
            "distilbert": tf.DistilBertTokenizerFast,
            "electra": tf.ElectraTokenizerFast,
        }[model_type]
        return cls(tokenizer_object=_wordpiece(lowercase=True), do_lower_case=True)
    if model_type == "roberta":
        tokenizer = _byte_bpe(["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"])
        tokenizer.post_processor = processors.RobertaProcessing(
            ("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False
        )
        return tf.RobertaTokenizerFast(tokenizer_object=tokenizer, add_prefix_space=False)
    if model_type == "gpt2":
        tokenizer = _byte_bpe([], ["<|endoftext|>"])
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        return tf.GPT2TokenizerFast(
            tokenizer_object=tokenizer,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
        )
    if model_type == "modernbert":
        specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
        tokenizer = _byte_bpe([], specials)
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        return tf.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            pad_token="[PAD]",
            mask_token="[MASK]",
        )
    if model_type == "xlm-roberta":
        tokenizer = _unigram(["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"], "<unk>")
        _sentence_template(tokenizer, "<s>", "</s>", roberta_pair=True)
        return tf.XLMRobertaTokenizerFast(tokenizer_object=tokenizer)
    if model_type == "camembert":
        leading = ["<s>NOTUSED", "<pad>", "</s>NOTUSED", "<unk>", "<unk>NOTUSED", "<s>", "</s>"]
        tokenizer = _unigram(leading, ["<mask>"], "<unk>")
        _sentence_template(tokenizer, "<s>", "</s>", roberta_pair=True)
        return tf.CamembertTokenizerFast(tokenizer_object=tokenizer)
    if model_type == "deberta-v2":
        tokenizer = _unigram(["[PAD]", "[CLS]", "[SEP]", "[UNK]"], ["[MASK]"], "[UNK]")
        _sentence_template(tokenizer, "[CLS]", "[SEP]", roberta_pair=False)
        return tf.DebertaV2TokenizerFast(tokenizer_object=tokenizer)
    raise ValueError(f"unknown model_type {model_type!r}; known: {', '.join(MODEL_TYPES)}")


def _sentence_template(tokenizer: Tokenizer, first: str, last: str, *, roberta_pair: bool) -> None:
    ids = [(first, tokenizer.token_to_id(first)), (last, tokenizer.token_to_id(last))]
    pair = f"{first} $A {last} {last} $B {last}" if roberta_pair else f"{first} $A {last} $B:1 {last}:1"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}", pair=pair, special_tokens=ids
    )


def write_tokenizer(model_type: str, path: Union[str, Path]) -> Dict[str, Optional[int]]:
    """Train a tiny tokenizer of ``model_type``'s kind and save it into ``path``.

    Returns the ids a ``config.json`` needs: ``vocab_size`` (largest id + 1) and
    ``pad/bos/eos/cls/sep_token_id`` (None where the family has no such token).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _build(model_type).save_pretrained(str(path))
    # Save what transformers loads back: some classes rebuild parts of the pipeline
    # from their own defaults, and tokenizer.json must be what HF really runs.
    hf = AutoTokenizer.from_pretrained(str(path))
    hf.save_pretrained(str(path))
    vocab = hf.get_vocab()
    ids: Dict[str, Any] = {"vocab_size": max(vocab.values()) + 1}
    for role in ("pad", "bos", "eos", "cls", "sep"):
        token = getattr(hf, f"{role}_token", None)
        ids[f"{role}_token_id"] = None if token is None else vocab.get(str(token))
    return ids
