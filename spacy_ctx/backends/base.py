"""The backend protocol shared by every encoder family, and per-doc outputs."""

from __future__ import annotations

import contextlib
import importlib
import inspect
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

    ``layers``: (n_layers, n_pieces, width) tensor. A *piece* is the unit the
    encoder sees: a word piece (transformers) or a whole token (ELMo).
    ``piece_counts``: pieces per spaCy token (int32 numpy); a token can have 0
    pieces (whitespace, or nothing aligned to it).
    ``piece_index``: the piece positions each token uses, concatenated over tokens
    in order (int64 numpy, length ``piece_counts.sum()``); a piece may appear for
    several tokens and some pieces for none (see :mod:`spacy_ctx.pieces.alignment`).
    ``None`` means the identity: pieces partition the tokens in order.
    """

    layers: torch.Tensor
    piece_counts: np.ndarray
    piece_index: Optional[np.ndarray] = None

    @property
    def n_tokens(self) -> int:
        return len(self.piece_counts)

    def pool(self, method: str = "mean") -> torch.Tensor:
        """Pool pieces to tokens: (n_layers, n_tokens, width); 0-piece tokens get zeros."""
        return pool_pieces(self.layers, self.piece_counts, method, self.piece_index)

    def with_layers(self, layers: torch.Tensor) -> "CtxOutput":
        """The same alignment over other layers (a subset, or a copy on another device)."""
        return CtxOutput(layers, self.piece_counts, self.piece_index)


def to_host(tensor: torch.Tensor, dtype: Union[str, np.dtype] = "float32") -> np.ndarray:
    """``tensor`` as a numpy array of ``dtype`` (float32 or float16) in host memory.

    The conversion happens on the tensor's device before the copy, so a float16 store
    moves half the bytes over PCIe and the host does no conversion pass; a CPU
    tensor already of ``dtype`` is not copied at all (the array shares its memory).
    """
    target = {np.dtype("float32"): torch.float32, np.dtype("float16"): torch.float16}.get(np.dtype(dtype))
    if target is None:
        raise ValueError(f"to_host: dtype must be float32 or float16, got {dtype!r}")
    return tensor.detach().to(target).cpu().numpy()


def pool_pieces(
    layers: torch.Tensor,
    piece_counts: np.ndarray,
    method: str = "mean",
    piece_index: Optional[np.ndarray] = None,
) -> torch.Tensor:
    """Reduce each token's pieces (dim 1 of ``layers``) to one row per token.

    With ``piece_index``, the rows each token uses are gathered first (a piece may
    count for several tokens); the gather is differentiable and its backward
    scatter-adds, so pooling stays exact for gradients too.
    """
    if method not in POOLING_METHODS:
        raise ConfigError(f"pooling must be one of {POOLING_METHODS}, got {method!r}")
    if piece_index is not None:
        index = torch.as_tensor(np.asarray(piece_index), dtype=torch.long, device=layers.device)
        layers = layers.index_select(1, index)
    n_layers, n_pieces, width = layers.shape
    n_tokens = len(piece_counts)
    if n_pieces != int(np.sum(piece_counts)):
        raise ValueError(
            f"{n_pieces} pieces to pool but the piece counts of {n_tokens} tokens sum to "
            f"{int(np.sum(piece_counts))}."
        )
    if n_pieces == n_tokens and bool(np.all(piece_counts == 1)):
        return layers  # one piece per token (ELMo, or all single-piece words)
    device = layers.device
    counts_t = torch.as_tensor(piece_counts, dtype=torch.long, device=device)
    if method in ("first", "last"):
        ends = torch.cumsum(counts_t, 0)
        starts = ends - counts_t
        index = (starts if method == "first" else ends - 1).clamp(min=0, max=max(n_pieces - 1, 0))
        if n_pieces == 0:
            return layers.new_zeros((n_layers, n_tokens, width))
        pooled = layers.index_select(1, index)
        return pooled * (counts_t > 0).to(layers.dtype)[None, :, None]
    token_of_piece = torch.repeat_interleave(torch.arange(n_tokens, device=device), counts_t)
    if method == "mean":
        summed = layers.new_zeros((n_layers, n_tokens, width)).index_add(1, token_of_piece, layers)
        divisors = counts_t.clamp(min=1).to(layers.dtype)
        return summed / divisors[None, :, None]
    index = token_of_piece[None, :, None].expand(n_layers, n_pieces, width)
    pooled = layers.new_full((n_layers, n_tokens, width), float("-inf"))
    pooled = pooled.scatter_reduce(1, index, layers, reduce="amax", include_self=True)
    return torch.where(torch.isinf(pooled), torch.zeros_like(pooled), pooled)


class Backend(nn.Module):
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
    def from_files(cls, path: Path, settings: Dict) -> "Backend":
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


_BACKENDS: Dict[str, Type[Backend]] = {}
_FAMILY_MODULES = {"bert": ".bert", "elmo": ".elmo"}


def register_backend(cls: Type[Backend]) -> Type[Backend]:
    """Class decorator: make a backend family loadable by :func:`load_backend`."""
    _BACKENDS[cls.family] = cls
    return cls


def load_backend(path: Union[str, Path]) -> Backend:
    """Load a backend saved with :meth:`Backend.save`.

    ``backend.json`` is checked before any weight is read: it must be a JSON
    object naming a known ``family``, and its other keys must be exactly settings
    that family's constructor takes (keyword-only arguments), else
    :class:`CheckpointError` names the file and the key.
    """
    path = Path(path)
    meta_path = path / BACKEND_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{meta_path}: missing; the pipeline folder is incomplete.") from err
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err}).") from err
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{meta_path}: must hold a JSON object of settings, found {type(meta).__name__}."
        )
    family = meta.pop("family", None)
    if isinstance(family, str) and family in _FAMILY_MODULES and family not in _BACKENDS:
        # Families register themselves when their module is imported.
        importlib.import_module(_FAMILY_MODULES[family], __package__)
    if not isinstance(family, str) or family not in _BACKENDS:
        raise CheckpointError(f"{meta_path}: unknown encoder family {family!r}.")
    cls = _BACKENDS[family]
    _check_settings(cls, meta, meta_path)
    return cls.from_files(path, meta)


def _check_settings(cls: Type[Backend], settings: Dict, source: Path) -> None:
    """Settings must be keyword-only arguments of ``cls``; required ones present."""
    params = [
        p for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    allowed = {p.name for p in params}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise CheckpointError(
            f"{source}: unknown key {unknown[0]!r} for the {cls.family!r} encoder family "
            f"(known: {', '.join(sorted(allowed))}). The folder was written by another "
            "version of spacy-ctx or edited by hand."
        )
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in settings]
    if missing:
        raise CheckpointError(f"{source}: the required key {missing[0]!r} is missing.")
