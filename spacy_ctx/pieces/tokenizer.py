"""A checkpoint's own tokenizer (WordPiece, byte-level BPE, Unigram) through ``tokenizers``.

:class:`PieceTokenizer` loads what a Hugging Face checkpoint directory ships:

- ``tokenizer.json`` (any kind, used as is: it carries the normalizer, the
  pre-tokenizer, added tokens, and for XLM-R/CamemBERT/DeBERTa-v3 the fairseq id
  mapping);
- else ``vocab.json`` + ``merges.txt``: a byte-level BPE tokenizer (RoBERTa,
  GPT-2, ModernBERT) with the ``add_prefix_space`` of ``tokenizer_config.json``;
- else ``vocab.txt``: a BERT WordPiece tokenizer;
- a SentencePiece ``.model`` file alone is refused with the command that writes
  ``tokenizer.json``.

For WordPiece, ``tokenizer_config.json`` (``do_lower_case``, ``strip_accents``,
``tokenize_chinese_chars``) overrides the normalizer, as ``transformers`` does.

The special tokens around every window (``prefix_ids``, ``suffix_ids``) come from
the tokenizer itself: a probe is encoded with its post-processor and the ids
before and after the content are read off (``[CLS] x [SEP]``, ``<s> x </s>``,
nothing for GPT-2). Without a post-processor they come from
``tokenizer_config.json``/``special_tokens_map.json`` (cls/sep, else bos/eos) and
the family's defaults. How pieces align to spaCy tokens is documented in
:mod:`spacy_ctx.pieces.alignment`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, WordPiece

from ..errors import CheckpointError
from .alignment import align_offsets, doc_token_spans, trim_offsets

TOKENIZER_FILE = "tokenizer.json"
SETTINGS_FILE = "pieces.json"
KINDS = ("wordpiece", "bpe", "unigram")
SENTENCEPIECE_FILES = ("sentencepiece.bpe.model", "spm.model", "spiece.model", "tokenizer.model")

# Family defaults for checkpoints whose tokenizer has no post-processor and whose
# config names no cls/sep/bos/eos: (prefix token, suffix token), None = no specials.
FAMILY_SPECIALS: Dict[str, Optional[Tuple[str, str]]] = {
    "bert": ("[CLS]", "[SEP]"),
    "distilbert": ("[CLS]", "[SEP]"),
    "electra": ("[CLS]", "[SEP]"),
    "deberta-v2": ("[CLS]", "[SEP]"),
    "modernbert": ("[CLS]", "[SEP]"),
    "roberta": ("<s>", "</s>"),
    "xlm-roberta": ("<s>", "</s>"),
    "camembert": ("<s>", "</s>"),
    "gpt2": None,
}
_MODEL_KINDS = {"WordPiece": "wordpiece", "BPE": "bpe", "Unigram": "unigram"}
_ROLES = ("cls_token", "sep_token", "bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


class PieceTokenizer:
    """Encode Doc texts to piece ids aligned to spaCy tokens; specials are added by
    the windowing code from :attr:`prefix_ids` and :attr:`suffix_ids`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        prefix_ids: Sequence[int],
        suffix_ids: Sequence[int],
        pad_id: int = 0,
        unk_id: Optional[int] = None,
        source: Optional[Union[str, Path]] = None,
    ) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        # The file the tokenizer was read from, for error messages (None: built in memory).
        self.source = None if source is None else str(source)
        self.kind = _kind_of(tokenizer, self.source)
        self.prefix_ids: List[int] = [int(i) for i in prefix_ids]
        self.suffix_ids: List[int] = [int(i) for i in suffix_ids]
        self.pad_id = int(pad_id)
        self.unk_id = None if unk_id is None else int(unk_id)
        for role, ids in (("prefix", self.prefix_ids), ("suffix", self.suffix_ids), ("pad", [self.pad_id])):
            for token_id in ids:
                if not 0 <= token_id <= max(self.max_id, 0):
                    where = f"{self.source}: " if self.source else ""
                    raise CheckpointError(
                        f"{where}{role} token id {token_id} is outside the tokenizer's ids "
                        f"(0..{self.max_id}); the tokenizer files do not belong together."
                    )

    # -- properties -----------------------------------------------------------------
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

    @property
    def n_specials(self) -> int:
        """Specials added around every window (2 for BERT/RoBERTa, 0 for GPT-2)."""
        return len(self.prefix_ids) + len(self.suffix_ids)

    # -- encoding ---------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Piece ids (int64) and trimmed character spans ((n, 2) int64) of each text."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [
            (np.asarray(enc.ids, dtype=np.int64), trim_offsets(text, enc.offsets))
            for text, enc in zip(texts, encodings)
        ]

    def encode_docs(self, docs: Sequence) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Encode each Doc's text; returns ``(ids, piece_counts, piece_index)`` per Doc.

        See :mod:`spacy_ctx.pieces.alignment` for the rule: ``ids`` are all pieces
        of ``doc.text`` (no specials), ``piece_counts`` the pieces of each token
        (int32) and ``piece_index`` the piece positions each token uses, in token
        order (int64, length ``piece_counts.sum()``).
        """
        results = []
        for doc, (ids, spans) in zip(docs, self.encode_texts([doc.text for doc in docs])):
            starts, ends, is_space = doc_token_spans(doc)
            counts, index = align_offsets(spans, starts, ends, is_space)
            results.append((ids, counts, index))
        return results

    # -- loading and saving -------------------------------------------------------------
    @classmethod
    def from_pretrained_dir(
        cls, model_dir: Union[str, Path], model_type: Optional[str] = None
    ) -> "PieceTokenizer":
        """Load from a Hugging Face checkpoint directory.

        ``model_type`` (default: read from ``config.json``) picks the family's
        default specials when the tokenizer has no post-processor.
        """
        model_dir = Path(model_dir)
        settings = _read_json(model_dir / "tokenizer_config.json")
        special_map = _read_json(model_dir / "special_tokens_map.json")
        if model_type is None:
            model_type = _read_json(model_dir / "config.json").get("model_type")
        names = _special_names(settings, special_map)
        if (model_dir / TOKENIZER_FILE).is_file():
            source = model_dir / TOKENIZER_FILE
            try:
                tokenizer = Tokenizer.from_file(str(source))
            except Exception as err:  # the Rust library raises plain Exception
                raise CheckpointError(f"{source}: not a valid tokenizers file ({err}).") from err
            _apply_normalizer_settings(tokenizer, settings)
        elif (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
            source = model_dir / "vocab.json"
            tokenizer = _byte_bpe_from_files(model_dir, settings)
            _add_specials(tokenizer, settings, names, model_dir)
        elif (model_dir / "vocab.txt").is_file():
            source = model_dir / "vocab.txt"
            tokenizer = _wordpiece_from_vocab(source, settings, names)
            _add_specials(tokenizer, settings, names, model_dir)
        else:
            spm = [name for name in SENTENCEPIECE_FILES if (model_dir / name).is_file()]
            if spm:
                raise CheckpointError(
                    f"{model_dir / spm[0]}: a SentencePiece model file alone is not supported; "
                    f"spacy-ctx needs {TOKENIZER_FILE}. Write it once with transformers and "
                    "sentencepiece installed (works offline): python -c \"from transformers "
                    f"import AutoTokenizer; AutoTokenizer.from_pretrained('{model_dir}')"
                    f".save_pretrained('{model_dir}')\""
                )
            raise CheckpointError(
                f"{model_dir}: no tokenizer files found; a checkpoint directory needs "
                f"{TOKENIZER_FILE}, or vocab.json + merges.txt (byte-level BPE), or vocab.txt "
                "(WordPiece)."
            )
        # Some tokenizer.json files switch on padding and truncation (all-MiniLM-L6-v2
        # pads to 128); neither may touch the probe or the documents.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        prefix, suffix = _probe_specials(tokenizer)
        if prefix is None:
            prefix, suffix = _configured_specials(tokenizer, names, model_type, source)
        return cls(
            tokenizer,
            prefix_ids=prefix,
            suffix_ids=suffix,
            pad_id=_token_id(tokenizer, names.get("pad_token"), 0),
            unk_id=_token_id(tokenizer, names.get("unk_token"), _model_unk_id(tokenizer)),
            source=source,
        )

    def to_dir(self, path: Union[str, Path]) -> None:
        """Write ``tokenizer.json`` and the specials (``pieces.json``) to a directory."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / TOKENIZER_FILE))
        settings = {
            "kind": self.kind,
            "prefix_ids": self.prefix_ids,
            "suffix_ids": self.suffix_ids,
            "pad_id": self.pad_id,
            "unk_id": self.unk_id,
        }
        (path / SETTINGS_FILE).write_text(json.dumps(settings, indent=2), "utf8")

    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> "PieceTokenizer":
        """Read what :meth:`to_dir` wrote, or the ``pieces.json`` of earlier versions
        (special-token names of a BERT WordPiece tokenizer)."""
        path = Path(path)
        settings_path = path / SETTINGS_FILE
        settings = _read_json(settings_path)
        try:
            tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as err:
            raise CheckpointError(f"{path / TOKENIZER_FILE}: cannot load tokenizer ({err}).") from err
        source = path / TOKENIZER_FILE
        if "prefix_ids" not in settings:
            return cls._from_old_settings(tokenizer, settings, settings_path, source)
        allowed = {"kind", "prefix_ids", "suffix_ids", "pad_id", "unk_id"}
        for key, value in settings.items():
            ok = key in allowed and (
                (key == "kind" and value in KINDS)
                or (key in ("prefix_ids", "suffix_ids") and isinstance(value, list)
                    and all(isinstance(v, int) for v in value))
                or (key == "pad_id" and isinstance(value, int))
                or (key == "unk_id" and (value is None or isinstance(value, int)))
            )
            if not ok:
                raise CheckpointError(
                    f"{settings_path}: unexpected entry {key!r}: {value!r}; expected kind "
                    f"(one of {KINDS}), prefix_ids/suffix_ids (lists of ids), pad_id, unk_id."
                )
        instance = cls(
            tokenizer,
            prefix_ids=settings["prefix_ids"],
            suffix_ids=settings.get("suffix_ids", []),
            pad_id=settings.get("pad_id", 0),
            unk_id=settings.get("unk_id"),
            source=source,
        )
        if "kind" in settings and settings["kind"] != instance.kind:
            raise CheckpointError(
                f"{settings_path}: kind {settings['kind']!r} but {source} is a "
                f"{instance.kind!r} tokenizer; the files come from different pipelines."
            )
        return instance

    @classmethod
    def _from_old_settings(
        cls, tokenizer: Tokenizer, settings: Dict[str, Any], settings_path: Path, source: Path
    ) -> "PieceTokenizer":
        roles = ("cls_token", "sep_token", "pad_token", "unk_token")
        for key, value in settings.items():
            if key not in roles or not isinstance(value, str):
                raise CheckpointError(
                    f"{settings_path}: unexpected entry {key!r}: {value!r}; it may only map "
                    f"{', '.join(roles)} to token strings (or hold prefix_ids/suffix_ids)."
                )
        names = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
        names.update(settings)
        ids = {}
        for role, token in names.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise CheckpointError(
                    f"{settings_path}: the {role} {token!r} is not in {source}; the files "
                    "come from different pipelines."
                )
            ids[role] = token_id
        return cls(
            tokenizer,
            prefix_ids=[ids["cls_token"]],
            suffix_ids=[ids["sep_token"]],
            pad_id=ids["pad_token"],
            unk_id=ids["unk_token"],
            source=source,
        )


#: The earlier name of :class:`PieceTokenizer` (WordPiece only).


# -- helpers ---------------------------------------------------------------------------------
def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf8"))
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}).") from err
    return data if isinstance(data, dict) else {}


def _kind_of(tokenizer: Tokenizer, source: Optional[str]) -> str:
    model_type = type(tokenizer.model).__name__  # no JSON round trip of a big vocabulary
    if model_type not in _MODEL_KINDS:
        where = source or "the tokenizer"
        raise CheckpointError(
            f"{where}: tokenizer model type {model_type!r} is not supported; expected one of "
            f"{', '.join(_MODEL_KINDS)} (WordPiece, byte-level BPE, Unigram/SentencePiece)."
        )
    return _MODEL_KINDS[model_type]


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_names(settings: Dict[str, Any], special_map: Dict[str, Any]) -> Dict[str, str]:
    """Special-token strings by role; tokenizer_config.json wins over special_tokens_map.json."""
    found: Dict[str, str] = {}
    for source in (special_map, settings):
        for role in _ROLES:
            text = _token_text(source.get(role))
            if text is not None:
                found[role] = text
    return found


def _token_id(tokenizer: Tokenizer, token: Optional[str], default: Optional[int]) -> Optional[int]:
    token_id = tokenizer.token_to_id(token) if token else None
    return default if token_id is None else token_id


def _model_unk_id(tokenizer: Tokenizer) -> Optional[int]:
    """The unknown-piece id the tokenizer model itself declares, if any."""
    token = getattr(tokenizer.model, "unk_token", None)  # WordPiece, BPE
    if isinstance(token, str):
        return tokenizer.token_to_id(token)
    if type(tokenizer.model).__name__ == "Unigram":
        unk_id = json.loads(tokenizer.to_str()).get("model", {}).get("unk_id")
        return unk_id if isinstance(unk_id, int) else None
    return None


def _probe_specials(tokenizer: Tokenizer) -> Tuple[Optional[List[int]], Optional[List[int]]]:
    """Ids the post-processor puts before and after a single sequence (None: unknown)."""
    if tokenizer.post_processor is None:
        return None, None
    for probe in ("a", "hello", "0", "x y", "é"):
        encoding = tokenizer.encode(probe, add_special_tokens=True)
        content = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
        if content:
            return list(encoding.ids[: content[0]]), list(encoding.ids[content[-1] + 1 :])
    return None, None


def _configured_specials(
    tokenizer: Tokenizer, names: Dict[str, str], model_type: Optional[str], source: Path
) -> Tuple[List[int], List[int]]:
    """Specials from the config files (cls/sep, else bos/eos), else the family default."""
    if model_type in FAMILY_SPECIALS and FAMILY_SPECIALS[model_type] is None:
        return [], []
    pairs = [(names.get("cls_token"), names.get("sep_token")), (names.get("bos_token"), names.get("eos_token"))]
    if model_type in FAMILY_SPECIALS:
        pairs.append(FAMILY_SPECIALS[model_type])  # type: ignore[arg-type]
    else:
        pairs.extend([("[CLS]", "[SEP]"), ("<s>", "</s>")])
    for first, last in pairs:
        if first and last:
            first_id, last_id = tokenizer.token_to_id(first), tokenizer.token_to_id(last)
            if first_id is not None and last_id is not None:
                return [first_id], [last_id]
    raise CheckpointError(
        f"{source}: cannot tell which special tokens frame a sequence: the tokenizer has no "
        f"post-processor and none of {[p for p in pairs if p[0]]} is in its vocabulary. Set "
        "cls_token and sep_token (or bos_token and eos_token) in tokenizer_config.json."
    )


def _add_specials(tokenizer: Tokenizer, settings: Dict[str, Any], names: Dict[str, str], model_dir: Path) -> None:
    """Register the special and added tokens of the config files, as transformers does,
    so that their strings in a text map to their ids.

    Entries come from ``added_tokens_decoder`` (tokenizer_config.json, with ids and
    flags), ``added_tokens.json`` (ids) and the special-token names. A token in the
    vocabulary keeps its id; one outside it must take the next free id.
    """
    entries: Dict[str, Tuple[Optional[int], Dict[str, bool]]] = {}
    decoder = settings.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for key, entry in decoder.items():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                flags = {
                    flag: bool(entry.get(flag, flag == "special"))
                    for flag in ("single_word", "lstrip", "rstrip", "normalized", "special")
                }
                entries[entry["content"]] = (int(key) if str(key).isdigit() else None, flags)
    added_path = model_dir / "added_tokens.json"
    for text, token_id in _read_json(added_path).items():
        if text not in entries and isinstance(token_id, int):
            entries[text] = (token_id, {"special": False, "normalized": True})
    for text in names.values():
        if text not in entries:
            entries[text] = (None, {"special": True, "normalized": False})

    def order(item: Tuple[str, Tuple[Optional[int], Dict[str, bool]]]) -> int:
        found = tokenizer.token_to_id(item[0])
        wanted = item[1][0]
        return found if found is not None else (wanted if wanted is not None else 1 << 62)

    for text, (wanted, flags) in sorted(entries.items(), key=order):
        found = tokenizer.token_to_id(text)
        if found is None and wanted is None:
            continue  # a special name the vocabulary lacks: nothing to register
        next_id = tokenizer.get_vocab_size(with_added_tokens=True)
        if found is None and wanted != next_id or found is not None and wanted not in (None, found):
            raise CheckpointError(
                f"{model_dir}: the added token {text!r} has id {wanted} in the config files "
                f"but {found if found is not None else next_id} in the vocabulary; the "
                "tokenizer files do not belong together."
            )
        token = AddedToken(text, **flags)
        if flags.get("special", True):
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])


def _byte_bpe_from_files(model_dir: Path, settings: Dict[str, Any]) -> Tokenizer:
    try:
        model = BPE.from_file(str(model_dir / "vocab.json"), str(model_dir / "merges.txt"))
    except Exception as err:
        raise CheckpointError(
            f"{model_dir / 'vocab.json'} / merges.txt: cannot build a BPE tokenizer ({err})."
        ) from err
    tokenizer = Tokenizer(model)
    add_prefix_space = bool(settings.get("add_prefix_space", False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _bert_normalizer(settings: Dict[str, Any]) -> normalizers.BertNormalizer:
    return normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
        strip_accents=settings.get("strip_accents"),
        lowercase=bool(settings.get("do_lower_case", True)),
    )


def _wordpiece_from_vocab(vocab_path: Path, settings: Dict[str, Any], names: Dict[str, str]) -> Tokenizer:
    vocab: Dict[str, int] = {}
    with vocab_path.open(encoding="utf8") as file_:
        for line in file_:
            token = line.rstrip("\n")
            if token and token not in vocab:
                vocab[token] = len(vocab)
    if not vocab:
        raise CheckpointError(f"{vocab_path}: the vocabulary is empty.")
    unk = names.get("unk_token", "[UNK]")
    tokenizer = Tokenizer(WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tokenizer.normalizer = _bert_normalizer(settings)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
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
