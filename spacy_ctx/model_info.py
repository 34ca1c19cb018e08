"""What a transformer checkpoint directory holds, read without loading its weights.

Backs ``python -m spacy_ctx info MODEL_DIR``: the family chosen by ``config.json``,
the tokenizer kind, the shape of the model, its parameter count (from the shapes
the config implies; the module is built on torch's ``meta`` device, so nothing
of the model's size is allocated) and the layer names ``doc._.ctx`` will carry.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Union

from .encoders.family import family_for
from .errors import CheckpointError
from .pieces.tokenizer import PieceTokenizer


def describe_checkpoint(model_dir: Union[str, Path]) -> Dict[str, Any]:
    """Family, tokenizer and shape of a Hugging Face-format checkpoint directory.

    Raises :class:`CheckpointError` for a missing or invalid ``config.json``, an
    unsupported ``model_type`` or a missing tokenizer.
    """
    import torch

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{config_path}: not found; is {model_dir} a checkpoint directory?") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err}).") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: must hold a JSON object.")
    family = family_for(raw.get("model_type"), str(config_path))
    config = family.read_config(raw, str(config_path))
    with torch.device("meta"):
        module = family.build(config)
    shapes = [tuple(t.shape) for t in module.state_dict().values()]
    pieces = PieceTokenizer.from_pretrained_dir(model_dir)
    return {
        "model_dir": str(model_dir),
        "model_type": raw.get("model_type"),
        "family": family.name,
        "tokenizer": pieces.kind,
        "vocab_size": config.vocab_size,
        "layers": config.num_hidden_layers,
        "width": module.width,
        "heads": config.num_attention_heads,
        "usable_positions": family.usable_positions(config),
        "specials": {"prefix": pieces.prefix_ids, "suffix": pieces.suffix_ids},
        "context": "left only (causal)" if family.causal else "both sides",
        "parameters": sum(math.prod(shape) for shape in shapes),
        "layer_names": list(module.layer_names),
    }


def format_description(info: Dict[str, Any]) -> List[str]:
    """The lines ``python -m spacy_ctx info`` prints."""
    rows = [
        ("model", info["model_dir"]),
        ("family", f"{info['family']} (model_type {info['model_type']!r})"),
        ("tokenizer", info["tokenizer"]),
        ("vocabulary", f"{info['vocab_size']:,}"),
        ("layers", str(info["layers"])),
        ("width", str(info["width"])),
        ("heads", str(info["heads"])),
        ("usable positions", f"{info['usable_positions']:,} per window, specials included"),
        ("specials", f"{len(info['specials']['prefix'])} before, {len(info['specials']['suffix'])} after each window"),
        ("context", info["context"]),
        ("parameters", f"{info['parameters']:,}"),
        ("doc._.ctx layers", ", ".join(info["layer_names"])),
    ]
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {value}" for label, value in rows]
