"""The Thinc layer that runs an encoder backend: ``Model[List[Doc], List[CtxOutput]]``.

The backend (a ``torch.nn.Module``) lives in a ``PyTorchShim`` so Thinc optimizers,
``finish_update``, device moves and ``Model.to_bytes`` reach it. Weights are
loaded when the model is initialized or, failing that, on first use, never at
construction: a pipeline built from a config does no I/O until it needs to. The
shim exists from the start (empty until loading), because Thinc deserializes
shims into an existing structure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import srsly
import torch
from spacy.tokens import Doc
from thinc.api import Model, PyTorchGradScaler, PyTorchShim
from thinc.backends import CupyOps
from thinc.util import torch2xp, xp2torch

from ..backends import CtxOutput, Backend, load_backend
from ..errors import ConfigError

BackendLoader = Callable[[], Backend]
# Layer indices to return: None = all; [] = none.
LayerSelection = Optional[Sequence[int]]
DEFAULT_MAX_BATCH_TOKENS = 4096
# One lock for first loads: a module-level lock survives deepcopy and serialization
# of the Thinc model (an attr would not), and loads are rare.
_LOAD_LOCK = threading.RLock()


def _one_torch_thread_after_fork() -> None:
    # GNU OpenMP is not fork-safe: a forked child that enters a parallel region waits
    # forever for the parent's threads. spaCy's nlp.pipe(n_process>1) forks on Linux.
    torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_torch_thread_after_fork)

BackendLayer = Model[List[Doc], List[CtxOutput]]


class BackendShim(PyTorchShim):
    """A PyTorchShim whose module may not be loaded yet (``_model is None``)."""

    def to_device(self, device_type: str, device_id: int) -> None:
        if self._model is not None:
            super().to_device(device_type, device_id)

    def to_bytes(self) -> bytes:
        if self._model is None:  # still lazy: the config names what to load
            return srsly.msgpack_dumps({"config": self.cfg, "state": b""})
        return super().to_bytes()

    def finish_update(self, optimizer) -> None:
        """Thinc's update, but the new weights are written into the parameters in place.

        ``PyTorchShim.finish_update`` sets ``param.data`` to a tensor made from the
        optimizer's result, a numpy/cupy view of the previous ``param.data``: each step
        chained one more tensor and array per parameter, never freed (issue 7, 2.10).
        """
        for name, param in self._model.named_parameters() if self._model is not None else ():
            if param.grad is None:
                continue
            if not self._grad_scaler.found_inf:  # skip the step if a gradient overflowed
                weights, _ = optimizer((self.id, name), torch2xp(param.data), torch2xp(param.grad))
                updated = xp2torch(weights, device=param.device)
                if updated.data_ptr() != param.data.data_ptr():  # not updated in place
                    param.data.copy_(updated.view_as(param.data))
            param.grad.zero_()
        self._grad_scaler.update()


def build_backend_layer(
    loader: BackendLoader,
    *,
    device: Optional[str] = None,
    runtime_settings: Optional[Dict[str, Any]] = None,
) -> BackendLayer:
    """Wrap a lazily loaded backend as a Thinc model.

    device: torch device for the encoder (``"cuda:0"``...); None follows the
    Thinc ops (CUDA when spaCy's GPU is active, else CPU).
    runtime_settings: backend attributes that may change on a loaded backend
    (``mixed_precision``, ``quantize``), as the config gives them. They are applied
    to every backend installed by :func:`set_backend`, so a pipeline read from disk
    follows its config (``spacy.load(path, config=...)`` overrides) rather than the
    values saved in ``backend.json``.
    The attrs hold only these construction-time settings; per-call settings (which
    layers, whether to track gradients, the batch budget) are arguments of
    :func:`run_backend`.
    """
    if device is not None:
        try:
            torch.device(device)
        except RuntimeError as err:
            raise ConfigError(f"device={device!r} is not a torch device name ({err}).") from err
    shim = BackendShim(
        None,
        device=torch.device("cpu"),
        serialize_model=_serialize_backend,
        deserialize_model=_deserialize_backend,
    )
    return Model(
        "ctx_backend",
        forward,
        init=init,
        shims=[shim],
        attrs={
            "loader": loader,  # a function: Thinc skips it when serializing
            "device": device,
            "runtime_settings": dict(runtime_settings or {}),
        },
    )


def get_backend(model: BackendLayer) -> Optional[Backend]:
    """The loaded backend, or None before loading."""
    return model.shims[0]._model


def ensure_backend(model: BackendLayer) -> Backend:
    """Return the backend, loading the weights named in the config if needed.

    Thread-safe: threads that make the first call at once load the weights once.
    """
    backend = get_backend(model)
    if backend is None:
        with _LOAD_LOCK:
            backend = get_backend(model)
            if backend is None:
                set_backend(model, model.attrs["loader"]())
                backend = get_backend(model)
    else:
        _follow_device(model, backend)
    return backend  # type: ignore[return-value]


def set_backend(model: BackendLayer, backend: Backend) -> None:
    """Install a backend, on the configured device, in place of any previous one.

    The layer's runtime settings (see :func:`build_backend_layer`) win over the
    backend's own: a loaded pipeline follows its config.
    """
    for key, value in model.attrs.get("runtime_settings", {}).items():
        if getattr(backend, key, value) != value:
            setattr(backend, key, value)  # validated by the backend's property setter
    backend.eval()
    shim: PyTorchShim = model.shims[0]
    device = _torch_device(model)
    shim._model = backend.to(device)
    # Loss scaling keeps small fp16 gradients from underflowing; bf16 does not need it.
    use_scaler = backend.mixed_precision == "fp16" and device.type == "cuda"
    shim._grad_scaler = PyTorchGradScaler(enabled=use_scaler)
    shim._grad_scaler.to_(device)


def _follow_device(model: BackendLayer, backend: Backend) -> None:
    # Deserialized backends arrive on Thinc's default device; honour the setting.
    device = _torch_device(model)
    if backend.device != device and backend.device.type != device.type:
        set_backend(model, backend)


def _torch_device(model: BackendLayer) -> torch.device:
    if model.attrs["device"] is not None:
        return torch.device(model.attrs["device"])
    if isinstance(model.ops, CupyOps):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(model: BackendLayer, X: Optional[List[Doc]] = None, Y=None) -> None:
    ensure_backend(model)


class GradMode(str, Enum):
    """How an encoding pass treats autograd."""

    TRAIN = "train"  # gradients into the encoder weights
    FROZEN = "frozen"  # training step without gradients (frozen encoder, or grad_factor 0)
    PREDICT = "predict"  # inference: cheapest, tensors never join an autograd graph


def run_backend(
    model: BackendLayer,
    docs: List[Doc],
    *,
    mode: GradMode,
    layers: LayerSelection = None,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> Tuple[List[CtxOutput], Callable]:
    """Encode Docs with the layer's backend; returns outputs and a backprop callback.

    layers: indices of the layers to return (None: all). The callback takes one
    gradient per Doc, shaped like ``outputs[i].layers`` (torch, numpy or cupy),
    and is a no-op unless ``mode`` is ``GradMode.TRAIN``.
    """
    backend = ensure_backend(model)
    track_grads = mode == GradMode.TRAIN
    backend.train(track_grads)
    # inference_mode is the cheapest at prediction time; frozen training uses no_grad
    # because inference tensors could not later take part in a listener's autograd graph.
    grad_context = {
        GradMode.TRAIN: torch.enable_grad,
        GradMode.FROZEN: torch.no_grad,
        GradMode.PREDICT: torch.inference_mode,
    }[mode]
    with grad_context():
        outputs = backend.encode_docs(docs, max_batch_tokens=max_batch_tokens, keep_layers=layers)

    def backprop(d_outputs: Sequence[Any]) -> List[Doc]:
        if not track_grads:
            return []
        tensors, grads = [], []
        for output, d in zip(outputs, d_outputs):
            if d is None or not output.layers.requires_grad:
                continue
            if not isinstance(d, torch.Tensor):
                d = xp2torch(d, device=output.layers.device)
            tensors.append(output.layers)
            grads.append(d.to(output.layers.device, output.layers.dtype))
        if tensors:
            scaler = model.shims[0]._grad_scaler  # active for fp16 on CUDA only
            torch.autograd.backward(tensors, scaler.scale(grads) if scaler._enabled else grads)
            if scaler._enabled:
                scaler.unscale([p.grad for p in backend.parameters() if p.grad is not None])
        return []

    return outputs, backprop


def forward(model: BackendLayer, docs: List[Doc], is_train: bool) -> Tuple[List[CtxOutput], Callable]:
    """Thinc forward with the defaults: every layer, gradients when training."""
    return run_backend(model, docs, mode=GradMode.TRAIN if is_train else GradMode.PREDICT)


def _serialize_backend(backend: Backend) -> bytes:
    """All backend files in one msgpack blob (used by Model.to_bytes and copies)."""
    with tempfile.TemporaryDirectory() as tmp:
        backend.save(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return srsly.msgpack_dumps(files)


def _deserialize_backend(_old, data: bytes, device: torch.device) -> Optional[Backend]:
    if not data:
        return None  # the model had not been loaded when it was saved
    files = srsly.msgpack_loads(data)
    tmp = tempfile.mkdtemp()
    try:
        for name, content in files.items():
            (Path(tmp) / name).write_bytes(content)
        return load_backend(tmp).to(device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def backend_to_bytes(backend: Backend) -> bytes:
    return _serialize_backend(backend)


def backend_from_bytes(data: bytes) -> Backend:
    return _deserialize_backend(None, data, torch.device("cpu"))
