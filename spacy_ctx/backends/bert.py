"""Transformer backend: the checkpoint's tokenizer on doc.text, windows in piece space,
batched encoding. Pieces align to spaCy tokens by the rule of
:mod:`spacy_ctx.pieces.alignment`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..encoders.checkpoint import load_encoder, save_encoder
from ..encoders.family import TransformerEncoder, family_for
from ..errors import CheckpointError, ConfigError
from .batching import (
    OOM_ERRORS,
    batch_overhead,
    batch_stats,
    free_device_memory,
    halved_budget,
    host_to_device,
    pack_by_length,
)
from .windows import OVERLAP_MODES, WindowPlan, plan_windows
from ..pieces.alignment import identity_or_none
from ..pieces.tokenizer import PieceTokenizer
from .base import CtxOutput, Backend, register_backend
from .precision import DerivedModule, check_quantize, quantize_linear_int8

@register_backend
class TransformerBackend(Backend):
    """A transformer encoder of any family (BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT,
    ELECTRA, DeBERTa-v2/v3, ModernBERT, GPT-2; see :mod:`spacy_ctx.encoders.family`)
    with its checkpoint's tokenizer and windowing settings.

    window: pieces per window without the specials (default: the positions the
    family can use, e.g. 512 of RoBERTa's 514, minus the specials). stride: pieces between window starts (default:
    3/4 of the window). overlap: ``"best"`` (most context on both sides; for a
    causal model the most left context) or ``"mean"``. mixed_precision: None,
    ``"auto"``, ``"bf16"``, ``"fp16"`` (see :mod:`.precision`). quantize: None or
    ``"int8"``: the Linear layers run dynamically quantized to int8 (CPU inference
    with a frozen encoder only; the float32 weights are kept and saved).
    """

    # The backend kind written to backend.json ("bert" for every transformer family,
    # so pipelines saved before the other families existed still load).
    family = "bert"

    def __init__(
        self,
        encoder: TransformerEncoder,
        pieces: PieceTokenizer,
        *,
        name: str,
        window: Optional[int] = None,
        stride: Optional[int] = None,
        overlap: str = "best",
        mixed_precision: Optional[str] = None,
        quantize: Optional[str] = None,
    ) -> None:
        super().__init__(name, mixed_precision)
        self.encoder = encoder
        # The int8 copy of the encoder, made at the first int8 forward (not a
        # submodule: not saved, not trained, not moved; see DerivedModule).
        self._int8 = DerivedModule()
        self.quantize = quantize
        self.pieces = pieces
        # The encoder family (model_type in config.json): positions, causality.
        self.spec = family_for(encoder.config.model_type)
        n_specials = pieces.n_specials
        positions = self.spec.usable_positions(encoder.config)
        max_window = positions - n_specials
        window = max_window if window is None else int(window)
        if not 1 <= window <= max_window:
            raise ConfigError(
                f"window={window} pieces does not fit the model '{name}': it must be between "
                f"1 and {max_window} ({positions} usable positions of this "
                f"{self.spec.name} model - {n_specials} specials)."
            )
        stride = max(1, (window * 3) // 4) if stride is None else int(stride)
        if not 1 <= stride <= window:
            raise ConfigError(f"stride={stride} must be between 1 and window={window}.")
        if overlap not in OVERLAP_MODES:
            raise ConfigError(f"overlap must be one of {OVERLAP_MODES}, got {overlap!r}.")
        # The largest id, not the vocabulary size, must fit the embedding table:
        # ids need not be contiguous, and one id past the table would raise an
        # IndexError for every batch that contains its word.
        if pieces.max_id >= encoder.config.vocab_size:
            where = pieces.source or f"the tokenizer of '{name}'"
            raise CheckpointError(
                f"{where}: the tokenizer produces piece ids up to {pieces.max_id} but the "
                f"model's embedding table has {encoder.config.vocab_size} rows "
                f"(vocab_size in config.json); they belong to different models."
            )
        self.window, self.stride, self.overlap = window, stride, overlap
        self.causal = self.spec.causal
        # The batch budget after a device out-of-memory (None: never lowered); it
        # caps max_batch_tokens in later calls. Not a setting: it is not saved.
        self.lowered_budget: Optional[int] = None

    @property
    def layer_names(self) -> List[str]:
        return self.encoder.layer_names

    @property
    def width(self) -> int:
        return self.encoder.width

    def settings(self) -> Dict:
        settings = {
            **super().settings(),
            "window": self.window,
            "stride": self.stride,
            "overlap": self.overlap,
        }
        if self.quantize is not None:  # absent by default: older folders look the same
            settings["quantize"] = self.quantize
        return settings

    # -- precision ----------------------------------------------------------------------
    @property
    def quantize(self) -> Optional[str]:
        """None, or ``"int8"``: the Linear layers run dynamically quantized.

        Assignable (validated), e.g. to evaluate a loaded pipeline with int8; saved
        with the backend's settings, while the saved weights stay float32.
        """
        return self.__dict__["_quantize"]

    @quantize.setter
    def quantize(self, value: Optional[str]) -> None:
        self.__dict__["_quantize"] = check_quantize(value)
        self._int8.clear()

    def autocast_dtype(self, device: Optional[torch.device] = None) -> Optional[torch.dtype]:
        # Quantized Linear layers take float32 input, so int8 runs without autocast:
        # "auto" then means float32; an explicit bf16/fp16 is refused by _check_int8.
        if self.quantize is not None:
            return None
        return super().autocast_dtype(device)

    @property
    def precision(self) -> str:
        """``"int8"`` when quantized, else what :attr:`mixed_precision` resolves to."""
        return "int8" if self.quantize is not None else super().precision

    def precision_info(self) -> Dict[str, object]:
        info = {**super().precision_info(), "quantize": self.quantize}
        if self.quantize is not None:
            info["precision"] = self.quantize
            info["reason"] = (
                f"quantize = {self.quantize!r}: Linear layers in int8, the rest in float32"
            )
        return info

    def weights_changed(self) -> None:
        super().weights_changed()
        self._int8.clear()  # quantized from the old weights

    def _check_int8(self) -> None:
        """Refuse what int8 cannot do, naming the setting to change."""
        if self.device.type != "cpu":
            raise ConfigError(
                f"{self.name}: quantize = \"int8\" runs on CPU only, but the encoder is on "
                f"{self.device} (its device setting, or spaCy's GPU). Remove quantize "
                "(use mixed_precision = \"auto\" or \"bf16\" on the GPU) or run on CPU."
            )
        if self.mixed_precision in ("bf16", "fp16"):
            raise ConfigError(
                f"{self.name}: quantize = \"int8\" cannot be combined with mixed_precision = "
                f"\"{self.mixed_precision}\" (the int8 Linear layers take float32 inputs). "
                "Set mixed_precision to null or \"auto\" (float32 around the int8 layers)."
            )
        if self.training and torch.is_grad_enabled():
            raise ConfigError(
                f"{self.name}: quantize = \"int8\" is for inference with a frozen encoder, "
                "but it is being fine-tuned (int8 layers have no gradients). Set frozen = "
                "true on the encoder component (or grad_factor = 0 on its listeners), or "
                "remove quantize."
            )

    def _forward_encoder(self) -> TransformerEncoder:
        """The module that encodes a batch: the encoder, or its int8 copy."""
        if self.quantize is None:
            return self.encoder
        self._check_int8()
        if self._int8.module is None:
            self._int8.module = quantize_linear_int8(self.encoder)
        return self._int8.module  # type: ignore[return-value]

    # -- planning -------------------------------------------------------------------
    def _plan(
        self, docs: Sequence
    ) -> Tuple[List[Tuple[np.ndarray, np.ndarray, np.ndarray]], List[WindowPlan]]:
        """Pieces of every Doc (ids, piece_counts, piece_index) and its window plan."""
        encoded = self.pieces.encode_docs(docs)
        plans = [
            plan_windows(len(ids), self.window, self.stride, self.overlap, causal=self.causal)
            for ids, _, _ in encoded
        ]
        return encoded, plans

    def window_stats(self, docs: Sequence, *, max_batch_tokens: Optional[int] = None) -> Dict[str, int]:
        """What :meth:`encode_docs` would feed the encoder for ``docs``, without running it.

        Tokenizes and plans windows exactly as encoding does. Returns:

        - ``n_docs``: number of Docs;
        - ``n_pieces``: pieces of all Docs' texts (no specials);
        - ``n_windows``: encoder sequences (one per window; 0 for a Doc with no pieces);
        - ``n_window_pieces``: pieces summed over windows (more than ``n_pieces``
          where windows overlap);
        - ``n_positions``: ``n_window_pieces`` plus the specials of each window
          (``[CLS]``/``[SEP]``, ``<s>``/``</s>``, none for GPT-2), i.e. the
          positions the encoder computes without padding.

        With ``max_batch_tokens`` (the setting of the same name), also ``n_batches``
        and ``n_padded_positions`` (rows x longest sequence, summed over batches).
        """
        encoded, plans = self._plan(docs)
        n_specials = self.pieces.n_specials
        lengths = [end - start for plan in plans for start, end in plan.spans]
        stats = {
            "n_docs": len(docs),
            "n_pieces": sum(len(ids) for ids, _, _ in encoded),
            "n_windows": len(lengths),
            "n_window_pieces": sum(lengths),
            "n_positions": sum(lengths) + n_specials * len(lengths),
        }
        if max_batch_tokens is not None:
            stats.update(batch_stats([n + n_specials for n in lengths], max_batch_tokens,
                                     overhead=batch_overhead(self.device)))
        return stats

    def batch_shapes(self, docs: Sequence, *, max_batch_tokens: int) -> List[Tuple[int, int]]:
        """``(rows, positions)`` of every padded batch :meth:`encode_docs` would run for
        ``docs`` (specials included), in order, without running the model: what the
        FLOP count of a forward pass needs (attention grows with rows x positions²)."""
        _, plans = self._plan(docs)
        n_specials = self.pieces.n_specials
        lengths = [end - start + n_specials for plan in plans for start, end in plan.spans]
        batches = pack_by_length(
            lengths, self.batch_budget(max_batch_tokens), overhead=batch_overhead(self.device)
        )
        return [(len(batch), max(lengths[i] for i in batch)) for batch in batches]

    # -- encoding -----------------------------------------------------------------
    def batch_budget(self, max_batch_tokens: int) -> int:
        """The padded positions per batch actually used: ``max_batch_tokens``, or less
        after the device ran out of memory (see :meth:`encode_docs`)."""
        if self.lowered_budget is None:
            return max_batch_tokens
        return min(max_batch_tokens, self.lowered_budget)

    def _keep_indices(self, keep_layers: Optional[Sequence[int]]) -> List[int]:
        """``keep_layers`` as non-negative layer indices (``-1`` is the last layer)."""
        n = self.encoder.n_layers
        if keep_layers is None:
            return list(range(n))
        keep = []
        for k in keep_layers:
            if not -n <= int(k) < n:
                raise ConfigError(
                    f"layer index {k} is out of range for '{self.name}', which has {n} "
                    f"layers ({', '.join(self.layer_names)})."
                )
            keep.append(int(k) % n)
        return keep

    def encode_docs(
        self,
        docs: Sequence,
        *,
        max_batch_tokens: int,
        keep_layers: Optional[Sequence[int]] = None,
    ) -> List[CtxOutput]:
        """Encode Docs: pieces of each text, windows in piece space, length-sorted
        batches under ``max_batch_tokens`` padded positions, windows stitched back
        per Doc. Every piece is encoded, also those aligned to no token.

        Only the layers up to the highest one in ``keep_layers`` are computed.

        Out of device memory: if a batch raises ``torch.OutOfMemoryError`` (CUDA's
        out-of-memory), the allocator's cache is emptied, the batch budget halved
        (never below the failing batch's longest window) and the failed and
        remaining windows re-packed and encoded; the lower budget is kept for
        later calls (:attr:`lowered_budget`) and one warning per call names it. No
        window is lost or counted twice: a window is added to its Doc only after its
        batch succeeded. A single window that does not fit re-raises.
        """
        keep = self._keep_indices(keep_layers)
        n_layers = max(keep) + 1 if keep else 1
        encoded, plans = self._plan(docs)
        # Each Doc's output is allocated once, and every window is added into it as
        # soon as its batch is done, so no padded batch outlives its loop iteration
        # and stitching makes no extra full-size copies (peak ~ model + output +
        # one batch). In training the in-place adds into a fresh zeros tensor are
        # recorded by autograd like any other op.
        device = self.device
        outputs = [
            torch.zeros((len(keep), len(ids), self.width), device=device) for ids, _, _ in encoded
        ]
        # Every window of every doc: (doc index, start, end, weights of its pieces).
        windows: List[Tuple[int, int, int, np.ndarray]] = [
            (d, start, end, weights)
            for d, plan in enumerate(plans)
            for start, end, weights in plan.windows()
        ]
        n_prefix = len(self.pieces.prefix_ids)
        lengths = [end - start + self.pieces.n_specials for _, start, end, _ in windows]
        budget = initial = self.batch_budget(max_batch_tokens)
        # Split where padding would cost more than another forward pass (CPU: short
        # documents of mixed lengths are not padded to the longest of the batch).
        overhead = batch_overhead(self.device)
        todo = list(range(len(windows)))  # windows not encoded yet
        while todo:
            batches = [
                [todo[j] for j in batch]
                for batch in pack_by_length([lengths[i] for i in todo], budget, overhead=overhead)
            ]
            todo = []
            for n, batch in enumerate(batches):
                pieces = [encoded[d][0][start:end] for d, start, end, _ in (windows[i] for i in batch)]
                try:
                    hidden = self._encode_batch(pieces, n_layers)
                except OOM_ERRORS as err:
                    longest = max(lengths[i] for i in batch)
                    if len(batch) == 1:
                        raise type(err)(
                            f"{self.name}: out of device memory on a single window of "
                            f"{longest} positions (batch budget {budget}). Use a smaller "
                            "'window' setting, mixed_precision = \"bf16\", or a device "
                            f"with more free memory. The device said: {err}"
                        ) from err
                    # Retry this batch and the rest in smaller batches (after the
                    # except block, so the traceback's tensors can be freed).
                    budget = self.lowered_budget = halved_budget(budget, longest)
                    todo = [i for rest in batches[n:] for i in rest]
                    break
                for row, index in enumerate(batch):
                    d, start, end, weights = windows[index]
                    # Drop the specials: the window's pieces follow the prefix.
                    rows = [hidden[k][row, n_prefix : n_prefix + end - start] for k in keep]
                    self._add_window(outputs[d], rows, start, weights)
                del hidden  # free the batch before the next one is encoded
            if todo:
                free_device_memory()
        if budget < initial:
            warnings.warn(
                f"{self.name}: the device ran out of memory; batches were split and the "
                f"batch budget lowered from {initial} to {budget} padded positions for "
                f"this encoder from now on. Set max_batch_tokens = {budget} (or lower) to "
                "avoid the retries.",
                RuntimeWarning,
                stacklevel=2,
            )
        return [
            CtxOutput(out, counts, identity_or_none(index, len(ids)))
            for out, (ids, counts, index) in zip(outputs, encoded)
        ]

    def _encode_batch(self, windows: List[np.ndarray], n_layers: Optional[int] = None) -> List[torch.Tensor]:
        """Run the encoder on piece sequences framed by the tokenizer's specials
        (prefix ids, pieces, suffix ids) and right-padded to one batch; returns the
        first ``n_layers`` layers (None: all), (batch, longest, width) each."""
        prefix, suffix = self.pieces.prefix_ids, self.pieces.suffix_ids
        n_prefix, n_specials = len(prefix), len(prefix) + len(suffix)
        longest = max(len(ids) for ids in windows) + n_specials
        # Padding is masked, so the pad id only has to be a valid row (GPT-2 has none: 0).
        input_ids = np.full((len(windows), longest), self.pieces.pad_id, dtype=np.int64)
        mask = np.zeros((len(windows), longest), dtype=bool)
        for row, ids in enumerate(windows):
            end = n_prefix + len(ids)
            input_ids[row, :n_prefix] = prefix
            input_ids[row, n_prefix:end] = ids
            input_ids[row, end : end + len(suffix)] = suffix
            mask[row, : len(ids) + n_specials] = True
        device = self.device
        encoder = self._forward_encoder()
        # Pinned host memory and non-blocking copies on CUDA (see host_to_device).
        ids_t = host_to_device(input_ids, device)
        mask_t = host_to_device(mask, device)
        with self.autocast():
            return encoder(ids_t, mask_t, n_layers=n_layers)

    @staticmethod
    def _add_window(
        output: torch.Tensor, layers: List[torch.Tensor], start: int, weights: np.ndarray
    ) -> None:
        """Add one window's rows (one (n, width) tensor per kept layer), weighted, into
        ``output`` (n_keep, n_pieces, width) from piece ``start`` on."""
        used = np.flatnonzero(weights)
        if not len(used):
            return
        # Only the span of rows with a weight is copied: with "best" overlap a window
        # gives weight 0 to the rows another window sees with more context.
        first, last = int(used[0]), int(used[-1]) + 1
        rows = torch.stack([layer[first:last] for layer in layers]).to(output.dtype)
        span = weights[first:last]
        if not np.all(span == 1):
            rows = rows * torch.from_numpy(span).to(output.device, output.dtype)[None, :, None]
        # In place into a slice: no index tensor to copy to the device per window, and
        # autograd records it (the output becomes part of the graph).
        output.narrow(1, start + first, last - first).add_(rows)

    # -- files ----------------------------------------------------------------------
    def save_files(self, path: Path) -> None:
        """The checkpoint in Hugging Face layout (its original config.json, weights
        under the family's HF names), so the folder also loads in ``transformers``."""
        save_encoder(self.encoder, self.spec, self.encoder.config, path)
        self.pieces.to_dir(path)

    @classmethod
    def from_files(cls, path: Path, settings: Dict) -> "TransformerBackend":
        return cls(load_encoder(path).encoder, PieceTokenizer.from_dir(path), **settings)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Path,
        *,
        name: str,
        window: Optional[int] = None,
        stride: Optional[int] = None,
        overlap: str = "best",
        mixed_precision: Optional[str] = None,
        quantize: Optional[str] = None,
    ) -> "TransformerBackend":
        """Load from a Hugging Face-format checkpoint directory of any supported family."""
        encoder = load_encoder(model_dir).encoder
        pieces = PieceTokenizer.from_pretrained_dir(model_dir)
        return cls(
            encoder,
            pieces,
            name=name,
            window=window,
            stride=stride,
            overlap=overlap,
            mixed_precision=mixed_precision,
            quantize=quantize,
        )


