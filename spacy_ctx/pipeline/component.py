"""``ContextualEncoder``: the one spaCy component class behind ``ctx_bert`` and ``ctx_elmo``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import srsly
from spacy.language import Language
from spacy.pipeline import TrainablePipe
from spacy.tokens import Doc
from spacy.training import Example
from spacy.util import ensure_path
from spacy.vocab import Vocab
from thinc.api import Model, Optimizer

from ..backends import CtxOutput, load_backend
from ..doc_data import CtxData, install_vector_hooks
from ..errors import ConfigError
from ..layers.encoder import (
    backend_from_bytes,
    backend_to_bytes,
    ensure_backend,
    get_backend,
    set_backend,
)

STORE_MODES = ("none", "last", "all")
STORE_DTYPES = ("float32", "float16")
ENCODER_DIR = "encoder"


class ContextualEncoder(TrainablePipe):
    """Runs a contextual encoder over Docs and stores token-aligned layers on them.

    The model is a ``Model[List[Doc], List[CtxOutput]]`` built by a registered
    architecture (``spacy_ctx.BertEncoder.v1``, ...). Downstream components can
    attach listeners (``self.listeners``) that receive the encoder's outputs during
    training.
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
        vector_hooks: bool = True,
        max_batch_tokens: int = 4096,
        vector_mode: str = "last",
    ) -> None:
        if store not in STORE_MODES:
            raise ConfigError(f"[components.{name}] store must be one of {STORE_MODES}, got {store!r}")
        if store_dtype not in STORE_DTYPES:
            raise ConfigError(
                f"[components.{name}] store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}"
            )
        if int(max_batch_tokens) < 1:
            raise ConfigError(f"[components.{name}] max_batch_tokens must be positive")
        if vector_hooks and store == "none":
            raise ConfigError(
                f"[components.{name}] vector_hooks=true needs stored vectors; set store to "
                "'last' or 'all', or vector_hooks to false."
            )
        self.vocab = vocab
        self.model = model
        self.name = name
        self.listener_map: Dict[str, List[Model]] = {}
        self.cfg: Dict[str, Any] = {
            "frozen": bool(frozen),
            "store": store,
            "store_dtype": store_dtype,
            "vector_hooks": bool(vector_hooks),
            "max_batch_tokens": int(max_batch_tokens),
            "vector_mode": vector_mode,
        }
        model.attrs["max_batch_tokens"] = int(max_batch_tokens)
        model.attrs["trainable"] = not frozen

    # -- listeners (training with downstream components) --------------------------
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

    def remove_listener(self, listener: Model, component_name: str) -> bool:
        if listener in self.listener_map.get(component_name, []):
            self.listener_map[component_name].remove(listener)
            if not self.listener_map[component_name]:
                del self.listener_map[component_name]
            return True
        return False

    # -- prediction --------------------------------------------------------------------
    @property
    def layer_names(self) -> List[str]:
        """Names of all encoder layers (loads the weights if needed)."""
        return ensure_backend(self.model).layer_names

    def _stored_layers(self) -> Optional[List[int]]:
        n_layers = len(self.layer_names)
        store = self.cfg["store"]
        if store == "all":
            return None
        return [n_layers - 1] if store == "last" else []

    def predict(self, docs: Iterable[Doc]) -> List[CtxOutput]:
        docs = list(docs)
        keep = self._stored_layers()
        if keep == []:
            return [None] * len(docs)  # type: ignore[list-item]
        self.model.attrs["keep_layers"] = keep
        try:
            return self.model.predict(docs)
        finally:
            self.model.attrs["keep_layers"] = None

    def set_annotations(self, docs: Sequence[Doc], outputs: List[CtxOutput]) -> None:
        if self.cfg["store"] == "none":
            return
        names = self.layer_names
        stored_names = names if self.cfg["store"] == "all" else names[-1:]
        dtype = np.dtype(self.cfg["store_dtype"])
        model_name = ensure_backend(self.model).name
        for doc, output in zip(docs, outputs):
            pooled = output.pool("mean").float().cpu().numpy().astype(dtype, copy=False)
            doc._.ctx = CtxData(
                layers=pooled,
                layer_names=list(stored_names),
                model_name=model_name,
                piece_counts=np.asarray(output.lengths, dtype=np.int32),
                vector_mode=self.cfg["vector_mode"],
            )
            if self.cfg["vector_hooks"]:
                install_vector_hooks(doc)

    # -- training (listeners come in later issues; the hooks are here) ----------------
    def initialize(
        self,
        get_examples: Optional[Callable[[], Iterable[Example]]] = None,
        *,
        nlp: Optional[Language] = None,
    ) -> None:
        """Load the encoder weights named in the config (no-op if already loaded)."""
        self.model.initialize()

    def finish_update(self, sgd: Optimizer) -> None:
        if not self.cfg["frozen"]:
            self.model.finish_update(sgd)
            ensure_backend(self.model).weights_changed()

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
        ensure_backend(self.model).save(encoder_dir)

    def from_disk(
        self, path: Union[str, Path], *, exclude: Iterable[str] = tuple()
    ) -> "ContextualEncoder":
        path = ensure_path(path)
        set_backend(self.model, load_backend(path / ENCODER_DIR))
        return self

    def to_bytes(self, *, exclude: Iterable[str] = tuple()) -> bytes:
        return srsly.msgpack_dumps({"encoder": backend_to_bytes(ensure_backend(self.model))})

    def from_bytes(self, bytes_data: bytes, *, exclude: Iterable[str] = tuple()) -> "ContextualEncoder":
        data = srsly.msgpack_loads(bytes_data)
        set_backend(self.model, backend_from_bytes(data["encoder"]))
        return self

    @property
    def is_loaded(self) -> bool:
        """Whether the encoder weights are in memory."""
        return get_backend(self.model) is not None
