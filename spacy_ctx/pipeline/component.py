"""``CtxComponent``: the one spaCy component class behind ``ctx_bert`` and ``ctx_elmo``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import srsly
import torch
from spacy.language import Language
from spacy.pipeline import TrainablePipe
from spacy.tokens import Doc
from spacy.training import Example
from spacy.util import ensure_path
from spacy.vocab import Vocab
from thinc.api import Model, Optimizer

from spacy.training import validate_examples

from ..backends import Backend, CtxOutput, load_backend
from ..backends.base import to_host
from ..ctx_data import INT8_MAX, STORE_DTYPES
from ..doc_data import CtxData, install_vector_hooks
from ..errors import ConfigError
from ..thinc_layers.backend_layer import (
    GradMode,
    backend_from_bytes,
    backend_to_bytes,
    ensure_backend,
    get_backend,
    run_backend,
    set_backend,
)
from ..thinc_layers.listeners import LAYERS_ALL, build_standalone, get_batch_id, is_listener
from . import allocator
from .feature_cache import FeatureCache, doc_key

STORE_MODES = ("none", "last", "all")
ENCODER_DIR = "encoder"


class CtxComponent(TrainablePipe):
    """Runs a contextual encoder over Docs and stores token-aligned layers on them.

    The model is a ``Model[List[Doc], List[CtxOutput]]`` built by a registered
    architecture (``spacy_ctx.BertEncoder.v1``, ``spacy_ctx.ElmoEncoder.v1``).
    Downstream components listen to it through ``spacy_ctx.LastLayerListener.v1``
    or ``spacy_ctx.ScalarMixListener.v1``: each batch is encoded once, every
    listener receives the outputs, and their gradients are summed before one
    backward pass through the encoder (in :meth:`finish_update`).
    """

    def __init__(
        self,
        vocab: Vocab,
        model: Model,
        name: str = "ctx_encoder",
        *,
        frozen: bool = False,
        store: str = "last",
        store_dtype: str = "float32",
        store_layers: Optional[Sequence[Union[int, str]]] = None,
        vector_hooks: bool = True,
        max_batch_tokens: int = 4096,
        vector_mode: str = "last",
        feature_cache_mb: float = 0.0,
        optimizer: Optional[Optimizer] = None,
    ) -> None:
        if store not in STORE_MODES:
            raise ConfigError(f"[components.{name}] store must be one of {STORE_MODES}, got {store!r}")
        if store_dtype not in STORE_DTYPES:
            raise ConfigError(
                f"[components.{name}] store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}"
            )
        store_layers = _check_store_layers(name, store, store_layers)
        if int(max_batch_tokens) < 1:
            raise ConfigError(f"[components.{name}] max_batch_tokens must be positive")
        if vector_hooks and store == "none":
            raise ConfigError(
                f"[components.{name}] vector_hooks=true needs stored vectors; set store to "
                "'last' or 'all', or vector_hooks to false."
            )
        if feature_cache_mb < 0:
            raise ConfigError(f"[components.{name}] feature_cache_mb must be >= 0")
        self.vocab = vocab
        self.model = model
        self.name = name
        self.listener_map: Dict[str, List[Model]] = {}
        self.cfg: Dict[str, Any] = {
            "frozen": bool(frozen),
            "store": store,
            "store_dtype": store_dtype,
            "store_layers": store_layers,
            "vector_hooks": bool(vector_hooks),
            "max_batch_tokens": int(max_batch_tokens),
            "vector_mode": vector_mode,
            "feature_cache_mb": float(feature_cache_mb),
        }
        self.optimizer = optimizer
        self.feature_cache = FeatureCache(feature_cache_mb)
        self._pending_backprop: Optional[Callable] = None
        self._stored_indices: Optional[List[int]] = None  # resolved once the model is loaded
        self._set_replace_listener_hooks()

    # -- listeners -------------------------------------------------------------------------
    @property
    def listeners(self) -> List[Model]:
        return [m for c in self.listening_components for m in self.listener_map[c]]

    @property
    def listening_components(self) -> List[str]:
        return list(self.listener_map.keys())

    def add_listener(self, listener: Model, component_name: str) -> None:
        self.listener_map.setdefault(component_name, [])
        if listener not in self.listener_map[component_name]:
            self.listener_map[component_name].append(listener)
        listener.attrs["link"].component = self
        if self.is_loaded:
            listener.set_dim("nO", self.width, force=True)

    def remove_listener(self, listener: Model, component_name: str) -> bool:
        if listener in self.listener_map.get(component_name, []):
            self.listener_map[component_name].remove(listener)
            if not self.listener_map[component_name]:
                del self.listener_map[component_name]
            return True
        return False

    def find_listeners(self, component: Any) -> None:
        """Register the ctx listeners inside ``component`` whose upstream is us or "*"."""
        model = getattr(component, "model", None)
        if not isinstance(model, Model):
            return
        for node in model.walk():
            if is_listener(node) and node.attrs["upstream_name"] in ("*", self.name):
                self.add_listener(node, component.name)

    def _set_replace_listener_hooks(self) -> None:
        """Tell ``nlp.replace_listeners`` how to make a listener standalone.

        The standalone copy takes this component's ``frozen`` and
        ``max_batch_tokens`` settings, as arguments and in its config.
        """
        settings = {"frozen": self.cfg["frozen"], "max_batch_tokens": self.cfg["max_batch_tokens"]}

        def replace_listener(encoder_copy: Model, listener: Model, component: Any) -> Model:
            return build_standalone(encoder_copy, listener.layers[0], **settings)

        def replace_listener_cfg(encoder_cfg: Dict, listener_cfg: Dict) -> Dict:
            return {
                "@architectures": "spacy_ctx.StandaloneEncoder.v1",
                "encoder": encoder_cfg,
                "listener": listener_cfg,
                **settings,
            }

        self.model.attrs["replace_listener"] = replace_listener
        self.model.attrs["replace_listener_cfg"] = replace_listener_cfg

    # -- encoding ------------------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        """The encoder backend (loads the weights named in the config if needed)."""
        return ensure_backend(self.model)

    @property
    def layer_names(self) -> List[str]:
        """Names of all encoder layers (loads the weights if needed)."""
        return self.backend.layer_names

    @property
    def width(self) -> int:
        """Width of every encoder layer (loads the weights if needed)."""
        return self.backend.width

    @property
    def stored_layers(self) -> List[int]:
        """Indices (in model order) of the layers stored on ``doc._.ctx``.

        ``store_layers`` when set, else what ``store`` says. Resolved against the
        encoder's layer names once it is loaded; a bad entry is a ConfigError
        naming the setting and the available layers.
        """
        if self._stored_indices is None:
            names = self.layer_names
            if self.cfg["store"] == "none":
                indices: List[int] = []
            elif self.cfg["store_layers"] is not None:
                indices = _resolve_store_layers(self.name, self.cfg["store_layers"], names)
            elif self.cfg["store"] == "all":
                indices = list(range(len(names)))
            else:
                indices = [len(names) - 1]
            self._stored_indices = indices
        return self._stored_indices

    def _keep_layers(self, *, for_store: bool, for_listeners: bool) -> Optional[List[int]]:
        """Layer indices to compute, ascending (None = all), given who consumes them."""
        n_layers = len(self.layer_names)
        if for_listeners and any(l.attrs["layers_needed"] == LAYERS_ALL for l in self.listeners):
            return None
        keep = set(self.stored_layers) if for_store else set()
        if for_listeners and self.listeners:
            keep.add(n_layers - 1)  # last-layer listeners read outputs[i].layers[-1]
        if len(keep) == n_layers:
            return None
        return sorted(keep)

    def _tracks_grads(self) -> bool:
        return not self.cfg["frozen"] and any(l.attrs["grad_factor"] != 0 for l in self.listeners)

    def _encode(self, docs: List[Doc], keep: Optional[List[int]], mode: GradMode):
        return run_backend(
            self.model, docs, mode=mode, layers=keep, max_batch_tokens=self.cfg["max_batch_tokens"]
        )

    def _encode_without_grads(self, docs: List[Doc], keep: Optional[List[int]]) -> List[CtxOutput]:
        """Encode for training without autograd, through the feature cache.

        The cache serves frozen encoders only: other weights may change at any step.
        """
        use_cache = self.feature_cache.enabled and self.cfg["frozen"]
        keys = [doc_key(doc, keep) for doc in docs] if use_cache else []
        device = self.backend.device
        outputs: List[Optional[CtxOutput]] = (
            [self.feature_cache.get(k, device) for k in keys] if use_cache else [None] * len(docs)
        )
        missing = [i for i, o in enumerate(outputs) if o is None]
        if missing:
            fresh, _ = self._encode([docs[i] for i in missing], keep, GradMode.FROZEN)
            for i, output in zip(missing, fresh):
                # put() returns the output rounded like a cached one, so results
                # do not depend on cache hits.
                outputs[i] = self.feature_cache.put(keys[i], output) if use_cache else output
        return outputs  # type: ignore[return-value]

    def encode_for_listener(self, docs: List[Doc], layers_needed: str) -> List[CtxOutput]:
        """Outputs for a listener that received none (initialization, frozen, ...)."""
        keep = None if layers_needed == LAYERS_ALL else [len(self.layer_names) - 1]
        return self._encode_without_grads(list(docs), keep)

    def predict(self, docs: Iterable[Doc]) -> List[Optional[CtxOutput]]:
        docs = list(docs)
        keep = self._keep_layers(for_store=True, for_listeners=True)
        if keep == []:
            return [None] * len(docs)
        outputs, _ = self._encode(docs, keep, GradMode.PREDICT)
        for listener in self.listeners:  # downstream components reuse this pass
            listener.attrs["link"].receive_prediction(docs, outputs)
        return outputs

    def set_annotations(self, docs: Sequence[Doc], outputs: List[Optional[CtxOutput]]) -> None:
        """Store the selected layers, pooled to tokens, on ``doc._.ctx`` (as ``store_dtype``)."""
        stored = self.stored_layers
        if not stored:
            return
        names = self.layer_names
        stored_names = [names[i] for i in stored]
        model_name = self.backend.name
        store_dtype = self.cfg["store_dtype"]
        # predict() computed _keep_layers(...) in ascending order (None: every layer).
        keep = self._keep_layers(for_store=True, for_listeners=True)
        computed = list(range(len(names))) if keep is None else keep
        for doc, output in zip(docs, outputs):
            if output.layers.shape[0] == len(names):
                positions = stored
            elif output.layers.shape[0] == len(computed):
                positions = [computed.index(i) for i in stored]
            else:
                raise ValueError(
                    f"{self.name}: an output with {output.layers.shape[0]} layers cannot hold "
                    f"the stored layers {stored_names} (expected {len(computed)} or {len(names)})"
                )
            layers = output.layers
            if positions != list(range(layers.shape[0])):
                layers = layers[torch.as_tensor(positions, device=layers.device)]
            pooled = output.with_layers(layers).pool("mean")
            # Converted on the encoder's device before the copy to host memory: float16
            # moves half the bytes, int8 (values + one scale per row) about a quarter.
            if store_dtype == "int8":
                values, scales = quantize_rows_on_device(pooled)
            else:
                values, scales = to_host(pooled, store_dtype), None
            doc._.ctx = CtxData(
                values,
                stored_names,
                model_name,
                np.asarray(output.piece_counts, dtype=np.int32),
                vector_mode=self.cfg["vector_mode"],
                scales=scales,
            )
            if self.cfg["vector_hooks"]:
                install_vector_hooks(doc)

    # -- training ---------------------------------------------------------------------------------
    def initialize(
        self,
        get_examples: Optional[Callable[[], Iterable[Example]]] = None,
        *,
        nlp: Optional[Language] = None,
    ) -> None:
        """Load the encoder weights named in the config (no-op if already loaded) and
        check ``store_layers`` against its layer names."""
        self.model.initialize()
        self._stored_indices = None
        self.stored_layers  # noqa: B018 -- a bad store_layers fails here, not mid-pipe
        for listener in self.listeners:
            listener.set_dim("nO", self.width, force=True)

    def update(
        self,
        examples: Iterable[Example],
        *,
        drop: float = 0.0,
        sgd: Optional[Optimizer] = None,
        losses: Optional[Dict[str, float]] = None,
    ) -> Dict[str, float]:
        """Encode the batch once and hand the outputs to every listener.

        The listeners' gradients are summed, and one backward pass through the
        encoder runs when the last of them has reported (or at the next update,
        if a listening component was not updated). As with spaCy's Tok2Vec, the
        optimizer applies them at the next :meth:`finish_update`; when ``sgd`` is
        given here, it steps right after the backward pass instead.
        """
        if losses is None:
            losses = {}
        losses.setdefault(self.name, 0.0)
        examples = list(examples)
        validate_examples(examples, "CtxComponent.update")
        docs = [eg.predicted for eg in examples]
        self._flush_gradients()
        listeners = self.listeners
        if not listeners:
            return losses
        keep = self._keep_layers(for_store=False, for_listeners=True)
        if self._tracks_grads():
            outputs, backprop = self._encode(docs, keep, GradMode.TRAIN)
        else:
            outputs, backprop = self._encode_without_grads(docs, keep), None
        batch_id = get_batch_id(docs)
        if backprop is None:
            for listener in listeners:
                listener.attrs["link"].receive(batch_id, outputs, None)
            return losses
        accumulated: List[Any] = [None] * len(docs)
        n_waiting = [len(listeners)]

        def run_backward() -> None:
            backprop(accumulated)

        def receive_gradient(d_outputs: Optional[List[Any]]) -> None:
            if d_outputs is not None:
                for i, d in enumerate(d_outputs):
                    accumulated[i] = d if accumulated[i] is None else accumulated[i] + d
                    losses[self.name] += float((d**2).sum())
            n_waiting[0] -= 1
            if n_waiting[0] == 0:
                self._flush_gradients()
                if sgd is not None:
                    self.finish_update(sgd)

        self._pending_backprop = run_backward
        for listener in listeners:
            listener.attrs["link"].receive(batch_id, outputs, receive_gradient)
        return losses

    def _flush_gradients(self) -> None:
        """Run the pending backward pass through the encoder, at most once per batch."""
        pending, self._pending_backprop = self._pending_backprop, None
        if pending is not None:
            pending()

    def finish_update(self, sgd: Optimizer) -> None:
        """Apply the encoder gradients with ``sgd`` or the component's own optimizer."""
        if self.cfg["frozen"] or not self.is_loaded:
            return
        optimizer = self.optimizer if self.optimizer is not None else sgd
        self.model.finish_update(optimizer)
        if self.optimizer is not None:
            self.optimizer.step_schedules()
        self.backend.weights_changed()
        allocator.after_training_step()  # freed activations: pages back to the OS, every N steps

    def get_loss(self, examples, scores):
        raise NotImplementedError("The encoder has no loss of its own; listeners provide it.")

    # -- serialization ------------------------------------------------------------------
    def to_disk(self, path: Union[str, Path], *, exclude: Iterable[str] = tuple()) -> None:
        """Write ``encoder/``: weights as safetensors, tokenizer/vocabulary, encoder config.

        The component settings live in the pipeline's config.cfg, so a loaded
        pipeline can override them with ``spacy.load(..., config=...)``.
        """
        path = ensure_path(path)
        path.mkdir(parents=True, exist_ok=True)
        encoder_dir = path / ENCODER_DIR
        if encoder_dir.exists():
            shutil.rmtree(encoder_dir)
        self.backend.save(encoder_dir)

    def from_disk(
        self, path: Union[str, Path], *, exclude: Iterable[str] = tuple()
    ) -> "CtxComponent":
        path = ensure_path(path)
        set_backend(self.model, load_backend(path / ENCODER_DIR))
        self.feature_cache.clear()
        self._stored_indices = None
        return self

    def to_bytes(self, *, exclude: Iterable[str] = tuple()) -> bytes:
        return srsly.msgpack_dumps({"encoder": backend_to_bytes(self.backend)})

    def from_bytes(self, bytes_data: bytes, *, exclude: Iterable[str] = tuple()) -> "CtxComponent":
        data = srsly.msgpack_loads(bytes_data)
        set_backend(self.model, backend_from_bytes(data["encoder"]))
        self.feature_cache.clear()
        self._stored_indices = None
        return self

    @property
    def is_loaded(self) -> bool:
        """Whether the encoder weights are in memory."""
        return get_backend(self.model) is not None


def _check_store_layers(
    name: str, store: str, store_layers: Optional[Sequence[Union[int, str]]]
) -> Optional[List[Union[int, str]]]:
    """Type check of ``store_layers`` (the names are checked once the model is loaded)."""
    if store_layers is None:
        return None
    setting = f"[components.{name}] store_layers"
    if isinstance(store_layers, (str, bytes)) or not isinstance(store_layers, Sequence):
        raise ConfigError(
            f"{setting} must be a list of layer indices or names, e.g. [-1] or "
            f'["layer_4", "layer_6"], got {store_layers!r}'
        )
    if not store_layers:
        raise ConfigError(f"{setting} is empty; use store = \"none\" to store nothing")
    for entry in store_layers:
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise ConfigError(
                f"{setting} entries must be layer indices (int, negative counts from the "
                f"last) or layer names (str), got {entry!r}"
            )
    if store == "none":
        raise ConfigError(
            f"{setting} = {list(store_layers)!r} conflicts with store = \"none\"; set store "
            "to \"last\" or \"all\" (store_layers overrides its choice) or drop store_layers"
        )
    return list(store_layers)


def _resolve_store_layers(
    name: str, store_layers: Sequence[Union[int, str]], names: List[str]
) -> List[int]:
    """Layer indices, ascending, for ``store_layers`` entries (indices or names)."""
    setting = f"[components.{name}] store_layers"
    available = f"the encoder has {len(names)} layers: {', '.join(names)}"
    indices: Dict[int, Union[int, str]] = {}
    for entry in store_layers:
        if isinstance(entry, str):
            if entry not in names:
                raise ConfigError(f"{setting}: no layer named {entry!r}; {available}")
            index = names.index(entry)
        else:
            if not -len(names) <= entry < len(names):
                raise ConfigError(
                    f"{setting}: layer index {entry} is out of range "
                    f"({-len(names)}..{len(names) - 1}); {available}"
                )
            index = entry % len(names)
        if index in indices:
            raise ConfigError(
                f"{setting} names layer {names[index]!r} twice ({indices[index]!r} and {entry!r})"
            )
        indices[index] = entry
    return sorted(indices)


def quantize_rows_on_device(pooled: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """int8 values and float32 per-row scales of ``pooled`` (..., width), computed on its
    device and then copied to host memory (a quarter of float32's bytes).

    The same arithmetic as :func:`spacy_ctx.ctx_data.quantize_rows` (symmetric absmax
    per row, ``round(x / scale)`` with ties to even, all in float32), so the values
    are identical to quantizing the float32 array on the host.
    """
    rows = pooled.detach().float()
    scales = rows.abs().amax(dim=-1) / float(INT8_MAX) if rows.shape[-1] else rows.new_zeros(rows.shape[:-1])
    nonzero = (scales > 0)[..., None]
    scaled = torch.where(nonzero, rows / torch.where(nonzero, scales[..., None], 1.0), 0.0)
    values = scaled.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values.cpu().numpy(), scales.cpu().numpy()
