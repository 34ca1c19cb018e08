"""Tiny random Hugging Face checkpoints of every family, for parity and loading tests.

:func:`write_tiny_model` builds a small random model with ``transformers`` and
saves it with ``save_pretrained``. The post-norm BERT-shaped families (bert,
roberta, xlm-roberta, camembert, electra, distilbert) are written here; the
others come from their own modules, imported only when asked for:
``deberta-v2`` from ``tests/tiny_deberta.py``, ``modernbert`` from
``tests/tiny_modernbert.py`` and ``gpt2`` from ``tests/tiny_gpt2.py``, each with
``write(path, *, seed=0, head=None, **overrides) -> Path``.

Tokenizer hook: if ``tests/tiny_tokenizers.py`` exists, its
``write_tokenizer(model_type, path) -> dict`` writes the family's tokenizer files
first and returns their ids (``vocab_size``, ``pad_token_id``, ``bos_token_id``,
``eos_token_id``, ...), which go into the model's config so that the model and
its tokenizer agree. Without it only weights and config are written.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

#: Writer module per model type that this file does not write itself.
OTHER_WRITERS = {"deberta-v2": "tiny_deberta", "modernbert": "tiny_modernbert", "gpt2": "tiny_gpt2"}
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert")

# Tiny settings per model type, in each family's own config keys.
_BERT = {
    "vocab_size": 100,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "hidden_act": "gelu",
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "pad_token_id": 0,
    "layer_norm_eps": 1e-12,
}
# RoBERTa-style: position ids start after pad_token_id, so 64 usable positions need 66.
_ROBERTA = {
    **_BERT,
    "max_position_embeddings": 66,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "layer_norm_eps": 1e-5,
}
SETTINGS: Dict[str, Dict[str, Any]] = {
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    # The discriminator's embeddings narrower than its layers: exercises the projection.
    "electra": {**_BERT, "embedding_size": 32},
    "distilbert": {
        "vocab_size": 100,
        "dim": 64,
        "n_layers": 3,
        "n_heads": 4,
        "hidden_dim": 128,
        "activation": "gelu",
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "sinusoidal_pos_embds": False,
    },
}
# Model class prefix per model type, and the head shorthands.
_CLASS_PREFIX = {
    "bert": "Bert",
    "roberta": "Roberta",
    "xlm-roberta": "XLMRoberta",
    "camembert": "Camembert",
    "electra": "Electra",
    "distilbert": "DistilBert",
}
_HEADS = {
    None: "Model",
    "mlm": "ForMaskedLM",
    "lm": "ForMaskedLM",
    "sequence": "ForSequenceClassification",
    "token": "ForTokenClassification",
    "qa": "ForQuestionAnswering",
    "pretraining": "ForPreTraining",
}


def model_class_name(model_type: str, head: Optional[str] = None) -> str:
    """The ``transformers`` class for ``head``: None (the bare ``*Model``), a
    shorthand (``"mlm"``, ``"sequence"``, ``"token"``, ``"qa"``, ``"pretraining"``)
    or a class name such as ``"RobertaForMaskedLM"``."""
    if head in _HEADS:
        return _CLASS_PREFIX[model_type] + _HEADS[head]
    return str(head)


def tokenizer_ids(model_type: str, path: Path) -> Dict[str, Any]:
    """Write the family's tokenizer into ``path`` with ``tests/tiny_tokenizers.py``
    and return its ids; ``{}`` while that module does not exist."""
    try:
        tiny_tokenizers = importlib.import_module(f"{__package__}.tiny_tokenizers")
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.tiny_tokenizers":
            raise
        return {}
    ids = tiny_tokenizers.write_tokenizer(model_type, path)
    return {k: v for k, v in ids.items() if v is not None}


def perturb(
    model: torch.nn.Module,
    *,
    is_norm: Callable[[str], bool],
    norm_scale: float = 0.1,
    bias_scale: float = 0.1,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Give the norm weights (parameters named ``*.weight`` with ``is_norm(name)``)
    and every bias small random offsets, ``norm_scale`` and ``bias_scale`` times a
    standard normal, so that parity checks exercise them (they start at 1 and 0).
    ``generator``: None draws from torch's global generator."""
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if is_norm(name) and name.endswith(".weight"):
                scale = norm_scale
            elif name.endswith(".bias"):
                scale = bias_scale
            else:
                continue
            tensor.add_(scale * torch.randn(tensor.shape, generator=generator))


def build_eager(
    config_class: Any,
    model_classes: Dict[Optional[str], Any],
    settings: Dict[str, Any],
    *,
    seed: int,
    head: Optional[str],
    is_norm: Callable[[str], bool],
    bias_scale: float = 0.1,
) -> torch.nn.Module:
    """A random ``model_classes[head]`` of ``config_class(**settings)`` with eager
    attention, seeded with ``seed`` and then :func:`perturb`-ed, in eval mode."""
    if head not in model_classes:
        raise ValueError(f"head={head!r}: use {' or '.join(map(repr, model_classes))}")
    config = config_class(**settings)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_classes[head](config)
    perturb(model, is_norm=is_norm, bias_scale=bias_scale)
    return model.eval()


def save(model: torch.nn.Module, path: Path) -> Path:
    """``model.save_pretrained(path)``; returns ``path``."""
    path = Path(path)
    model.save_pretrained(path)
    return path


def _is_layer_norm(name: str) -> bool:
    """BERT-shaped models' LayerNorms: ``LayerNorm`` (DistilBERT: ``*layer_norm``)."""
    return "LayerNorm" in name or "layer_norm" in name


def build_bert_like(
    model_type: str, *, seed: int = 0, head: Optional[str] = None, **overrides: Any
) -> torch.nn.Module:
    """A random ``transformers`` model of a BERT-shaped family (eval mode)."""
    import transformers

    settings = {**SETTINGS[model_type], **overrides}
    class_name = model_class_name(model_type, head)
    config = transformers.AutoConfig.for_model(model_type, **settings)
    config.architectures = [class_name]
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).eval()
    perturb(model, is_norm=_is_layer_norm, generator=torch.Generator().manual_seed(seed + 1))
    return model


def write_tiny_model(
    model_type: str, path: Path, *, seed: int = 0, head: Optional[str] = None, **config_overrides: Any
) -> Path:
    """Write a tiny random checkpoint of ``model_type`` into ``path`` (created) and
    return it. ``head``: None for the bare model, else a head (see
    :func:`model_class_name`; other families' writers take their own names).
    ``config_overrides`` are config keys in the family's own names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if model_type in OTHER_WRITERS:
        writer = importlib.import_module(f"{__package__}.{OTHER_WRITERS[model_type]}")
        overrides = {**tokenizer_ids(model_type, path), **config_overrides}
        return writer.write(path, seed=seed, head=head, **overrides)
    if model_type not in SETTINGS:
        raise ValueError(f"no tiny writer for model_type {model_type!r}")
    overrides = {**tokenizer_ids(model_type, path), **config_overrides}
    if SETTINGS[model_type] is _ROBERTA and "max_position_embeddings" not in config_overrides:
        # 64 usable positions whatever the tokenizer's pad id.
        pad = overrides.get("pad_token_id", _ROBERTA["pad_token_id"])
        overrides["max_position_embeddings"] = 64 + pad + 1
    model = build_bert_like(model_type, seed=seed, head=head, **overrides)
    model.save_pretrained(str(path), safe_serialization=True)
    return path
