"""Helpers shared by tests that need ELMo files: random checkpoints (the one writer of
random ELMo hdf5 files, also used by ``benchmarks/elmo_weights.py``) and the fixture."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_NAME = "elmo-allennlp-fixture"
#: Set this environment variable to the fixture folder to use another copy.
REFDATA_ENV_VAR = "SPACY_CTX_REFDATA"


def refdata_dir() -> Optional[Path]:
    """The AllenNLP ELMo fixture folder, or None when it is not available.

    Uses ``$SPACY_CTX_REFDATA`` when set (either the fixture folder itself or a
    folder containing ``elmo-allennlp-fixture``; point it at an empty folder to
    skip the parity tests), else ``<repo root>/../shared/refdata/elmo-allennlp-fixture``.
    """
    override = os.environ.get(REFDATA_ENV_VAR)
    if override:  # an explicit setting replaces the default location
        candidates = [Path(override), Path(override) / FIXTURE_NAME]
    else:
        candidates = [REPO_ROOT.parent / "shared" / "refdata" / FIXTURE_NAME]
    for candidate in candidates:
        if (candidate / "options.json").is_file() and (candidate / "lm_weights.hdf5").is_file():
            return candidate
    return None


def elmo_options(
    *,
    char_dim: int = 4,
    filters: Sequence[Tuple[int, int]] = ((1, 4), (2, 8), (3, 16)),
    n_highway: int = 1,
    proj: int = 8,
    dim: int = 16,
    n_layers: int = 2,
    cell_clip: Optional[float] = 3.0,
    proj_clip: Optional[float] = 3.0,
    activation: str = "relu",
) -> Dict[str, Any]:
    """An ``options.json`` dict; the defaults describe a tiny model (width 16)."""
    return {
        "lstm": {
            "dim": dim,
            "projection_dim": proj,
            "n_layers": n_layers,
            "cell_clip": cell_clip,
            "proj_clip": proj_clip,
            "use_skip_connections": True,
        },
        "char_cnn": {
            "embedding": {"dim": char_dim},
            "filters": [list(f) for f in filters],
            "n_highway": n_highway,
            "activation": activation,
            "n_characters": 262,
            "max_characters_per_token": 50,
        },
    }


def hdf5_shapes(options: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Every dataset of the bilm-tf/AllenNLP ``weights.hdf5`` layout for ``options``.

    Written out here, independently of ``spacy_ctx``, so that the files the tests
    load are not made by the code under test. With TensorFlow's ``x @ W`` matrices::

        char_embed                                      (261, char_dim)
        CNN/W_cnn_{i}                                   (1, width_i, char_dim, n_i)
        CNN/b_cnn_{i}                                   (n_i,)
        CNN_high_{k}/W_transform, W_carry               (n_filters, n_filters)
        CNN_high_{k}/b_transform, b_carry               (n_filters,)
        CNN_proj/W_proj                                 (n_filters, proj)  [absent if n_filters == proj]
        CNN_proj/b_proj                                 (proj,)
        RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell/W_0   (proj + proj, 4 * dim)
        RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell/B     (4 * dim,)
        RNN_{d}/RNN/MultiRNNCell/Cell{l}/LSTMCell/W_P_0 (dim, proj)

    with d = 0 (forward) and 1 (backward).
    """
    lstm, cnn = options["lstm"], options["char_cnn"]
    char_dim = int(cnn["embedding"]["dim"])
    filters = [(int(w), int(n)) for w, n in cnn["filters"]]
    n_filters = sum(n for _, n in filters)
    proj, dim = int(lstm["projection_dim"]), int(lstm["dim"])
    shapes: Dict[str, Tuple[int, ...]] = {"char_embed": (261, char_dim)}
    for i, (width, n) in enumerate(filters):
        shapes[f"CNN/W_cnn_{i}"] = (1, width, char_dim, n)
        shapes[f"CNN/b_cnn_{i}"] = (n,)
    for k in range(int(cnn["n_highway"])):
        for part in ("transform", "carry"):
            shapes[f"CNN_high_{k}/W_{part}"] = (n_filters, n_filters)
            shapes[f"CNN_high_{k}/b_{part}"] = (n_filters,)
    if n_filters != proj:
        shapes["CNN_proj/W_proj"] = (n_filters, proj)
        shapes["CNN_proj/b_proj"] = (proj,)
    for direction in (0, 1):
        for layer in range(int(lstm["n_layers"])):
            prefix = f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
            shapes[f"{prefix}/W_0"] = (2 * proj, 4 * dim)
            shapes[f"{prefix}/B"] = (4 * dim,)
            shapes[f"{prefix}/W_P_0"] = (dim, proj)
    return shapes


def _fan_in_std(name: str, shape: Tuple[int, ...], scale: float) -> float:
    """Benchmarks: activations like a trained model's (O(0.1-1), gates not saturated).

    ``char_embed`` N(0, 1) (an embedding table); weight matrices N(0, min(scale,
    1 / sqrt(fan_in))); biases N(0, scale).
    """
    if name == "char_embed":
        return 1.0
    if len(shape) == 1:
        return scale
    fan_in = shape[1] * shape[2] if name.startswith("CNN/W_cnn_") else shape[0]
    return min(scale, 1.0 / math.sqrt(fan_in))


def write_random_elmo(
    directory: Union[str, Path],
    options: Optional[Mapping[str, Any]] = None,
    *,
    seed: int = 0,
    weight_scale: float = 0.5,
    fan_in_scaling: bool = False,
    **settings: Any,
) -> Tuple[Path, Path]:
    """Write a random ELMo (``options.json``, ``weights.hdf5``) into ``directory``.

    The one writer of random ELMo checkpoints (``benchmarks/elmo_weights.py`` uses
    it too). ``options`` is an ``options.json`` dict; without it, ``settings`` are
    passed to :func:`elmo_options` (e.g. ``proj=6, n_layers=3``). Values are
    ``weight_scale`` times standard normal, the highway and projection matrices
    divided by sqrt(fan-in) (raise ``weight_scale`` to make the clips trigger); or,
    with ``fan_in_scaling``, scaled like a trained model's (the benchmarks'
    choice, see ``_fan_in_std``). The same arguments give the same files.
    Returns ``(options_path, weights_path)``.
    """
    import h5py

    if options is not None and settings:
        raise TypeError("pass either options or elmo_options() settings, not both")
    options = dict(options) if options is not None else elmo_options(**settings)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    options_path = directory / "options.json"
    options_path.write_text(json.dumps(options, indent=2) + "\n", encoding="utf-8")
    weights_path = directory / "weights.hdf5"
    with h5py.File(weights_path, "w") as handle:
        for name, shape in hdf5_shapes(options).items():
            if fan_in_scaling:
                std = _fan_in_std(name, shape, weight_scale)
                value = (rng.standard_normal(shape) * std).astype(np.float32)
            else:
                value = (rng.standard_normal(shape) * weight_scale).astype(np.float32)
                if name.startswith(("CNN_high_", "CNN_proj/")) and len(shape) == 2:
                    value = value / float(np.sqrt(shape[0]))  # the wide matrices: / sqrt(fan-in)
            handle.create_dataset(name, data=value)
    return options_path, weights_path
