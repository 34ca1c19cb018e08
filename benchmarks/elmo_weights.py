"""Random ELMo checkpoints (``options.json`` + ``weights.hdf5``) for the benchmarks.

The files are written by ``tests/elmo_utils.py`` (``write_random_elmo``, the one
writer of random ELMo checkpoints; its ``hdf5_shapes`` documents the bilm-tf /
AllenNLP layout). This module adds the benchmark presets, the stamped reusable
output folder and a command line; it imports numpy, h5py and ``tests/elmo_utils``
(nothing from ``spacy_ctx``).

Scale of the random values, so that activations look like a trained model's
(O(0.1-1), LSTM gates not saturated, clips rarely hit) rather than exploding:

* ``char_embed``: standard normal (an embedding table);
* every weight matrix: normal with std ``min(scale, 1 / sqrt(fan_in))``
  (``scale`` = 0.05 by default; the 2048-wide highway and projection matrices
  get 1/sqrt(2048) ~ 0.022);
* biases: normal with std ``scale``.

Presets: ``small`` is the published "small" ELMo
(``elmo_2x1024_128_2048cnn_1xhighway``: 2 layers, LSTM dim 1024, projection
128, filters summing to 2048, 1 highway; 13.6 M parameters); ``tiny`` has the
shapes of AllenNLP's test fixture (projection 16, LSTM dim 64).

A folder is generated once and reused: ``ensure_random_elmo`` writes a
``generator.json`` stamp (options, seed, scale, generator version) last and
regenerates only when the stamp is missing or different.

Usage::

    python benchmarks/elmo_weights.py --preset small --out benchmarks/results/elmo_small
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

# The repository root, so that tests/elmo_utils.py imports when this runs as a script.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from tests.elmo_utils import hdf5_shapes, write_random_elmo  # noqa: E402

GENERATOR_VERSION = 1
OPTIONS_FILE = "options.json"
WEIGHTS_FILE = "weights.hdf5"
STAMP_FILE = "generator.json"
DEFAULT_SCALE = 0.05

#: The published small ELMo (elmo_2x1024_128_2048cnn_1xhighway_options.json).
SMALL_OPTIONS: Dict[str, Any] = {
    "lstm": {
        "use_skip_connections": True,
        "projection_dim": 128,
        "cell_clip": 3,
        "proj_clip": 3,
        "dim": 1024,
        "n_layers": 2,
    },
    "char_cnn": {
        "activation": "relu",
        "filters": [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256], [6, 512], [7, 1024]],
        "n_highway": 1,
        "embedding": {"dim": 16},
        "n_characters": 262,
        "max_characters_per_token": 50,
    },
}

#: The shapes of AllenNLP's ELMo test fixture (used when the fixture is absent).
TINY_OPTIONS: Dict[str, Any] = {
    "lstm": {
        "use_skip_connections": True,
        "projection_dim": 16,
        "cell_clip": 3,
        "proj_clip": 3,
        "dim": 64,
        "n_layers": 2,
    },
    "char_cnn": {
        "activation": "relu",
        "filters": [[1, 4], [2, 8], [3, 16], [4, 32], [5, 64]],
        "n_highway": 2,
        "embedding": {"dim": 4},
        "n_characters": 262,
        "max_characters_per_token": 50,
    },
}

PRESETS: Dict[str, Dict[str, Any]] = {"small": SMALL_OPTIONS, "tiny": TINY_OPTIONS}


def n_parameters(options: Dict[str, Any]) -> int:
    """Number of stored values (the hdf5 datasets; excludes the padding char row)."""
    return sum(math.prod(shape) for shape in hdf5_shapes(options).values())


def _stamp(options: Dict[str, Any], seed: int, scale: float) -> Dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "scale": scale, "options": options}


def ensure_random_elmo(
    directory, options: Dict[str, Any], *, seed: int = 0, scale: float = DEFAULT_SCALE
) -> Tuple[Path, Path, bool]:
    """``(options_path, weights_path, generated)``: reuse ``directory`` if its stamp
    matches, else (re)generate it. Files are written to a temporary folder beside
    it and moved in, stamp last, so an interrupted run is regenerated next time."""
    directory = Path(directory)
    options_path, weights_path = directory / OPTIONS_FILE, directory / WEIGHTS_FILE
    stamp_path = directory / STAMP_FILE
    wanted = _stamp(options, seed, scale)
    try:
        current = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = None
    if current == wanted and options_path.is_file() and weights_path.is_file():
        return options_path, weights_path, False
    directory.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_random_elmo(tmp, options, seed=seed, weight_scale=scale, fan_in_scaling=True)
        for name in (OPTIONS_FILE, WEIGHTS_FILE):
            os.replace(tmp / name, directory / name)
        (tmp / STAMP_FILE).write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp / STAMP_FILE, stamp_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return options_path, weights_path, True


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random ELMo (options.json + weights.hdf5).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                        help="std of biases; cap on the std of weight matrices")
    parser.add_argument("--force", action="store_true", help="regenerate even if the stamp matches")
    args = parser.parse_args(argv)
    if args.force:
        (args.out / STAMP_FILE).unlink(missing_ok=True)
    options = PRESETS[args.preset]
    start = time.perf_counter()
    options_path, weights_path, generated = ensure_random_elmo(
        args.out, options, seed=args.seed, scale=args.scale
    )
    verb = "wrote" if generated else "reused"
    print(f"{verb} {options_path} and {weights_path} ({n_parameters(options):,} values, "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
