"""The backend protocol shared by every encoder family, and per-doc outputs."""

from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Type, Union

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

BACKEND_FILE = "backend.json"
POOLING_METHODS = ("mean", "first", "last", "max")
MIXED_PRECISION = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CtxOutput:
    """Encoder output for one Doc, before pooling to tokens.

    ``layers``: (n_layers, n_units, width) tensor, where units are word pieces
    (BERT) or tokens (ELMo). ``lengths``: units per spaCy token (int32 numpy,
    summing to n_units); a token can have 0 units.
    """

    layers: torch.Tensor
    lengths: np.ndarray

    @property
    def n_tokens(self) -> int:
        return len(self.lengths)

    def pool(self, method: str = "mean") -> torch.Tensor:
        """Pool units to tokens: (n_layers, n_tokens, width); 0-unit tokens get zeros."""
        return pool_units(self.layers, self.lengths, method)


def pool_units(layers: torch.Tensor, lengths: np.ndarray, method: str = "mean") -> torch.Tensor:
    """Reduce each token's units (dim 1 of ``layers``) to one row per token."""
    if method not in POOLING_METHODS:
        raise ConfigError(f"pooling must be one of {POOLING_METHODS}, got {method!r}")
    n_layers, n_units, width = layers.shape
    n_tokens = len(lengths)
    if n_units == n_tokens and bool(np.all(lengths == 1)):
        return layers  # one unit per token (ELMo, or all single-piece words)
    device = layers.device
    lengths_t = torch.as_tensor(lengths, dtype=torch.long, device=device)
    if method in ("first", "last"):
        ends = torch.cumsum(lengths_t, 0)
        starts = ends - lengths_t
        index = (starts if method == "first" else ends - 1).clamp(min=0, max=max(n_units - 1, 0))
        if n_units == 0:
            return layers.new_zeros((n_layers, n_tokens, width))
        pooled = layers.index_select(1, index)
        return pooled * (lengths_t > 0).to(layers.dtype)[None, :, None]
    token_of_unit = torch.repeat_interleave(torch.arange(n_tokens, device=device), lengths_t)
    if method == "mean":
        summed = layers.new_zeros((n_layers, n_tokens, width)).index_add(1, token_of_unit, layers)
        counts = lengths_t.clamp(min=1).to(layers.dtype)
        return summed / counts[None, :, None]
    index = token_of_unit[None, :, None].expand(n_layers, n_units, width)
    pooled = layers.new_full((n_layers, n_tokens, width), float("-inf"))
    pooled = pooled.scatter_reduce(1, index, layers, reduce="amax", include_self=True)
    return torch.where(torch.isinf(pooled), torch.zeros_like(pooled), pooled)


class EncoderBackend(nn.Module):
    """Base class: an encoder plus the input preparation of its family.

    Subclasses set ``family`` and implement :meth:`encode_docs`,
    :meth:`layer_names`, :meth:`width`, :meth:`save_files` and :meth:`from_files`.
    """

    family: str = ""

    def __init__(self, name: str, mixed_precision: Optional[str] = None) -> None:
        super().__init__()
        if mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"mixed_precision must be one of {sorted(MIXED_PRECISION, key=str)}, "
                f"got {mixed_precision!r}"
            )
        self.name = name
        self.mixed_precision = mixed_precision

    # -- to implement ---------------------------------------------------------
    @property
    def layer_names(self) -> List[str]:
        raise NotImplementedError

    @property
    def width(self) -> int:
        raise NotImplementedError

    def encode_docs(
        self,
        docs: Sequence,
        *,
        max_batch_tokens: int,
        keep_layers: Optional[Sequence[int]] = None,
    ) -> List[CtxOutput]:
        """Encode Docs; ``keep_layers`` selects layer indices (None: all)."""
        raise NotImplementedError

    def settings(self) -> Dict:
        """JSON-serialisable settings saved beside the weights."""
        return {"name": self.name, "mixed_precision": self.mixed_precision}

    def weights_changed(self) -> None:
        """Called after an optimizer step; drop anything derived from the old weights."""

    def save_files(self, path: Path) -> None:
        raise NotImplementedError

    @classmethod
    def from_files(cls, path: Path, settings: Dict) -> "EncoderBackend":
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for param in self.parameters():
            return param.device
        return torch.device("cpu")

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast to the configured low precision, if any."""
        dtype = MIXED_PRECISION[self.mixed_precision]
        if dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            yield

    def save(self, path: Union[str, Path]) -> None:
        """Write weights, tokenizer/vocabulary files and settings to a directory."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.save_files(path)
        meta = {"family": self.family, **self.settings()}
        (path / BACKEND_FILE).write_text(json.dumps(meta, indent=2), encoding="utf8")


_BACKENDS: Dict[str, Type[EncoderBackend]] = {}
_FAMILY_MODULES = {"bert": ".bert", "elmo": ".elmo"}


def register_backend(cls: Type[EncoderBackend]) -> Type[EncoderBackend]:
    """Class decorator: make a backend family loadable by :func:`load_backend`."""
    _BACKENDS[cls.family] = cls
    return cls


def load_backend(path: Union[str, Path]) -> EncoderBackend:
    """Load a backend saved with :meth:`EncoderBackend.save`."""
    path = Path(path)
    meta_path = path / BACKEND_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{meta_path}: missing; the pipeline folder is incomplete.") from err
    except ValueError as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err}).") from err
    family = meta.pop("family", None)
    if family in _FAMILY_MODULES and family not in _BACKENDS:
        # Families register themselves when their module is imported.
        importlib.import_module(_FAMILY_MODULES[family], __package__)
    if family not in _BACKENDS:
        raise CheckpointError(f"{meta_path}: unknown encoder family {family!r}.")
    return _BACKENDS[family].from_files(path, meta)
