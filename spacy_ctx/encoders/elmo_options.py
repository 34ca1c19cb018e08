"""The hyper-parameters of an ELMo biLM (AllenNLP/bilm-tf ``options.json``) and their checks.

:class:`ElmoOptions` is built only through :meth:`ElmoOptions.from_file` or
:meth:`ElmoOptions.from_dict`, which check every setting's type **and range**
before anything is allocated: a hostile or mistyped ``options.json`` (``lstm.dim =
2000000``, ``n_highway = 1000000``) fails here, in microseconds, with a
:class:`~spacy_ctx.errors.CheckpointError` naming the file and the setting, not
after gigabytes of weights have been allocated.

The limits are generous: ten times (or more) the largest published ELMo
(``elmo_2x4096_512_2048cnn_2xhighway``: LSTM dim 4096, projection 512, filters
summing to 2048, 2 highway layers, 94 M parameters). This module imports numpy
only (no torch), so options can be checked without building anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..errors import CheckpointError

__all__ = [
    "ElmoOptions",
    "ACTIVATIONS",
    "CHARS_PER_TOKEN",
    "N_CHAR_EMBEDDING_ROWS",
    "LIMITS",
    "MAX_PARAMETERS",
    "elmo_layer_names",
]

#: Char ids per token (word markers included); the width of the char CNN's input.
#: Equal to ``spacy_ctx.pieces.chars.MAX_WORD_LENGTH`` (the backend checks they agree;
#: encoders do not import pieces/).
CHARS_PER_TOKEN = 50

#: Rows of the char embedding: 261 stored in the file plus row 0 for padding tokens.
N_CHAR_EMBEDDING_ROWS = 262

#: Activations of the char CNN that the modules implement.
ACTIVATIONS = ("relu", "tanh")

#: Inclusive (minimum, maximum) of every integer setting.
LIMITS: Dict[str, Tuple[int, int]] = {
    "lstm.dim": (1, 32_768),
    "lstm.projection_dim": (1, 16_384),
    "lstm.n_layers": (1, 64),
    "char_cnn.embedding.dim": (1, 4_096),
    "char_cnn.n_highway": (0, 64),
    "char_cnn.filters.count": (1, 256),
    "char_cnn.filters.n_filters": (1, 65_536),
    "char_cnn.filters.total": (1, 65_536),
}

#: Largest number of parameters the settings may imply (4 GiB of float32);
#: the largest published ELMo has 94 M.
MAX_PARAMETERS = 1 << 30


def elmo_layer_names(n_lstm_layers: int) -> List[str]:
    """Names of the output layers: ``["token", "lstm_1", ..., "lstm_n"]``."""
    return ["token"] + [f"lstm_{k}" for k in range(1, n_lstm_layers + 1)]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ElmoOptions:
    """The hyper-parameters of an ELMo biLM, as stored in AllenNLP's ``options.json``.

    Build it with :meth:`from_file` or :meth:`from_dict`; both validate every
    setting and raise :class:`~spacy_ctx.errors.CheckpointError` naming the file
    and the setting. ``cell_clip`` / ``proj_clip`` of ``None`` mean no clipping.
    """

    char_embedding_dim: int
    filters: Tuple[Tuple[int, int], ...]
    n_highway: int
    activation: str
    lstm_dim: int
    projection_dim: int
    n_layers: int
    cell_clip: Optional[float] = 3.0
    proj_clip: Optional[float] = 3.0
    use_skip_connections: bool = True
    n_characters: int = N_CHAR_EMBEDDING_ROWS
    max_characters_per_token: int = CHARS_PER_TOKEN
    #: Where the options came from, only used in error messages.
    source: str = field(default="options.json", compare=False)

    @property
    def n_filters_total(self) -> int:
        """Width of the char CNN output (sum of the filters' output channels)."""
        return sum(n for _, n in self.filters)

    @property
    def output_dim(self) -> int:
        """Width of every output layer: ``2 * projection_dim``."""
        return 2 * self.projection_dim

    @property
    def n_output_layers(self) -> int:
        """Number of output layers: the token layer plus one per LSTM layer."""
        return self.n_layers + 1

    @property
    def uses_char_projection(self) -> bool:
        """Whether the char CNN has a projection (bilm-tf skips it when widths agree)."""
        return self.n_filters_total != self.projection_dim

    @property
    def n_parameters(self) -> int:
        """Number of parameters of the model these options describe (padding char row included)."""
        char_dim, n_filters = self.char_embedding_dim, self.n_filters_total
        proj, dim = self.projection_dim, self.lstm_dim
        total = N_CHAR_EMBEDDING_ROWS * char_dim
        total += sum(width * char_dim * n + n for width, n in self.filters)
        total += self.n_highway * (2 * n_filters * n_filters + 2 * n_filters)
        if self.uses_char_projection:
            total += n_filters * proj + proj
        # Per direction and layer: input + recurrent kernels, bias, projection.
        total += 2 * self.n_layers * (2 * proj * 4 * dim + 4 * dim + dim * proj)
        return total

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "ElmoOptions":
        """Read and validate an AllenNLP/bilm-tf ``options.json``."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"ELMo options file not found: '{path}'. Pass the path of the 'options.json' "
                "that was published with the ELMo weights file."
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(
                f"Could not read the ELMo options file '{path}' as JSON ({exc}). "
                "Download the 'options.json' of the model again."
            ) from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "options.json") -> "ElmoOptions":
        """Validate a parsed ``options.json`` dict; ``source`` names it in errors.

        Unknown keys (training settings such as ``n_epochs``) are ignored.
        """

        def fail(setting: str, problem: str, fix: str) -> CheckpointError:
            return CheckpointError(f"{source}: setting '{setting}' {problem}. {fix}")

        published = "Use the options file published with the weights."

        if not isinstance(data, Mapping):
            raise CheckpointError(
                f"{source}: expected a JSON object with 'lstm' and 'char_cnn' sections, "
                f"found {type(data).__name__}. Is this really an ELMo options.json?"
            )
        sections: Dict[str, Mapping[str, Any]] = {}
        for name in ("lstm", "char_cnn"):
            section = data.get(name)
            if not isinstance(section, Mapping):
                raise fail(
                    name,
                    "is missing or not an object",
                    "An ELMo options.json has 'lstm' and 'char_cnn' sections; " + published.lower(),
                )
            sections[name] = section
        lstm, cnn = sections["lstm"], sections["char_cnn"]

        def check_int(setting: str, value: Any, limits: Tuple[int, int]) -> int:
            low, high = limits
            if not _is_int(value) or not low <= value <= high:
                raise fail(
                    setting,
                    f"must be an integer from {low} to {high}, found {value!r}",
                    published,
                )
            return int(value)

        def get_int(section: Mapping[str, Any], setting: str, default: Optional[int] = None) -> int:
            return check_int(setting, section.get(setting.rsplit(".", 1)[-1], default), LIMITS[setting])

        def get_clip(key: str) -> Optional[float]:
            value = lstm.get(key)
            if value is None:
                return None
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise fail(
                    f"lstm.{key}",
                    f"must be a non-negative number or null, found {value!r}",
                    "Set it to the clip value used in training (3 for the published models) "
                    "or null for no clipping.",
                )
            # bilm-tf and AllenNLP treat 0 as "no clipping".
            return float(value) if value > 0 else None

        skip = lstm.get("use_skip_connections")
        if skip is not True:
            raise fail(
                "lstm.use_skip_connections",
                f"is {json.dumps(skip) if _is_json_scalar(skip) else type(skip).__name__}",
                "Only biLMs with residual (skip) connections between LSTM layers are "
                "supported, as in all published ELMo models; set it to true only if the "
                "weights were trained that way.",
            )
        if lstm.get("bidirectional", True) is not True:
            raise fail(
                "lstm.bidirectional",
                "is not true",
                "ELMo needs both LSTM directions; use a bidirectional checkpoint.",
            )

        embedding = cnn.get("embedding")
        if not isinstance(embedding, Mapping):
            raise fail(
                "char_cnn.embedding",
                "is missing or not an object",
                "Expected e.g. {\"dim\": 16}; " + published.lower(),
            )
        char_dim = get_int(embedding, "char_cnn.embedding.dim")

        max_chars = cnn.get("max_characters_per_token", CHARS_PER_TOKEN)
        if not _is_int(max_chars) or max_chars != CHARS_PER_TOKEN:
            raise fail(
                "char_cnn.max_characters_per_token",
                f"is {max_chars!r}",
                f"Only {CHARS_PER_TOKEN} characters per token are supported (all published "
                "ELMo models use 50).",
            )
        n_chars = cnn.get("n_characters", N_CHAR_EMBEDDING_ROWS)
        if not _is_int(n_chars) or n_chars not in (N_CHAR_EMBEDDING_ROWS - 1, N_CHAR_EMBEDDING_ROWS):
            raise fail(
                "char_cnn.n_characters",
                f"is {n_chars!r}",
                "ELMo uses 261 characters (262 with the padding row); set it to 262.",
            )

        raw_filters = cnn.get("filters")
        if not isinstance(raw_filters, (list, tuple)) or not raw_filters:
            raise fail(
                "char_cnn.filters",
                f"must be a non-empty list of [width, n_filters] pairs, found {raw_filters!r}",
                published,
            )
        max_count = LIMITS["char_cnn.filters.count"][1]
        if len(raw_filters) > max_count:
            raise fail("char_cnn.filters", f"has {len(raw_filters)} entries, more than {max_count}",
                       published)
        filters: List[Tuple[int, int]] = []
        n_filters_limit = LIMITS["char_cnn.filters.n_filters"][1]
        for item in raw_filters:
            if (
                not isinstance(item, (list, tuple))
                or len(item) != 2
                or not all(_is_int(v) and v >= 1 for v in item)
                or item[0] > CHARS_PER_TOKEN
                or item[1] > n_filters_limit
            ):
                raise fail(
                    "char_cnn.filters",
                    f"contains {item!r}, which is not a [width, n_filters] pair of positive "
                    f"integers with width <= {CHARS_PER_TOKEN} and n_filters <= {n_filters_limit}",
                    published,
                )
            filters.append((int(item[0]), int(item[1])))
        total, max_total = sum(n for _, n in filters), LIMITS["char_cnn.filters.total"][1]
        if total > max_total:
            raise fail("char_cnn.filters", f"has n_filters summing to {total}, more than {max_total}",
                       published)

        activation = cnn.get("activation")
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise fail(
                "char_cnn.activation",
                f"is {activation!r}",
                f"Supported activations are {list(ACTIVATIONS)}.",
            )

        options = cls(
            char_embedding_dim=char_dim,
            filters=tuple(filters),
            n_highway=get_int(cnn, "char_cnn.n_highway"),
            activation=activation,
            lstm_dim=get_int(lstm, "lstm.dim"),
            projection_dim=get_int(lstm, "lstm.projection_dim"),
            n_layers=get_int(lstm, "lstm.n_layers"),
            cell_clip=get_clip("cell_clip"),
            proj_clip=get_clip("proj_clip"),
            use_skip_connections=True,
            n_characters=N_CHAR_EMBEDDING_ROWS,
            max_characters_per_token=CHARS_PER_TOKEN,
            source=source,
        )
        # Each setting is in range, but together they may still describe a giant model.
        if options.n_parameters > MAX_PARAMETERS:
            raise CheckpointError(
                f"{source}: the settings lstm.dim={options.lstm_dim}, "
                f"lstm.projection_dim={options.projection_dim}, lstm.n_layers={options.n_layers}, "
                f"char_cnn.filters (sum {options.n_filters_total}) and "
                f"char_cnn.n_highway={options.n_highway} describe a model with "
                f"{options.n_parameters:,} parameters, more than the limit of {MAX_PARAMETERS:,}. "
                + published
            )
        return options

    def to_dict(self) -> Dict[str, Any]:
        """Return the options in the ``options.json`` layout (readable by AllenNLP)."""
        return {
            "lstm": {
                "dim": self.lstm_dim,
                "projection_dim": self.projection_dim,
                "n_layers": self.n_layers,
                "cell_clip": self.cell_clip,
                "proj_clip": self.proj_clip,
                "use_skip_connections": self.use_skip_connections,
            },
            "char_cnn": {
                "embedding": {"dim": self.char_embedding_dim},
                "filters": [list(f) for f in self.filters],
                "n_highway": self.n_highway,
                "activation": self.activation,
                "n_characters": self.n_characters,
                "max_characters_per_token": self.max_characters_per_token,
            },
        }


def _is_json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
