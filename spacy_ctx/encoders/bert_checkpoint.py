"""Compatibility names for code written before the encoder families.

The strict loader now lives in :mod:`.checkpoint` and loads every registered
family; :func:`load_bert_encoder` keeps its old ``(config, encoder)`` return.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple, Union

from .checkpoint import (  # noqa: F401  (re-exported)
    WEIGHT_FILES,
    CheckpointWeights,
    find_weights_file,
    load_encoder,
    map_checkpoint_keys,
)
from .family import TransformerEncoder


def load_bert_encoder(model_dir: Union[str, Path]) -> Tuple[Any, TransformerEncoder]:
    """``(config, encoder)`` of any supported checkpoint directory (see
    :func:`.checkpoint.load_encoder`, which also returns the family)."""
    loaded = load_encoder(model_dir)
    return loaded.config, loaded.encoder
