"""BERT backend: WordPiece per spaCy token, windows in piece space, batched encoding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..encoders.bert import BertEncoder
from ..encoders.bert_checkpoint import load_bert_encoder
from ..errors import CheckpointError, ConfigError
from .batching import pack_by_length
from .windows import OVERLAP_MODES, WindowPlan, plan_windows
from ..pieces.wordpiece import WordPieceTokenizer
from .base import CtxOutput, Backend, register_backend

N_SPECIALS = 2  # [CLS] ... [SEP] around every window


@register_backend
class BertBackend(Backend):
    """A :class:`BertEncoder` with its WordPiece tokenizer and windowing settings.

    window: pieces per window without the specials (default: the model's maximum
    positions minus 2). stride: pieces between window starts (default: 3/4 of the
    window). overlap: ``"best"`` (most context on both sides) or ``"mean"``.
    """

    family = "bert"

    def __init__(
        self,
        encoder: BertEncoder,
        pieces: WordPieceTokenizer,
        *,
        name: str,
        window: Optional[int] = None,
        stride: Optional[int] = None,
        overlap: str = "best",
        mixed_precision: Optional[str] = None,
    ) -> None:
        super().__init__(name, mixed_precision)
        self.encoder = encoder
        self.pieces = pieces
        max_window = encoder.config.max_position_embeddings - N_SPECIALS
        window = max_window if window is None else int(window)
        if not 1 <= window <= max_window:
            raise ConfigError(
                f"window={window} pieces does not fit the model '{name}': it must be between "
                f"1 and {max_window} (max_position_embeddings - 2 specials)."
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

    @property
    def layer_names(self) -> List[str]:
        return self.encoder.layer_names

    @property
    def width(self) -> int:
        return self.encoder.config.hidden_size

    def settings(self) -> Dict:
        return {
            **super().settings(),
            "window": self.window,
            "stride": self.stride,
            "overlap": self.overlap,
        }

    # -- encoding -----------------------------------------------------------------
    def encode_docs(
        self,
        docs: Sequence,
        *,
        max_batch_tokens: int,
        keep_layers: Optional[Sequence[int]] = None,
    ) -> List[CtxOutput]:
        keep = list(range(self.encoder.n_layers)) if keep_layers is None else list(keep_layers)
        encoded = self.pieces.encode([[token.text for token in doc] for doc in docs])
        plans = [plan_windows(len(ids), self.window, self.stride, self.overlap) for ids, _ in encoded]
        # Every window of every doc, as (doc index, window index, piece ids).
        windows: List[Tuple[int, int, np.ndarray]] = [
            (d, w, encoded[d][0][start:end])
            for d, plan in enumerate(plans)
            for w, (start, end) in enumerate(plan.spans)
        ]
        results = self._encode_windows([ids for _, _, ids in windows], keep, max_batch_tokens)
        per_doc: List[List[torch.Tensor]] = [[] for _ in docs]
        for (d, _, _), result in zip(windows, results):
            per_doc[d].append(result)
        outputs = []
        for (_, piece_counts), plan, doc_windows in zip(encoded, plans, per_doc):
            outputs.append(CtxOutput(self._stitch(plan, doc_windows, len(keep)), piece_counts))
        return outputs

    def _encode_windows(
        self, windows: List[np.ndarray], keep: List[int], max_batch_tokens: int
    ) -> List[torch.Tensor]:
        """Run the encoder on piece sequences; returns (n_keep, n_pieces, width) each."""
        results: List[Optional[torch.Tensor]] = [None] * len(windows)
        lengths = [len(ids) + N_SPECIALS for ids in windows]
        device = self.device
        for batch in pack_by_length(lengths, max_batch_tokens):
            longest = max(lengths[i] for i in batch)
            input_ids = np.full((len(batch), longest), self.pieces.pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), longest), dtype=bool)
            for row, index in enumerate(batch):
                ids = windows[index]
                input_ids[row, 0] = self.pieces.cls_id
                input_ids[row, 1 : len(ids) + 1] = ids
                input_ids[row, len(ids) + 1] = self.pieces.sep_id
                mask[row, : len(ids) + N_SPECIALS] = True
            ids_t = torch.from_numpy(input_ids).to(device, non_blocking=True)
            mask_t = torch.from_numpy(mask).to(device, non_blocking=True)
            with self.autocast():
                hidden = self.encoder(ids_t, mask_t)
            stacked = torch.stack([hidden[k] for k in keep]).float()
            for row, index in enumerate(batch):
                results[index] = stacked[:, row, 1 : len(windows[index]) + 1]
        return results  # type: ignore[return-value]

    def _stitch(self, plan: WindowPlan, windows: List[torch.Tensor], n_keep: int) -> torch.Tensor:
        if not windows:
            return torch.zeros((n_keep, 0, self.width), device=self.device)
        if plan.is_single:
            return windows[0]
        flat = torch.cat(windows, dim=1)
        device = flat.device
        weights = torch.from_numpy(plan.weights).to(device, flat.dtype)
        destination = torch.from_numpy(plan.destination()).to(device)
        stitched = flat.new_zeros((flat.shape[0], plan.n_pieces, flat.shape[2]))
        return stitched.index_add(1, destination, flat * weights[None, :, None])

    # -- files ----------------------------------------------------------------------
    def save_files(self, path: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.encoder.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        (path / "config.json").write_text(
            json.dumps(self.encoder.config.to_dict(), indent=2), encoding="utf8"
        )
        self.pieces.to_dir(path)

    @classmethod
    def from_files(cls, path: Path, settings: Dict) -> "BertBackend":
        _, encoder = load_bert_encoder(path)
        return cls(encoder, WordPieceTokenizer.from_dir(path), **settings)

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
    ) -> "BertBackend":
        """Load from a Hugging Face-format checkpoint directory."""
        _, encoder = load_bert_encoder(model_dir)
        pieces = WordPieceTokenizer.from_pretrained_dir(model_dir)
        return cls(
            encoder,
            pieces,
            name=name,
            window=window,
            stride=stride,
            overlap=overlap,
            mixed_precision=mixed_precision,
        )
