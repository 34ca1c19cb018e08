"""Validation helpers shared by the family configs.

Every family reads its ``config.json`` into a small dataclass and checks each
value (type and range) before anything is allocated, so a bad file fails with a
:class:`CheckpointError` naming the file and the key. These helpers keep those
checks and their messages the same in every family.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

from ..errors import CheckpointError
from .blocks import ACTIVATIONS

# Generous bounds on single values, far above any published model: they turn absurd
# values into a clear message naming the key. They do not bound the model's size
# (16M x 16M would still be huge); that guard is the loader's comparison of the
# implied shapes with the weight file's header before anything is built.
MAX_DIM = 1 << 24
MAX_LAYERS = 1024


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON ``true`` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value: Any, key: str, low: int, high: int, source: str) -> int:
    """``value`` must be an int in [low, high]; the error names ``source`` and ``key``."""
    if not is_int(value):
        raise CheckpointError(
            f"{source}: {key}={value!r} must be an integer, not {type(value).__name__}."
        )
    if not low <= value <= high:
        raise CheckpointError(f"{source}: {key}={value} must be between {low} and {high}.")
    return value


def check_int_fields(
    config: Any,
    limits: Mapping[str, Sequence[Any]],
    source: str,
    key_name: Optional[Callable[[str], str]] = None,
) -> None:
    """Check the int attributes of ``config`` that ``limits`` names, each against its
    ``(low, high, ...)``; ``key_name`` gives the config.json key a message names
    (default: the attribute's own name)."""
    for key, (low, high, *_) in limits.items():
        check_int(getattr(config, key), key_name(key) if key_name else key, low, high, source)


def check_probability(value: Any, key: str, source: str) -> float:
    """A dropout probability: a number in [0, 1)."""
    if not is_number(value) or not 0.0 <= value < 1.0:
        raise CheckpointError(f"{source}: {key}={value!r} must be a number in [0, 1).")
    return float(value)


def check_eps(value: Any, key: str, source: str) -> float:
    """A layer-norm epsilon: a finite number in (0, 1)."""
    if not is_number(value) or not math.isfinite(value) or not 0 < value < 1:
        raise CheckpointError(f"{source}: {key}={value!r} must be a number in (0, 1).")
    return float(value)


def check_activation(value: Any, key: str, source: str) -> str:
    """An activation name that :mod:`.blocks` implements."""
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise CheckpointError(
            f"{source}: {key}={value!r} is not supported; use one of {sorted(ACTIVATIONS)}."
        )
    return value


def check_bool(value: Any, key: str, source: str) -> bool:
    """A JSON ``true``/``false``."""
    if not isinstance(value, bool):
        raise CheckpointError(f"{source}: {key}={value!r} must be true or false.")
    return value


def check_str(value: Any, key: str, source: str) -> str:
    """A string."""
    if not isinstance(value, str):
        raise CheckpointError(f"{source}: {key}={value!r} must be a string.")
    return value


def check_divisible(width: int, width_key: str, heads: int, heads_key: str, source: str) -> None:
    """``width`` must split evenly into ``heads`` (attention heads, groups)."""
    if width % heads:
        raise CheckpointError(
            f"{source}: {width_key}={width} is not divisible by {heads_key}={heads}."
        )


def check_pad_token(pad_token_id: int, vocab_size: int, source: str, hint: str = "") -> None:
    """``pad_token_id`` must index the vocabulary; ``hint`` (e.g. "; remove it") is
    appended to the message before its full stop."""
    if pad_token_id >= vocab_size:
        raise CheckpointError(
            f"{source}: pad_token_id={pad_token_id} is outside the vocabulary "
            f"(vocab_size={vocab_size}){hint}."
        )


def check_bert_settings(config: Any, source: str) -> None:
    """The checks every config with BERT's key names shares: the two dropout
    probabilities, ``layer_norm_eps``, ``hidden_act``, ``model_type``, heads that
    divide ``hidden_size``, and ``pad_token_id`` inside the vocabulary. The integer
    ranges (:func:`check_int_fields`) must be checked first."""
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        check_probability(getattr(config, key), key, source)
    check_eps(config.layer_norm_eps, "layer_norm_eps", source)
    check_activation(config.hidden_act, "hidden_act", source)
    check_str(config.model_type, "model_type", source)
    check_divisible(
        config.hidden_size, "hidden_size", config.num_attention_heads, "num_attention_heads", source
    )
    check_pad_token(config.pad_token_id, config.vocab_size, source)


def setting(data: Dict[str, Any], key: str, default: Any) -> Any:
    """``data[key]``, or ``default`` when it is missing or null (Hugging Face writes
    null for "the default")."""
    found = data.get(key)
    return default if found is None else found


def require_object(data: Any, source: str) -> Dict[str, Any]:
    """``data`` must be a JSON object (dict)."""
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{source}: must hold a JSON object of settings, found {type(data).__name__}."
        )
    return data


def require_keys(data: Dict[str, Any], keys: Iterable[str], source: str) -> None:
    """Every key of ``keys`` must be in ``data``."""
    for key in keys:
        if key not in data:
            raise CheckpointError(f"{source}: the required key '{key}' is missing.")


def pick(
    data: Dict[str, Any], defaults: Dict[str, Any], nullable: Iterable[str] = ()
) -> Dict[str, Any]:
    """``defaults`` overridden by the keys of ``data`` it names; a null in ``data`` for a
    key in ``nullable`` means "the default" (Hugging Face writes null for that)."""
    nullable = set(nullable)
    values = dict(defaults)
    for key in defaults:
        if key in data and not (data[key] is None and key in nullable):
            values[key] = data[key]
    return values


def read_config_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a ``config.json`` as a dict, with our errors for a missing or broken file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf8"))
    except FileNotFoundError as err:
        raise CheckpointError(
            f"{path}: no config.json; a Hugging Face checkpoint directory needs one."
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}).") from err
    return require_object(data, str(path))
