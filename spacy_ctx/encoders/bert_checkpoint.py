"""Reading Hugging Face-format BERT checkpoints onto :class:`BertEncoder`, strictly.

Weights come from ``model.safetensors`` (preferred, also sharded with an index
file) or ``pytorch_model.bin`` (loaded with ``weights_only=True``, never
unpickling arbitrary objects). Key prefixes found in the wild are recognised by
locating the word-embedding key: none (``BertModel``), ``bert.``
(``BertForMaskedLM``/``BertForPreTraining``/classifiers), ``0.auto_model.`` and the like
(sentence-transformers). Everything outside that prefix (``cls.*``, ``classifier.*``)
is a task head we do not use; inside it, the pooler and the ``position_ids``
buffer are skipped on purpose. Any other difference is an error that names the
file, the key and the shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple, Union

import torch

from ..errors import CheckpointError
from .bert import BertConfig, BertEncoder

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_ANCHOR_KEY = "embeddings.word_embeddings.weight"
# Inside the encoder prefix: parts of BertModel we do not build.
_SKIPPED_INNER_PREFIXES = ("pooler.",)
_SKIPPED_INNER_KEYS = ("embeddings.position_ids",)


def find_weights_file(model_dir: Path) -> Path:
    """Return the weights file of a checkpoint directory, safetensors first."""
    for name in WEIGHT_FILES:
        candidate = model_dir / name
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"{model_dir}: no weights file found (looked for {', '.join(WEIGHT_FILES)}). "
        "Point the model name at a Hugging Face-format BERT directory."
    )


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Read all tensors of a weights file (safetensors, safetensors index, or .bin)."""
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text(encoding="utf8"))["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors index ({err}).") from err
        tensors: Dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_state_dict(path.parent / shard))
        return tensors
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({err}). The file is corrupt or "
                "truncated; download or save the checkpoint again."
            ) from err
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad pickles
        raise CheckpointError(
            f"{path}: could not be loaded as a PyTorch state dict with weights_only=True "
            f"({type(err).__name__}: {err}). Convert it to model.safetensors."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}.")
    return state


def _encoder_prefix(keys, source: Path) -> str:
    candidates = sorted((k[: -len(_ANCHOR_KEY)] for k in keys if k.endswith(_ANCHOR_KEY)), key=len)
    if not candidates:
        raise CheckpointError(
            f"{source}: no key ending in '{_ANCHOR_KEY}'; this is not a BERT checkpoint."
        )
    return candidates[0]


def map_state_dict(
    state: Dict[str, torch.Tensor], encoder: BertEncoder, source: Path
) -> Dict[str, torch.Tensor]:
    """Map checkpoint keys onto ``encoder``'s parameter names, checking keys and shapes."""
    prefix = _encoder_prefix(state.keys(), source)
    expected = encoder.state_dict()
    mapped: Dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue  # a task head (cls.*, classifier.*, ...): not part of the encoder
        inner = key[len(prefix):]
        if inner in _SKIPPED_INNER_KEYS or inner.startswith(_SKIPPED_INNER_PREFIXES):
            continue
        # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
        inner = inner.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )
        if inner not in expected:
            unexpected.append(key)
            continue
        want = tuple(expected[inner].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{source}: tensor '{key}' has shape {tuple(tensor.shape)} but config.json "
                f"implies {want}. The config and the weights belong to different models."
            )
        mapped[inner] = tensor.to(torch.float32)
    missing = sorted(set(expected) - set(mapped))
    if missing:
        shown = ", ".join(repr(prefix + k) for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{source}: missing key(s) {shown}{more}. The weights file is incomplete or is "
            "not a BERT model."
        )
    if unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:5])
        raise CheckpointError(
            f"{source}: unexpected key(s) {shown} inside the encoder; this architecture "
            "differs from BERT and cannot be loaded faithfully."
        )
    return mapped


def load_bert_encoder(model_dir: Union[str, Path]) -> Tuple[BertConfig, BertEncoder]:
    """Build a :class:`BertEncoder` from a local Hugging Face-format directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory.")
    config = BertConfig.from_file(model_dir / "config.json")
    if config.model_type not in ("bert",):
        raise CheckpointError(
            f"{model_dir / 'config.json'}: model_type={config.model_type!r}; ctx_bert "
            "supports BERT-architecture checkpoints (model_type 'bert')."
        )
    encoder = BertEncoder(config)
    weights = find_weights_file(model_dir)
    encoder.load_state_dict(map_state_dict(read_state_dict(weights), encoder, weights))
    encoder.eval()
    return config, encoder
