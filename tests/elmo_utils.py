"""Helpers shared by tests that need ELMo files: tiny random checkpoints and the fixture."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

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


def write_random_elmo(
    directory: Union[str, Path],
    *,
    seed: int = 0,
    char_dim: int = 4,
    filters: Sequence[Tuple[int, int]] = ((1, 4), (2, 8), (3, 16)),
    n_highway: int = 1,
    proj: int = 8,
    dim: int = 16,
    n_layers: int = 2,
    cell_clip: Optional[float] = 3.0,
    proj_clip: Optional[float] = 3.0,
    activation: str = "relu",
    weight_scale: float = 0.5,
) -> Tuple[Path, Path]:
    """Write a tiny random ELMo (``options.json``, ``weights.hdf5``) into ``directory``.

    The weights use the bilm-tf/AllenNLP hdf5 layout; ``weight_scale`` is the
    standard deviation of the random values (raise it to make the clips trigger).
    Returns ``(options_path, weights_path)``.
    """
    import h5py

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * weight_scale).astype(np.float32)

    options = {
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
    options_path = directory / "options.json"
    options_path.write_text(json.dumps(options, indent=2), encoding="utf-8")

    n_filters = sum(n for _, n in filters)
    weights_path = directory / "weights.hdf5"
    with h5py.File(weights_path, "w") as handle:
        handle["char_embed"] = rand(261, char_dim)
        for i, (width, n) in enumerate(filters):
            handle[f"CNN/W_cnn_{i}"] = rand(1, width, char_dim, n)
            handle[f"CNN/b_cnn_{i}"] = rand(n)
        for k in range(n_highway):
            for part in ("transform", "carry"):
                handle[f"CNN_high_{k}/W_{part}"] = rand(n_filters, n_filters) / float(np.sqrt(n_filters))
                handle[f"CNN_high_{k}/b_{part}"] = rand(n_filters)
        if n_filters != proj:
            handle["CNN_proj/W_proj"] = rand(n_filters, proj) / float(np.sqrt(n_filters))
            handle["CNN_proj/b_proj"] = rand(proj)
        for direction in (0, 1):
            for layer in range(n_layers):
                prefix = f"RNN_{direction}/RNN/MultiRNNCell/Cell{layer}/LSTMCell"
                handle[f"{prefix}/W_0"] = rand(2 * proj, 4 * dim)
                handle[f"{prefix}/B"] = rand(4 * dim)
                handle[f"{prefix}/W_P_0"] = rand(dim, proj)
    return options_path, weights_path
