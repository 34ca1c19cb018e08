"""Reading and writing ELMo checkpoints.

Two formats:

* the published bilm-tf / AllenNLP pair ``options.json`` + ``weights.hdf5``
  (:func:`load_elmo`, :func:`save_elmo_hdf5`, :func:`save_elmo_options`). The
  hdf5 layout, with TensorFlow's ``x @ W`` matrices::

      char_embed                                    (261, char_dim)
      CNN/W_cnn_{i}                                 (1, width_i, char_dim, n_i)
      CNN/b_cnn_{i}                                 (n_i,)
      CNN_high_{k}/W_transform, W_carry             (n_filters, n_filters)
      CNN_high_{k}/b_transform, b_carry             (n_filters,)
      CNN_proj/W_proj                               (n_filters, proj)  [absent if n_filters == proj]
      CNN_proj/b_proj                               (proj,)
      RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell/W_0   (proj + proj, 4 * dim), gates i, j, f, o
      RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell/B     (4 * dim,)
      RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell/W_P_0 (dim, proj)

  with d = 0 for the forward and 1 for the backward direction. The stored char
  embedding has no row for the padding id 0 (we prepend a zero row), and the
  stored LSTM bias lacks TF's +1.0 forget-gate offset (the model adds it);

* a single safetensors file holding the module's ``state_dict`` and the options
  as metadata (:func:`save_elmo_safetensors`, :func:`load_elmo_safetensors`),
  used to store ELMo inside a saved pipeline.

Loading checks before it allocates: the options are type- and range-checked
(:mod:`~spacy_ctx.encoders.elmo_options`), then the shapes they imply are compared
with the shapes in the weight file's header (hdf5 dataset shapes, the safetensors
JSON header), all without reading any weights; only then are weights read and the
model built. A mismatched or hostile pair of files fails in milliseconds.

Every failure raises :class:`~spacy_ctx.errors.CheckpointError` naming the file
and the dataset or setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Tuple, Union

import numpy as np
import torch

from ..errors import CheckpointError
from .elmo import ElmoBiLM
from .elmo_options import N_CHAR_EMBEDDING_ROWS, ElmoOptions

__all__ = [
    "load_elmo",
    "load_elmo_hdf5_weights",
    "save_elmo_hdf5",
    "write_elmo_weights",
    "save_elmo_options",
    "save_elmo_safetensors",
    "load_elmo_safetensors",
    "expected_hdf5_shapes",
    "expected_state_shapes",
]

PathLike = Union[str, Path]
Device = Union[str, torch.device, None]

#: Module gate block k takes TF gate block _GATE_ORDER[k]: TF packs (i, j, f, o),
#: the model uses PyTorch's (i, f, j, o). Swapping blocks 1 and 2 is its own inverse.
_GATE_ORDER = (0, 2, 1, 3)

_SAFETENSORS_FORMAT = "spacy_ctx.elmo.v1"


def _lstm_prefix(direction: int, layer: int) -> str:
    return f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"


def expected_hdf5_shapes(options: ElmoOptions) -> Dict[str, Tuple[int, ...]]:
    """Every dataset a ``weights.hdf5`` for ``options`` must hold, with its shape."""
    n_filters = options.n_filters_total
    proj, dim, char_dim = options.projection_dim, options.lstm_dim, options.char_embedding_dim
    shapes: Dict[str, Tuple[int, ...]] = {"char_embed": (N_CHAR_EMBEDDING_ROWS - 1, char_dim)}
    for i, (width, n) in enumerate(options.filters):
        shapes[f"CNN/W_cnn_{i}"] = (1, width, char_dim, n)
        shapes[f"CNN/b_cnn_{i}"] = (n,)
    for k in range(options.n_highway):
        for part in ("transform", "carry"):
            shapes[f"CNN_high_{k}/W_{part}"] = (n_filters, n_filters)
            shapes[f"CNN_high_{k}/b_{part}"] = (n_filters,)
    if options.uses_char_projection:
        shapes["CNN_proj/W_proj"] = (n_filters, proj)
        shapes["CNN_proj/b_proj"] = (proj,)
    for direction in (0, 1):
        for layer in range(options.n_layers):
            prefix = _lstm_prefix(direction, layer)
            shapes[f"{prefix}/W_0"] = (proj + proj, 4 * dim)
            shapes[f"{prefix}/B"] = (4 * dim,)
            shapes[f"{prefix}/W_P_0"] = (dim, proj)
    return shapes


def expected_state_shapes(options: ElmoOptions) -> Dict[str, Tuple[int, ...]]:
    """The ``state_dict`` names and shapes of an :class:`ElmoBiLM` for ``options``.

    The model is built on PyTorch's ``meta`` device, which records shapes and
    allocates nothing, so this is cheap for any options that passed validation.
    """
    with torch.device("meta"):
        model = ElmoBiLM(options)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _reorder_gates(array: np.ndarray, cell_dim: int) -> np.ndarray:
    """Permute the 4 gate blocks on the last axis between TF and model order."""
    blocks = [array[..., k * cell_dim : (k + 1) * cell_dim] for k in _GATE_ORDER]
    return np.concatenate(blocks, axis=-1)


# --------------------------------------------------------------------------
# TF layout <-> module parameters
# --------------------------------------------------------------------------


def _tf_arrays_from_model(model: ElmoBiLM) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield ``(dataset name, float32 array)`` in the hdf5 layout for ``model``."""

    def arr(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().to("cpu", torch.float32).numpy()

    options = model.options
    encoder = model.char_encoder
    yield "char_embed", arr(encoder.char_embedding.weight[1:])
    for i, conv in enumerate(encoder.convolutions):
        # Conv1d (n, char_dim, width) -> TF conv2d (1, width, char_dim, n)
        yield f"CNN/W_cnn_{i}", arr(conv.weight).transpose(2, 1, 0)[np.newaxis]
        yield f"CNN/b_cnn_{i}", arr(conv.bias)
    n_filters = options.n_filters_total
    for k, highway in enumerate(encoder.highways):
        weight, bias = arr(highway.linear.weight), arr(highway.linear.bias)
        yield f"CNN_high_{k}/W_transform", weight[:n_filters].T
        yield f"CNN_high_{k}/b_transform", bias[:n_filters]
        yield f"CNN_high_{k}/W_carry", weight[n_filters:].T
        yield f"CNN_high_{k}/b_carry", bias[n_filters:]
    if encoder.projection is not None:
        yield "CNN_proj/W_proj", arr(encoder.projection.weight).T
        yield "CNN_proj/b_proj", arr(encoder.projection.bias)
    dim = options.lstm_dim
    for layer_index, layer in enumerate(model.lstm.layers):
        for direction in (0, 1):
            prefix = _lstm_prefix(direction, layer_index)
            kernel = np.concatenate(
                [arr(layer.input_weight[direction]), arr(layer.recurrent_weight[direction])], axis=0
            )
            yield f"{prefix}/W_0", _reorder_gates(kernel, dim)
            yield f"{prefix}/B", _reorder_gates(arr(layer.bias[direction]), dim)
            yield f"{prefix}/W_P_0", arr(layer.projection_weight[direction])


def _assign_tf_arrays(model: ElmoBiLM, arrays: Dict[str, np.ndarray]) -> None:
    """Copy hdf5-layout arrays (already shape-checked) into the model's parameters."""

    def copy(param: torch.Tensor, value: np.ndarray) -> None:
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))

    options = model.options
    encoder = model.char_encoder
    embedding = np.zeros((N_CHAR_EMBEDDING_ROWS, options.char_embedding_dim), dtype=np.float32)
    embedding[1:] = arrays["char_embed"]  # row 0: padding token id
    copy(encoder.char_embedding.weight, embedding)
    for i, conv in enumerate(encoder.convolutions):
        copy(conv.weight, arrays[f"CNN/W_cnn_{i}"][0].transpose(2, 1, 0))
        copy(conv.bias, arrays[f"CNN/b_cnn_{i}"])
    for k, highway in enumerate(encoder.highways):
        weight = np.concatenate(
            [arrays[f"CNN_high_{k}/W_transform"].T, arrays[f"CNN_high_{k}/W_carry"].T], axis=0
        )
        bias = np.concatenate([arrays[f"CNN_high_{k}/b_transform"], arrays[f"CNN_high_{k}/b_carry"]])
        copy(highway.linear.weight, weight)
        copy(highway.linear.bias, bias)
    if encoder.projection is not None:
        copy(encoder.projection.weight, arrays["CNN_proj/W_proj"].T)
        copy(encoder.projection.bias, arrays["CNN_proj/b_proj"])
    dim, input_dim = options.lstm_dim, options.projection_dim
    for layer_index, layer in enumerate(model.lstm.layers):
        for direction in (0, 1):
            prefix = _lstm_prefix(direction, layer_index)
            # TF's LSTMCell multiplies concat([input, previous projected output]) by W_0.
            kernel = _reorder_gates(arrays[f"{prefix}/W_0"], dim)
            copy(layer.input_weight[direction], kernel[:input_dim])
            copy(layer.recurrent_weight[direction], kernel[input_dim:])
            copy(layer.bias[direction], _reorder_gates(arrays[f"{prefix}/B"], dim))
            copy(layer.projection_weight[direction], arrays[f"{prefix}/W_P_0"])


# --------------------------------------------------------------------------
# hdf5
# --------------------------------------------------------------------------


def _import_h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a dependency
        raise CheckpointError(
            "Reading ELMo weights.hdf5 files needs the 'h5py' package: pip install h5py"
        ) from exc
    return h5py


def _describe_link(h5py, link: Any) -> str:
    if isinstance(link, h5py.ExternalLink):
        return f"an external link to '{link.path}' in file '{link.filename}'"
    if isinstance(link, h5py.SoftLink):
        return f"a soft link to '{link.path}'"
    return "an object"


def _hdf5_dataset(h5py, handle: Any, path: Path, name: str, shape: Tuple[int, ...], hint: str) -> Any:
    """The dataset ``name`` of an open file, its shape checked against ``shape`` (no data read)."""
    missing = CheckpointError(f"{path}: dataset '{name}' is missing (expected shape {shape}). {hint}")
    try:
        link = handle.get(name, getlink=True)
    except (KeyError, OSError, ValueError):  # e.g. a parent group that is a broken link
        link = None
    if link is None:
        raise missing
    try:
        dataset = handle[name]
    except (KeyError, OSError, ValueError) as exc:
        # A dangling external or soft link: h5py raises KeyError("can't open file").
        raise CheckpointError(
            f"{path}: dataset '{name}' is {_describe_link(h5py, link)} that cannot be opened "
            f"({exc}). Use a self-contained weights file, or put the linked file where the "
            "link points."
        ) from exc
    if not isinstance(dataset, h5py.Dataset):
        raise missing
    if tuple(dataset.shape) != shape:
        raise CheckpointError(
            f"{path}: dataset '{name}' has shape {tuple(dataset.shape)}, expected {shape}. {hint}"
        )
    return dataset


def _read_hdf5_arrays(path: PathLike, options: ElmoOptions) -> Dict[str, np.ndarray]:
    """Every dataset ``options`` needs, as finite float32 arrays, read strictly.

    All shapes are checked against the file's header first, so a file that does
    not belong to the options fails before any weight is read or allocated.
    Extra datasets are ignored.
    """
    h5py = _import_h5py()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"ELMo weights file not found: '{path}'. Pass the path of the 'weights.hdf5' "
            f"that belongs to the options file '{options.source}'."
        )
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"Could not open the ELMo weights file '{path}' as HDF5 ({exc}). The file is "
            "corrupt, truncated or not an HDF5 file; download it again."
        ) from exc
    hint = (
        f"The settings in '{options.source}' imply this shape; check that '{path}' and "
        f"'{options.source}' belong to the same model."
    )
    with handle:
        datasets = {
            name: _hdf5_dataset(h5py, handle, path, name, shape, hint)
            for name, shape in expected_hdf5_shapes(options).items()
        }
        arrays: Dict[str, np.ndarray] = {}
        for name, dataset in datasets.items():
            try:
                value = np.asarray(dataset[...], dtype=np.float32)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise CheckpointError(
                    f"{path}: could not read dataset '{name}' as float32 ({exc}). The file "
                    "may be corrupt; download it again."
                ) from exc
            if not np.all(np.isfinite(value)):
                raise CheckpointError(
                    f"{path}: dataset '{name}' contains NaN or infinite values. The file "
                    "is corrupt; download it again."
                )
            arrays[name] = value
    return arrays


def load_elmo_hdf5_weights(model: ElmoBiLM, weights_path: PathLike) -> None:
    """Load a bilm-tf/AllenNLP ``weights.hdf5`` into ``model`` in place, strictly.

    Every expected dataset must exist with exactly the expected shape and finite
    values; extra datasets are ignored.
    """
    _assign_tf_arrays(model, _read_hdf5_arrays(weights_path, model.options))


def load_elmo(options_path: PathLike, weights_path: PathLike, device: Device = None) -> ElmoBiLM:
    """Build an :class:`ElmoBiLM` from ``options.json`` + ``weights.hdf5``.

    Args:
        options_path: AllenNLP/bilm-tf ``options.json``.
        weights_path: the matching ``weights.hdf5``.
        device: where to put the model (default CPU).

    Returns:
        The model in eval mode (it has no dropout, so the mode does not matter).
        It is built only after the options and every dataset shape were checked.
    """
    options = ElmoOptions.from_file(options_path)
    arrays = _read_hdf5_arrays(weights_path, options)
    model = ElmoBiLM(options)
    _assign_tf_arrays(model, arrays)
    if device is not None:
        model.to(device)
    return model.eval()


def save_elmo_options(model_or_options: Union[ElmoBiLM, ElmoOptions], path: PathLike) -> None:
    """Write ``options.json`` for a model (or options)."""
    options = model_or_options.options if isinstance(model_or_options, ElmoBiLM) else model_or_options
    Path(path).write_text(json.dumps(options.to_dict(), indent=2) + "\n", encoding="utf-8")


def write_elmo_weights(
    model: ElmoBiLM, options: Union[ElmoOptions, Mapping[str, Any]], path: PathLike
) -> Path:
    """Write ``model``'s weights as a bilm-tf/AllenNLP ``weights.hdf5`` at ``path``.

    The inverse of :func:`load_elmo_hdf5_weights`: every dataset of
    :func:`expected_hdf5_shapes` (TF ``x @ W`` matrices, TF gate order i, j, f, o,
    no padding row in ``char_embed``, LSTM bias without the +1 forget offset),
    float32, in groups like the published files. ``options`` (an
    :class:`ElmoOptions` or an ``options.json`` dict) must describe ``model``: the
    file is only useful next to the options it belongs to, so a mismatch is
    refused before anything is written. Reading the file back gives
    bit-identical parameters. Returns ``path``.
    """
    h5py = _import_h5py()
    path = Path(path)
    if not isinstance(options, ElmoOptions):
        options = ElmoOptions.from_dict(options, source=f"options for '{path}'")
    if options.to_dict() != model.options.to_dict():
        raise CheckpointError(
            f"{path}: the options given ({json.dumps(options.to_dict())}) do not describe the "
            f"model ({json.dumps(model.options.to_dict())}). Pass the model's own options "
            "(model.options)."
        )
    expected = expected_hdf5_shapes(options)
    arrays = dict(_tf_arrays_from_model(model))
    for name, shape in expected.items():  # our own layout code, checked before writing
        found = tuple(arrays[name].shape) if name in arrays else None
        if found != shape:
            raise CheckpointError(f"{path}: dataset '{name}' would have shape {found}, expected {shape}.")
    with h5py.File(path, "w") as handle:
        for name in expected:
            handle.create_dataset(name, data=np.ascontiguousarray(arrays[name], dtype=np.float32))
    return path


def save_elmo_hdf5(model: ElmoBiLM, path: PathLike) -> None:
    """Write the model's weights in the bilm-tf/AllenNLP ``weights.hdf5`` layout.

    Reading the file back with :func:`load_elmo` (and the options from
    :func:`save_elmo_options`) gives bit-identical parameters. Same as
    :func:`write_elmo_weights` with the model's own options.
    """
    write_elmo_weights(model, model.options, path)


# --------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------


def save_elmo_safetensors(model: ElmoBiLM, path: PathLike) -> None:
    """Write the model (weights and options) to one safetensors file."""
    try:
        from safetensors.torch import save_file
    except ImportError as exc:  # pragma: no cover - safetensors is a dependency
        raise CheckpointError("Saving ELMo needs the 'safetensors' package: pip install safetensors") from exc
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": _SAFETENSORS_FORMAT, "options": json.dumps(model.options.to_dict())}
    save_file(state, str(path), metadata=metadata)


def load_elmo_safetensors(path: PathLike, device: Device = None) -> ElmoBiLM:
    """Load a model written by :func:`save_elmo_safetensors`.

    The options in the metadata are validated and the tensor names and shapes in
    the header are compared with the model they describe before any tensor is
    read or the model is built.
    """
    try:
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is a dependency
        raise CheckpointError("Loading ELMo needs the 'safetensors' package: pip install safetensors") from exc

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"ELMo safetensors file not found: '{path}'.")
    try:
        with safe_open(source, framework="pt") as handle:
            metadata = handle.metadata()
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            options = _options_from_metadata(metadata, source)
            _check_state_shapes(shapes, expected_state_shapes(options), source)
            tensors = {name: handle.get_tensor(name) for name in shapes}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"Could not read '{path}' as safetensors ({exc}). The file is corrupt; save it again."
        ) from exc
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: tensor '{name}' contains NaN or infinite values.")
    model = ElmoBiLM(options)
    model.load_state_dict(tensors)
    if device is not None:
        model.to(device)
    return model.eval()


def _options_from_metadata(metadata: Any, source: str) -> ElmoOptions:
    if not metadata or metadata.get("format") != _SAFETENSORS_FORMAT or "options" not in metadata:
        raise CheckpointError(
            f"{source}: not a spacy-ctx ELMo safetensors file (metadata 'format' should be "
            f"'{_SAFETENSORS_FORMAT}' with an 'options' entry). Save it with save_elmo_safetensors."
        )
    try:
        options_dict = json.loads(metadata["options"])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{source}: metadata 'options' is not valid JSON ({exc}).") from exc
    return ElmoOptions.from_dict(options_dict, source=f"{source} (metadata 'options')")


def _check_state_shapes(
    found: Dict[str, Tuple[int, ...]], expected: Dict[str, Tuple[int, ...]], source: str
) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(
            f"{source}: tensor '{missing[0]}' is missing ({len(missing)} missing in all). The "
            "file does not match its own options; save it again."
        )
    for name, shape in found.items():
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor '{name}'. Save the model again.")
        if shape != expected[name]:
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {shape}, expected {expected[name]} from "
                "the options in its metadata. Save the model again."
            )
