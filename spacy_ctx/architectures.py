"""Registered, versioned model builders (declared as entry points in setup.cfg)."""

from __future__ import annotations

from typing import List, Optional

from spacy.tokens import Doc
from thinc.api import Model

from .backends import CtxOutput
from .layers.encoder import build_ctx_encoder


def build_bert_encoder(
    *,
    name: str,
    window: Optional[int] = None,
    stride: Optional[int] = None,
    overlap: str = "best",
    device: Optional[str] = None,
    mixed_precision: Optional[str] = None,
) -> Model[List[Doc], List[CtxOutput]]:
    """``spacy_ctx.BertEncoder.v1``: a BERT-family encoder, loaded on initialize/first use.

    name: local Hugging Face-format directory, or a hub id (needs the ``hub`` extra
        and a network connection or a filled hub cache).
    window: word pieces per window, without [CLS]/[SEP]; None = the model maximum.
    stride: pieces between window starts; None = 3/4 of the window.
    overlap: ``"best"`` (each piece from the window where it has most context) or
        ``"mean"`` (average over windows).
    device: torch device (``"cuda:0"``); None = follow spaCy's ops (GPU if active).
    mixed_precision: None, ``"bf16"`` or ``"fp16"`` autocast at inference.
    """

    def load():
        from .backends.bert import BertBackend
        from .loaders import resolve_bert_dir

        return BertBackend.from_pretrained(
            resolve_bert_dir(name),
            name=name,
            window=window,
            stride=stride,
            overlap=overlap,
            mixed_precision=mixed_precision,
        )

    return build_ctx_encoder(load, device=device)
