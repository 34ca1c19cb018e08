"""Finding checkpoint files: local directories, or Hugging Face hub ids when online."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from .errors import CheckpointError

# Files a BERT checkpoint may need; the weights are fetched separately so that only
# one format is downloaded.
_HUB_SIDE_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
]
_HUB_WEIGHTS = (["model.safetensors"], ["model.safetensors.index.json", "model-*.safetensors"],
                ["pytorch_model.bin"])


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or Path(name).expanduser().exists() or (
        len(name) > 1 and name[1] == ":"
    )


def resolve_bert_dir(name: Union[str, Path]) -> Path:
    """Return a local checkpoint directory for a local path or a hub id.

    Local directories are used as they are. Anything else is taken as a Hugging
    Face hub id and fetched with ``huggingface_hub`` (the ``hub`` extra), which
    also serves ids from its local cache when offline (``HF_HUB_OFFLINE=1``).
    """
    name = str(name)
    if not name:
        raise CheckpointError(
            "No model name given: set [components.<name>.model] name to a local Hugging "
            "Face-format directory or a hub id."
        )
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(name) or name.count("/") > 1:
        raise CheckpointError(f"{name}: no such directory (and not a hub id).")
    return download_from_hub(name)


def download_from_hub(repo_id: str) -> Path:
    """Download (or find in the local cache) a hub model's config, vocab and weights."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise CheckpointError(
            f"'{repo_id}' is not a local directory, and loading hub ids needs huggingface_hub: "
            "pip install 'spacy-ctx[hub]', or pass a local directory."
        ) from err
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=_HUB_SIDE_FILES))
        for patterns in _HUB_WEIGHTS:
            local = Path(snapshot_download(repo_id, allow_patterns=patterns))
            if any(local.glob(patterns[-1])):
                return local
    except Exception as err:  # network, auth and cache errors have many types
        raise CheckpointError(
            f"Could not fetch '{repo_id}' from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). Offline, only local directories and models already in the hub cache "
            "work: pass the path of a downloaded checkpoint directory instead."
        ) from err
    raise CheckpointError(f"hub model '{repo_id}' has no model.safetensors or pytorch_model.bin.")
