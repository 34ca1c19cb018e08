"""The backend protocol shared by every encoder family, and per-doc outputs."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .precision import (
    PrecisionChoice,
    check_mixed_precision,
    logger,
    resolve_precision,
)

BACKEND_FILE = "backend.json"
POOLING_METHODS = ("mean", "first", "last", "max")
# Device types on which mixed_precision = "auto" may choose bf16 (where native), per
# family; others: CUDA and CPU. ELMo's per-step LSTM loop of small matmuls ran slower
# under bf16 autocast on an AVX-512 BF16 CPU (847 vs 1,345 words/s, "small" ELMo), so its
# "auto" stays float32 on CPU.
AUTO_BF16_DEVICES: Dict[str, Tuple[str, ...]] = {"elmo": ("cuda",)}


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
        self.name = name
        self.mixed_precision = mixed_precision

    @property
    def mixed_precision(self) -> Optional[str]:
        """The setting: None (float32), ``"auto"``, ``"bf16"`` or ``"fp16"``.

        Assignable (validated), e.g. to evaluate a loaded pipeline in bf16; the
        value is saved with the backend. :attr:`precision` says what it means on
        the current device.
        """
        return self.__dict__["_mixed_precision"]

    @mixed_precision.setter
    def mixed_precision(self, value: Optional[str]) -> None:
        check_mixed_precision(value)
        changed = "_mixed_precision" in self.__dict__ and self.__dict__["_mixed_precision"] != value
        self.__dict__["_mixed_precision"] = value
        # device -> PrecisionChoice, resolved again after a change.
        self.__dict__["_precision_choices"] = {}
        if changed:
            self.weights_changed()  # caches of outputs computed in the old precision

    def precision_choice(self, device: Optional[torch.device] = None) -> PrecisionChoice:
        """What :attr:`mixed_precision` means on ``device`` (default: the backend's).

        Resolved once per device; the first resolution of ``"auto"`` is logged
        (logger ``spacy_ctx``, level INFO) with the reason.
        """
        device = self.device if device is None else torch.device(device)
        choices = self.__dict__["_precision_choices"]
        key = str(device)
        if key not in choices:
            choice = resolve_precision(self.mixed_precision, device)
            allowed = AUTO_BF16_DEVICES.get(self.family, ("cuda", "cpu"))
            if self.mixed_precision == "auto" and device.type not in allowed:
                choice = PrecisionChoice(
                    "fp32", f"auto: bf16 is slower than float32 for {self.family} on {device.type}"
                )
            choices[key] = choice
            if self.mixed_precision == "auto":
                logger.info(
                    "%s: mixed_precision = 'auto' runs in %s on %s (%s)",
                    self.name, choice.precision, device, choice.reason,
                )
        return choices[key]

    @property
    def precision(self) -> str:
        """The arithmetic the encoder runs in on its device: ``"fp32"``, ``"bf16"``
        or ``"fp16"`` (what :attr:`mixed_precision` resolves to there)."""
        return self.precision_choice().precision

    def precision_info(self) -> Dict[str, object]:
        """The precision settings and what they mean on the current device, for
        reports: ``mixed_precision`` (setting), ``precision`` (resolved),
        ``reason``, ``device``."""
        choice = self.precision_choice()
        return {
            "mixed_precision": self.mixed_precision,
            "precision": choice.precision,
            "reason": choice.reason,
            "device": str(self.device),
        }

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
        """Autocast to the low precision :attr:`mixed_precision` resolves to on the
        backend's device, if any (``"auto"``: bf16 where native, else none)."""
        device = self.device
        dtype = self.autocast_dtype(device)
        if dtype is None:
            yield
            return
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield

    def autocast_dtype(self, device: Optional[torch.device] = None) -> Optional[torch.dtype]:
        """The dtype :meth:`autocast` uses on ``device`` (None: float32, no autocast).
        Subclasses may narrow it (int8 Linear layers run without autocast)."""
        return self.precision_choice(device).dtype

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
