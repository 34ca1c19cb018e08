"""Reading transformer checkpoints onto our family modules, strictly.

Weights come from ``model.safetensors`` (preferred, also sharded with an index
file) or ``pytorch_model.bin`` (loaded with ``weights_only=True``, never
unpickling arbitrary objects). Two naming schemes are read:

- **Hugging Face names.** The family's encoder prefix (``bert.``, ``roberta.``,
  ``electra.``, ``distilbert.``, ..., or none for a bare ``*Model``; a
  sentence-transformers ``<digits>.auto_model.`` wrapper in front of any of
  them) is found by locating the family's word-embedding tensor. Keys outside
  the prefix must be known task heads (``Family.heads`` and the generic
  ``classifier.``, ``qa_outputs.``, ``score.``, ``pooler.``) and are skipped;
  inside it, ``Family.skipped`` names are skipped on purpose, everything else is
  renamed with ``Family.to_ours`` and must have exactly the shape the config
  implies. Old TF-converted ``LayerNorm.gamma``/``beta`` names are accepted.
- **Our names** (what :func:`save_encoder` writes): a ``model.safetensors`` whose
  metadata says ``{"names": "spacy_ctx"}`` holds the module's own state dict.

Every missing or unexpected key and every shape mismatch is a
:class:`CheckpointError` naming the file, the key and the shapes.

Loading runs in this order, so a bad checkpoint fails in milliseconds without a
large allocation: read and validate ``config.json`` (the family's
``read_config``), find the family by ``model_type``, read tensor names, shapes
and dtypes from the weight file's *header* (safetensors headers; a ``.bin``
memory-mapped), compare them with ``Family.state_shapes(config)`` (built on the
``meta`` device), and only then build the model and copy the tensors in one at
a time, rejecting NaN/inf.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import CheckpointError
from .config import read_config_file
from .family import Family, TransformerEncoder, _FAMILIES, family_for

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype names
_TORCH_FLOATS = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
#: safetensors metadata of a file with our own tensor names (see :func:`save_encoder`).
OUR_METADATA = {"format": "pt", "names": "spacy_ctx"}
#: Task heads that any family's checkpoint may carry outside its encoder prefix.
GENERIC_HEADS = (r"^classifier\.", r"^qa_outputs\.", r"^score\.", r"^pooler\.")
# sentence-transformers saves its modules' state as "<index>.auto_model.<HF name>".
_WRAPPER = re.compile(r"^\d+\.auto_model\.")
# Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
_TF_NAMES = ((re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"), (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"))

Shape = Tuple[int, ...]


class LoadedEncoder(NamedTuple):
    """What :func:`load_encoder` returns: the family, its validated config (which
    keeps the original ``config.json`` dict as ``config.raw``) and the module in
    eval mode."""

    family: Family
    config: Any
    encoder: TransformerEncoder


# -- weight files ------------------------------------------------------------------------------
def find_weights_file(model_dir: Path) -> Path:
    """Return the weights file of a checkpoint directory, safetensors first."""
    for name in WEIGHT_FILES:
        candidate = model_dir / name
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"{model_dir}: no weights file found (looked for {', '.join(WEIGHT_FILES)}). "
        "Point the model name at a Hugging Face-format checkpoint directory."
    )


class CheckpointWeights:
    """The tensors of a weight file (or of an index's shards), known by header.

    ``shapes`` maps every tensor name to its shape, ``dtypes`` to its dtype (the
    safetensors name, e.g. ``F32``), ``file_of`` to the file that holds it and
    ``metadata`` is the safetensors metadata of a single file (None otherwise);
    nothing is read until :meth:`tensors` is iterated.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shapes: Dict[str, Shape] = {}
        self.dtypes: Dict[str, str] = {}
        self.file_of: Dict[str, Path] = {}
        self.metadata: Optional[Dict[str, str]] = None
        self._bin_state: Optional[Dict[str, torch.Tensor]] = None
        if path.name.endswith(".index.json"):
            for shard in _index_shards(path):
                self._add_safetensors_header(shard)
        elif not path.is_file():
            raise CheckpointError(f"{path}: weights file not found.")
        elif path.suffix == ".safetensors":
            self.metadata = self._add_safetensors_header(path)
        else:
            self._read_bin(path)

    def _add_safetensors_header(self, path: Path) -> Optional[Dict[str, str]]:
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
                    self.dtypes[key] = str(part.get_dtype())
                    self.file_of[key] = path
                return handle.metadata()
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
            self.dtypes[key] = _TORCH_FLOATS.get(value.dtype, str(value.dtype))
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


# -- names -------------------------------------------------------------------------------------
def _word_embedding_name(family: Family, config: Any, shapes: Dict[str, Shape]) -> str:
    """Our name of the word-embedding table: the first 2-d tensor in module order with
    one row per vocabulary entry (every family builds its word embeddings first)."""
    anchor = getattr(family, "anchor", None)
    if anchor:
        return anchor
    for name, shape in shapes.items():
        if len(shape) == 2 and shape[0] == config.vocab_size:
            return name
    raise CheckpointError(f"family {family.name!r}: no word-embedding table in the module.")


def _families_with_prefix(prefix: str, but: Family) -> List[str]:
    """Model types of other registered families whose checkpoints use ``prefix``."""
    return sorted(
        model_type
        for model_type, family in _FAMILIES.items()
        if family.name != but.name and prefix and prefix in family.prefixes
    )


def _encoder_prefix(
    family: Family, anchor: str, keys: List[str], source: Path, model_type: str
) -> str:
    """The prefix in front of the family's tensor names in this checkpoint."""
    candidates = sorted({k[: -len(anchor)] for k in keys if k.endswith(anchor)}, key=len)
    known = [p for p in candidates if _WRAPPER.sub("", p) in family.prefixes]
    if known:
        return known[0]
    if candidates:
        prefix = _WRAPPER.sub("", candidates[0])
        others = _families_with_prefix(prefix, family)
        owner = f" (the prefix of {', '.join(repr(t) for t in others)} checkpoints)" if others else ""
        raise CheckpointError(
            f"{source}: the encoder's tensors carry the prefix '{prefix}'{owner}, but config.json "
            f"says model_type={model_type!r}, whose checkpoints use "
            f"{', '.join(repr(p) if p else 'no prefix' for p in family.prefixes)}. The config "
            "and the weights belong to different model families; fix model_type in config.json."
        )
    # The family's word embeddings are not there at all: name any family whose are.
    others = sorted(
        t for t, f in _FAMILIES.items() if f.name != family.name and _looks_like(f, keys)
    )
    hint = f"; its tensor names look like {', '.join(repr(t) for t in others)}" if others else ""
    raise CheckpointError(
        f"{source}: no tensor ending in '{anchor}', so this is not a {model_type!r} checkpoint "
        f"as config.json says{hint}. Fix model_type in config.json or use the right weights."
    )


def _looks_like(family: Family, keys: List[str]) -> bool:
    """Cheap guess (no config): do ``keys`` name ``family``'s first embedding tensor?"""
    first = family.names[0][0] + "weight" if family.names else None
    return bool(first) and any(
        k.endswith(first) and _WRAPPER.sub("", k[: -len(first)]) in family.prefixes for k in keys
    )


def _untf(name: str) -> str:
    for pattern, replacement in _TF_NAMES:
        name = pattern.sub(replacement, name)
    return name


def _is_own_format(weights: CheckpointWeights, expected: Dict[str, Shape], family: Family) -> bool:
    """Does the file hold our own names? Marked by :func:`save_encoder`'s metadata; a
    file without metadata whose names are exactly our module's (and none of them a
    checkpoint name) is accepted too, as older saved pipelines wrote it."""
    if weights.metadata and weights.metadata.get("names") == OUR_METADATA["names"]:
        return True
    if weights.metadata and weights.metadata.get("names"):
        return False
    return set(weights.shapes) == set(expected) and all(
        family.to_ours(k) is None for k in weights.shapes
    )


class KeyMap(NamedTuple):
    """Which checkpoint tensor fills which of our parameters: ``names`` maps our
    name to the checkpoint key; ``own_format``: the file holds our names (and our
    layout: nothing to transpose)."""

    names: Dict[str, str]
    own_format: bool


def map_checkpoint_keys(weights: CheckpointWeights, family: Family, config: Any) -> KeyMap:
    """Map our parameter names to checkpoint keys, checking names, shapes and dtypes
    against what ``config`` implies (headers only; the module is built on the
    ``meta`` device)."""
    source = weights.path
    expected = family.state_shapes(config)
    model_type = getattr(config, "model_type", family.model_types[0])
    mapped: Dict[str, str] = {}
    unexpected: List[str] = []
    own = _is_own_format(weights, expected, family)
    prefix = ""
    if own:
        for key in weights.shapes:
            if key in expected:
                mapped[key] = key
            else:
                unexpected.append(key)
    else:
        anchor = family.to_checkpoint(_word_embedding_name(family, config, expected))
        keys = list(weights.shapes)
        prefix = _encoder_prefix(family, anchor, keys, source, model_type)
        for key in keys:
            if not key.startswith(prefix):
                outer = _WRAPPER.sub("", key)
                if family.is_head(outer) or any(re.search(p, outer) for p in GENERIC_HEADS):
                    continue  # a task head: not part of the encoder
                raise CheckpointError(
                    f"{weights.file_of[key]}: tensor '{key}' is outside the encoder (prefix "
                    f"'{prefix}') and is not a known task head of a {model_type!r} checkpoint. "
                    "The weights belong to a different architecture."
                )
            inner = _untf(key[len(prefix):])
            if family.is_skipped(inner):
                continue
            ours = family.to_ours(inner)
            if ours is None or ours not in expected:
                unexpected.append(key)
            elif ours in mapped:
                raise CheckpointError(
                    f"{source}: tensors '{mapped[ours]}' and '{key}' both map to '{ours}'."
                )
            else:
                mapped[ours] = key
    for ours in [k for k in expected if k in mapped]:  # module order: embeddings first
        key = mapped[ours]
        shape, want = weights.shapes[key], expected[ours]
        if family.is_transposed(ours) and not own:
            want = tuple(reversed(want))
        if shape != want:
            raise CheckpointError(
                f"{weights.file_of[key]}: tensor '{key}' has shape {shape} but config.json "
                f"implies {want}. The config and the weights belong to different models."
            )
        dtype = weights.dtypes.get(key)
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{weights.file_of[key]}: tensor '{key}' has dtype {dtype}; weights must be "
                f"floating point ({', '.join(_FLOAT_DTYPES)})."
            )
    missing = [k for k in expected if k not in mapped]  # module order: layer 2 before 10
    if missing or unexpected:
        problems = []
        if missing:
            names = missing if own else [prefix + (family.to_checkpoint(k) or k) for k in missing]
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            problems.append(f"missing key(s) {', '.join(repr(k) for k in names[:5])}{more}")
        if unexpected:
            more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
            shown = ", ".join(f"'{k}' {weights.shapes[k]}" for k in unexpected[:5])
            problems.append(f"unexpected key(s) {shown}{more} inside the encoder")
        inner = [k[len(prefix):] for k in unexpected]
        others = sorted(
            t for t, f in _FAMILIES.items()
            if f.name != family.name and inner and all(f.to_ours(k) or f.is_skipped(k) for k in inner)
        )
        hint = f" Its tensor names are those of {', '.join(repr(t) for t in others)}." if others else ""
        raise CheckpointError(
            f"{source}: {'; '.join(problems)}. The weights file is incomplete or is not a "
            f"{model_type!r} model as config.json says.{hint}"
        )
    return KeyMap(mapped, own)


# -- loading and saving --------------------------------------------------------------------
def read_family_config(path: Union[str, Path]) -> Tuple[Family, Any]:
    """Read ``config.json``, find its family by ``model_type`` and validate it."""
    path = Path(path)
    data = read_config_file(path)
    family = family_for(data.get("model_type"), str(path))
    return family, family.read_config(data, str(path))


def load_encoder(model_dir: Union[str, Path]) -> LoadedEncoder:
    """Build the encoder of a local checkpoint directory (Hugging Face format or
    written by :func:`save_encoder`).

    The config and the weight file's header are checked before the model is
    built; tensors are then copied in one at a time (float32, transposed where
    the family stores them so) and must be finite.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory.")
    family, config = read_family_config(model_dir / "config.json")
    weights = CheckpointWeights(find_weights_file(model_dir))
    names, own = map_checkpoint_keys(weights, family, config)
    ours_of = {key: ours for ours, key in names.items()}
    # Only now is anything of the config's size allocated.
    encoder = family.build(config)
    params = encoder.state_dict()
    with torch.no_grad():
        for key, tensor in weights.tensors(sorted(ours_of)):
            ours = ours_of[key]
            param = params[ours]
            param.copy_(tensor.t() if family.is_transposed(ours) and not own else tensor)
            if not _all_finite(param):
                raise CheckpointError(
                    f"{weights.file_of[key]}: tensor '{key}' contains NaN or infinite values. "
                    "The file is corrupt; download or save the checkpoint again."
                )
    encoder.eval()
    return LoadedEncoder(family, config, encoder)


def save_encoder(
    encoder: TransformerEncoder, family: Family, config: Any, path: Union[str, Path]
) -> None:
    """Write a Hugging Face-format checkpoint: ``config.json`` (the original dict the
    config was read from) and ``model.safetensors`` under the family's HF names
    (:func:`export_state_dict`, no prefix), so the folder loads both here and in
    ``transformers``' ``*Model.from_pretrained``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(export_state_dict(encoder, family), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    data = dict(config.raw) if getattr(config, "raw", None) else config.to_dict()
    (path / "config.json").write_text(json.dumps(data, indent=2), encoding="utf8")


def export_state_dict(
    encoder: TransformerEncoder, family: Family, *, prefix: str = ""
) -> Dict[str, torch.Tensor]:
    """The encoder's tensors under Hugging Face names (``Family.to_checkpoint``, plus
    ``prefix``, e.g. ``"roberta."``), transposed back where the family stores them
    transposed: a state dict the family's ``*Model`` loads."""
    exported: Dict[str, torch.Tensor] = {}
    for ours, tensor in encoder.state_dict().items():
        name = family.to_checkpoint(ours)
        if name is None:
            raise CheckpointError(f"family {family.name!r}: no checkpoint name for '{ours}'.")
        tensor = tensor.detach().to("cpu")
        exported[prefix + name] = (tensor.t() if family.is_transposed(ours) else tensor).contiguous()
    return exported


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
