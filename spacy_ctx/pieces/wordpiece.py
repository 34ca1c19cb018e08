"""spaCy words -> WordPiece ids, with the per-word piece counts that align them.

Uses the Hugging Face ``tokenizers`` library (never a hand-written WordPiece), so
the pieces equal what ``BertTokenizerFast(words, is_split_into_words=True)``
produces. A word can yield zero pieces (whitespace tokens, control or zero-width
characters that the normalizer removes); its count is then 0 and the poolers
give it a zero vector.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from ..errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "pieces.json"


class WordPieceTokenizer:
    """Encode pre-split words to piece ids; specials are added by the windowing code."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        cls_token: str = "[CLS]",
        sep_token: str = "[SEP]",
        pad_token: str = "[PAD]",
        unk_token: str = "[UNK]",
        source: Optional[Union[str, Path]] = None,
    ) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        # The file the vocabulary was read from, for error messages (None: built in memory).
        self.source = None if source is None else str(source)
        self.special_tokens = {
            "cls_token": cls_token,
            "sep_token": sep_token,
            "pad_token": pad_token,
            "unk_token": unk_token,
        }
        ids = {}
        for role, token in self.special_tokens.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                where = f"{self.source}: " if self.source else ""
                raise CheckpointError(
                    f"{where}the tokenizer vocabulary has no {role} {token!r}; set it in "
                    "tokenizer_config.json / special_tokens_map.json."
                )
            ids[role] = token_id
        self.cls_id = ids["cls_token"]
        self.sep_id = ids["sep_token"]
        self.pad_id = ids["pad_token"]
        self.unk_id = ids["unk_token"]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        """The largest piece id the tokenizer can produce (added tokens included).

        This, not :attr:`vocab_size`, is what must fit the embedding table: ids need
        not be contiguous, so a small vocabulary can still hold a huge id.
        """
        ids = self.tokenizer.get_vocab(with_added_tokens=True).values()
        return max(ids, default=-1)

    def encode(self, docs_words: Sequence[Sequence[str]]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Encode several documents, each a list of words.

        Returns one ``(piece_ids, piece_counts)`` pair per document: int64 piece ids
        of the whole document (no specials) and int32 pieces per word, whose sum
        is ``len(piece_ids)``.
        """
        # The library rejects empty pre-tokenized inputs; those docs have no pieces.
        non_empty = [i for i, words in enumerate(docs_words) if len(words)]
        encodings = self.tokenizer.encode_batch(
            [list(docs_words[i]) for i in non_empty],
            is_pretokenized=True,
            add_special_tokens=False,
        )
        results: List[Tuple[np.ndarray, np.ndarray]] = [
            (np.zeros((0,), dtype=np.int64), np.zeros((len(words),), dtype=np.int32))
            for words in docs_words
        ]
        for i, encoding in zip(non_empty, encodings):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            word_ids = np.asarray(
                [-1 if w is None else w for w in encoding.word_ids], dtype=np.int64
            )
            if (word_ids < 0).any():  # added tokens without a word; should not happen
                keep = word_ids >= 0
                ids, word_ids = ids[keep], word_ids[keep]
            if len(word_ids) and np.any(np.diff(word_ids) < 0):
                raise RuntimeError("WordPiece output is not in word order; cannot align.")
            piece_counts = np.bincount(word_ids, minlength=len(docs_words[i])).astype(np.int32)
            results[i] = (ids, piece_counts)
        return results

    # -- loading and saving -------------------------------------------------
    @classmethod
    def from_pretrained_dir(cls, model_dir: Union[str, Path]) -> "WordPieceTokenizer":
        """Load from a Hugging Face checkpoint dir (``tokenizer.json`` or ``vocab.txt``).

        ``tokenizer_config.json`` settings (``do_lower_case``, ``strip_accents``,
        ``tokenize_chinese_chars``) override the normalizer, as the HF fast
        tokenizer does.
        """
        model_dir = Path(model_dir)
        settings = _read_json(model_dir / "tokenizer_config.json")
        specials = _special_tokens(settings, _read_json(model_dir / "special_tokens_map.json"))
        if (model_dir / TOKENIZER_FILE).is_file():
            try:
                tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
            except Exception as err:  # the Rust library raises plain Exception
                raise CheckpointError(
                    f"{model_dir / TOKENIZER_FILE}: not a valid tokenizers file ({err})."
                ) from err
            _apply_normalizer_settings(tokenizer, settings)
            source = model_dir / TOKENIZER_FILE
        elif (model_dir / "vocab.txt").is_file():
            tokenizer = _tokenizer_from_vocab(model_dir / "vocab.txt", settings, specials)
            source = model_dir / "vocab.txt"
        else:
            raise CheckpointError(
                f"{model_dir}: neither tokenizer.json nor vocab.txt found; a BERT checkpoint "
                "directory needs one of them."
            )
        return cls(tokenizer, **specials, source=source)

    def to_dir(self, path: Union[str, Path]) -> None:
        """Write ``tokenizer.json`` and the special-token names to a directory."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / TOKENIZER_FILE))
        (path / SETTINGS_FILE).write_text(json.dumps(self.special_tokens, indent=2), "utf8")

    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> "WordPieceTokenizer":
        """Read what :meth:`to_dir` wrote."""
        path = Path(path)
        specials = _read_json(path / SETTINGS_FILE)
        roles = ("cls_token", "sep_token", "pad_token", "unk_token")
        for key, value in specials.items():
            if key not in roles or not isinstance(value, str):
                raise CheckpointError(
                    f"{path / SETTINGS_FILE}: unexpected entry {key!r}: {value!r}; it may "
                    f"only map {', '.join(roles)} to token strings."
                )
        try:
            tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as err:
            raise CheckpointError(f"{path / TOKENIZER_FILE}: cannot load tokenizer ({err}).") from err
        return cls(tokenizer, **specials, source=path / TOKENIZER_FILE)


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf8"))
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}).") from err
    return data if isinstance(data, dict) else {}


def _special_tokens(settings: Dict[str, Any], special_map: Dict[str, Any]) -> Dict[str, str]:
    found = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
    for source in (special_map, settings):
        for role in found:
            value = source.get(role)
            if isinstance(value, dict):  # AddedToken serialised as a dict
                value = value.get("content")
            if isinstance(value, str):
                found[role] = value
    return found


def _bert_normalizer(settings: Dict[str, Any]) -> normalizers.BertNormalizer:
    return normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
        strip_accents=settings.get("strip_accents"),
        lowercase=bool(settings.get("do_lower_case", True)),
    )


def _tokenizer_from_vocab(
    vocab_path: Path, settings: Dict[str, Any], specials: Dict[str, str]
) -> Tokenizer:
    vocab: Dict[str, int] = {}
    with vocab_path.open(encoding="utf8") as file_:
        for line in file_:
            token = line.rstrip("\n")
            if token and token not in vocab:
                vocab[token] = len(vocab)
    if not vocab:
        raise CheckpointError(f"{vocab_path}: the vocabulary is empty.")
    tokenizer = Tokenizer(
        WordPiece(vocab, unk_token=specials["unk_token"], max_input_chars_per_word=100)
    )
    tokenizer.normalizer = _bert_normalizer(settings)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def _apply_normalizer_settings(tokenizer: Tokenizer, settings: Dict[str, Any]) -> None:
    """Rebuild a BertNormalizer whose flags disagree with tokenizer_config.json."""
    keys = ("do_lower_case", "strip_accents", "tokenize_chinese_chars")
    if not any(k in settings for k in keys):
        return
    state: Optional[Dict[str, Any]] = json.loads(tokenizer.to_str()).get("normalizer")
    if not state or state.get("type") != "BertNormalizer":
        return
    current = {
        "do_lower_case": state.get("lowercase"),
        "strip_accents": state.get("strip_accents"),
        "tokenize_chinese_chars": state.get("handle_chinese_chars"),
    }
    merged = {k: settings.get(k, current[k]) for k in keys}
    if merged != current:
        tokenizer.normalizer = _bert_normalizer(merged)
