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

Loading runs in this order, so a bad checkpoint fails in milliseconds without a
large allocation: validate ``config.json`` (:class:`BertConfig`), read the tensor
names and shapes from the weight file's *header* (safetensors headers; a ``.bin``
memory-mapped), compare them with the shapes the config implies, and only then
build the model and copy the tensors in one at a time, rejecting NaN/inf.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import CheckpointError
from .bert import BertConfig, BertEncoder, state_shapes

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_ANCHOR_KEY = "embeddings.word_embeddings.weight"
# Inside the encoder prefix: parts of BertModel we do not build.
_SKIPPED_INNER_PREFIXES = ("pooler.",)
_SKIPPED_INNER_KEYS = ("embeddings.position_ids",)
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype names

Shape = Tuple[int, ...]


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


class CheckpointWeights:
    """The tensors of a weight file (or of an index's shards), known by header.

    ``shapes`` maps every tensor name to its shape and ``file_of`` to the file
    that holds it; nothing is read until :meth:`tensors` is iterated.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shapes: Dict[str, Shape] = {}
        self.file_of: Dict[str, Path] = {}
        self._bin_state: Optional[Dict[str, torch.Tensor]] = None
        if path.name.endswith(".index.json"):
            for shard in _index_shards(path):
                self._add_safetensors_header(shard)
        elif not path.is_file():
            raise CheckpointError(f"{path}: weights file not found.")
        elif path.suffix == ".safetensors":
            self._add_safetensors_header(path)
        else:
            self._read_bin(path)

    def _add_safetensors_header(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    part = handle.get_slice(key)
                    if key in self.file_of:
                        raise CheckpointError(
                            f"{path}: tensor '{key}' is also in {self.file_of[key]}; "
                            "each tensor must be in exactly one shard."
                        )
                    self.shapes[key] = tuple(int(n) for n in part.get_shape())
                    self.file_of[key] = path
                    dtype = part.get_dtype()
                    if dtype not in _FLOAT_DTYPES and not key.endswith(_SKIPPED_INNER_KEYS):
                        raise CheckpointError(
                            f"{path}: tensor '{key}' has dtype {dtype}; BERT weights must be "
                            f"floating point ({', '.join(_FLOAT_DTYPES)})."
                        )
        except CheckpointError:
            raise
        except Exception as err:  # SafetensorError, OSError, ... : the file is damaged
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({err}). The file is corrupt or "
                "truncated; download or save the checkpoint again."
            ) from err

    def _read_bin(self, path: Path) -> None:
        state = _load_bin(path)
        for key, value in state.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                    "expected a state dict of named tensors."
                )
            self.shapes[key] = tuple(value.shape)
            self.file_of[key] = path
        self._bin_state = state

    def tensors(self, keys: List[str]) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for ``keys``, reading one tensor at a time."""
        if self._bin_state is not None:
            for key in keys:
                yield key, self._bin_state[key]
            return
        from safetensors import safe_open

        by_file: Dict[Path, List[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        for path, file_keys in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for key in file_keys:
                        yield key, handle.get_tensor(key)
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(f"{path}: could not read tensors ({err}).") from err


def _load_bin(path: Path) -> Dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True``; memory-mapped where the format allows,
    so checking shapes costs no allocation."""
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Legacy (pre-zip) torch.save format: cannot be memory-mapped. Its size is
            # bounded by the file, not by config.json, so a plain load is safe.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad pickles
        raise CheckpointError(
            f"{path}: could not be loaded as a PyTorch state dict with weights_only=True "
            f"({type(err).__name__}: {err}). Convert it to model.safetensors."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}.")
    return state


def _index_shards(path: Path) -> List[Path]:
    """The shard files a ``*.safetensors.index.json`` names, each checked to be a
    ``.safetensors`` file inside the checkpoint folder (no absolute or ``..`` paths;
    an index naming an index is refused, so there is no recursion)."""
    try:
        index = json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors index ({err}).") from err
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(
            f"{path}: a safetensors index must be a JSON object with a 'weight_map' object "
            f"(tensor name -> shard file), found {type(index).__name__}."
        )
    shards: Dict[str, Path] = {}
    for key, name in index["weight_map"].items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{path}: weight_map['{key}'] must be a shard file name, got {name!r}.")
        if name in shards:
            continue
        pure = PurePosixPath(name.replace("\\", "/"))
        if pure.is_absolute() or PureWindowsPath(name).anchor or ".." in pure.parts:
            raise CheckpointError(
                f"{path}: weight_map['{key}'] = {name!r} points outside the checkpoint folder; "
                "shards must be files inside it."
            )
        if not name.endswith(".safetensors"):
            raise CheckpointError(
                f"{path}: weight_map['{key}'] = {name!r} is not a .safetensors shard."
            )
        # A lexical check only: the Hugging Face hub cache keeps every file as a
        # symlink into its blobs/ folder, so resolved paths do leave the folder.
        shard = path.parent / pure
        if not shard.is_file():
            raise CheckpointError(f"{path}: shard {name!r} (for '{key}') not found.")
        shards[name] = shard
    if not shards:
        raise CheckpointError(f"{path}: the weight_map is empty.")
    return [shards[name] for name in sorted(shards)]


def _encoder_prefix(keys, source: Path) -> str:
    candidates = sorted((k[: -len(_ANCHOR_KEY)] for k in keys if k.endswith(_ANCHOR_KEY)), key=len)
    if not candidates:
        raise CheckpointError(
            f"{source}: no key ending in '{_ANCHOR_KEY}'; this is not a BERT checkpoint."
        )
    return candidates[0]


def map_checkpoint_keys(
    weights: CheckpointWeights, config: BertConfig
) -> Dict[str, str]:
    """Map the encoder's parameter names to checkpoint keys, checking names and
    shapes against what ``config`` implies (headers only; nothing is allocated)."""
    source = weights.path
    prefix = _encoder_prefix(weights.shapes.keys(), source)
    expected = state_shapes(config)
    mapped: Dict[str, str] = {}
    unexpected = []
    for key, shape in weights.shapes.items():
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
        want = expected[inner]
        if shape != want:
            raise CheckpointError(
                f"{weights.file_of[key]}: tensor '{key}' has shape {shape} but config.json "
                f"implies {want}. The config and the weights belong to different models."
            )
        mapped[inner] = key
    missing = [k for k in expected if k not in mapped]  # module order: layer 2 before 10
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
    """Build a :class:`BertEncoder` from a local Hugging Face-format directory.

    The config and the weight file's header are checked before the model is
    built; tensors are then copied in one at a time (float32) and must be finite.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory.")
    config = BertConfig.from_file(model_dir / "config.json")
    if config.model_type not in ("bert",):
        raise CheckpointError(
            f"{model_dir / 'config.json'}: model_type={config.model_type!r}; ctx_bert "
            "supports BERT-architecture checkpoints (model_type 'bert')."
        )
    weights = CheckpointWeights(find_weights_file(model_dir))
    names = map_checkpoint_keys(weights, config)
    inner_of = {key: inner for inner, key in names.items()}
    # Only now is anything of the config's size allocated.
    encoder = BertEncoder(config)
    params = encoder.state_dict()
    with torch.no_grad():
        for key, tensor in weights.tensors(sorted(inner_of)):
            param = params[inner_of[key]]
            param.copy_(tensor)
            if not _all_finite(param):
                raise CheckpointError(
                    f"{weights.file_of[key]}: tensor '{key}' contains NaN or infinite values. "
                    "The file is corrupt; download or save the checkpoint again."
                )
    encoder.eval()
    return config, encoder


def _all_finite(tensor: torch.Tensor) -> bool:
    """True if no element is NaN or +-inf (``tensor``: a float32 CPU parameter).

    min and max propagate NaN and show any infinity, with no temporary the size of
    the tensor; numpy's single-threaded reductions avoid torch's per-call thread
    start-up, which dominates for a model's ~100 mostly small tensors.
    """
    if tensor.numel() == 0:
        return True
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:  # numpy cannot
        low, high = torch.aminmax(tensor.detach())
        return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
    values = tensor.detach().numpy()
    return bool(np.isfinite(values.min())) and bool(np.isfinite(values.max()))
