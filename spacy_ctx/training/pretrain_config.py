"""Reading and validating pretraining configs (``configs/pretrain_mlm.cfg``).

The file is a thinc/spaCy :class:`~thinc.api.Config` with two sections::

    [paths]
    raw_text = null     # .jsonl ({"text": ...}), .txt (one document per line) or .spacy
    encoder = null      # the checkpoint to continue from (HF-format directory)
    heldout = null      # held-out text; null: split heldout_fraction off raw_text

    [pretraining]
    objective = "mlm"   # "mlm" (masked LM, +NSP), "clm" (causal LM, GPT-2) or "elmo"
    ...

Command-line overrides (``--pretraining.max_steps 100``) use spaCy's syntax and
are applied while the file is read. :func:`read_settings` checks every setting
(types, ranges, paths, the checkpoint's family against the objective) before any
data is read or any tensor allocated, and raises :class:`ConfigError` saying
which key is wrong and how to fix it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..errors import ConfigError

OBJECTIVES = ("mlm", "clm", "elmo")
MASKINGS = ("piece", "word", "span")
#: Families whose checkpoints have an NSP head in HF (``cls.seq_relationship``).
NSP_FAMILIES = ("bert",)
#: Families trained with the causal-LM objective.
CAUSAL_FAMILIES = ("gpt2",)

#: Every ``[pretraining]`` key with its default; a key not listed here is an error.
DEFAULTS: Dict[str, Any] = {
    "objective": "mlm",
    "masking": "piece",
    "mask_probability": 0.15,
    "span_mean_length": 3.0,
    "nsp": False,
    "seq_len": 128,
    "batch_size": 32,
    "grad_accumulation": 1,
    "max_steps": 10000,
    "eval_frequency": 200,
    "checkpoint_frequency": 1000,
    "learn_rate": 5e-5,
    "warmup_steps": 500,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "dropout": True,
    "seed": 0,
    "lang": "en",
    "heldout_fraction": 0.05,
    "heldout_max_sequences": 512,
    "text_key": "text",
    "max_chars": 1_000_000,
}
PATH_KEYS = ("raw_text", "encoder", "heldout")


@dataclass(frozen=True)
class PretrainSettings:
    """Validated pretraining settings (see the module docstring for the file)."""

    raw_text: List[Path]
    encoder: Optional[Path]
    heldout: Optional[List[Path]]
    objective: str = "mlm"
    masking: str = "piece"
    mask_probability: float = 0.15
    span_mean_length: float = 3.0
    nsp: bool = False
    seq_len: int = 128
    batch_size: int = 32
    grad_accumulation: int = 1
    max_steps: int = 10000
    eval_frequency: int = 200
    checkpoint_frequency: int = 1000
    learn_rate: float = 5e-5
    warmup_steps: int = 500
    weight_decay: float = 0.01
    grad_clip: Optional[float] = 1.0
    dropout: Union[bool, float] = True
    seed: int = 0
    lang: str = "en"
    heldout_fraction: float = 0.05
    heldout_max_sequences: int = 512
    text_key: str = "text"
    max_chars: int = 1_000_000
    model_type: Optional[str] = field(default=None)

    def to_json(self) -> Dict[str, Any]:
        """JSON-friendly dict (paths as strings), for logs and checkpoint checks."""
        data = asdict(self)
        for key in PATH_KEYS:
            value = data[key]
            if isinstance(value, list):
                data[key] = [str(v) for v in value]
            elif value is not None:
                data[key] = str(value)
        return data


def load_config(path: Union[str, Path], overrides: Optional[Dict[str, Any]] = None):
    """Read a config file with ``--section.key value`` overrides applied (not validated)."""
    from thinc.api import Config

    try:
        from confection import ConfigValidationError
    except ImportError:  # pragma: no cover - older thinc
        from thinc.api import ConfigValidationError  # type: ignore

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return Config().from_disk(path, overrides=dict(overrides or {}), interpolate=True)
    except ConfigValidationError as err:
        raise ConfigError(
            f"{path}: cannot apply the overrides {sorted(overrides or {})}: {err}. "
            "Overrides must name existing keys, e.g. --pretraining.max_steps 100"
        ) from None
    except Exception as err:  # a syntax error in the file
        raise ConfigError(f"{path}: cannot parse the config: {err}") from None


def _paths(value: Any, key: str, *, must_exist: bool = True) -> Optional[List[Path]]:
    if value is None or value == "":
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    paths = []
    for item in items:
        if not isinstance(item, (str, Path)):
            raise ConfigError(f"[paths] {key} must be a path or a list of paths, got {item!r}")
        # A comma-separated string is a list too (handy on the command line).
        for part in str(item).split(","):
            if part.strip():
                paths.append(Path(part.strip()))
    for path in paths:
        if must_exist and not path.exists():
            raise ConfigError(f"[paths] {key} = {str(path)!r} does not exist; pass --paths.{key} PATH")
    return paths or None


def _int(section: Dict[str, Any], key: str, minimum: int) -> int:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"[pretraining] {key} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"[pretraining] {key} must be >= {minimum}, got {value}")
    return value


def _float(section: Dict[str, Any], key: str, low: float, high: float, *, open_low: bool = False,
           open_high: bool = False) -> float:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"[pretraining] {key} must be a number, got {value!r}")
    too_low = value <= low if open_low else value < low
    too_high = value >= high if open_high else value > high
    if too_low or too_high:
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        raise ConfigError(f"[pretraining] {key} must be in {lo}{low}, {high}{hi}, got {value}")
    return float(value)


def _choice(section: Dict[str, Any], key: str, choices: tuple) -> str:
    value = section[key]
    if value not in choices:
        raise ConfigError(f"[pretraining] {key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def checkpoint_model_type(encoder: Path) -> str:
    """``model_type`` from ``encoder/config.json``, with a clear error when unreadable."""
    config_path = encoder / "config.json"
    if not config_path.is_file():
        raise ConfigError(
            f"[paths] encoder = {str(encoder)!r} has no config.json; point it at a Hugging Face-format "
            "checkpoint directory"
        )
    try:
        model_type = json.loads(config_path.read_text(encoding="utf8")).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{config_path}: cannot read the checkpoint config: {err}") from None
    if not isinstance(model_type, str):
        raise ConfigError(f"{config_path}: no model_type; is this a transformer checkpoint?")
    return model_type


def read_settings(config: Any, *, check_paths: bool = True) -> PretrainSettings:
    """Validate a loaded config (see :func:`load_config`) into :class:`PretrainSettings`.

    ``check_paths=False`` skips the existence checks (for tests of the other keys).
    """
    if "paths" not in config or "pretraining" not in config:
        raise ConfigError("a pretraining config needs a [paths] and a [pretraining] section")
    paths = dict(config["paths"])
    unknown_paths = sorted(set(paths) - set(PATH_KEYS))
    if unknown_paths:
        raise ConfigError(f"[paths] has unknown keys {unknown_paths}; known: {list(PATH_KEYS)}")
    section = dict(config["pretraining"])
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"[pretraining] has unknown keys {unknown}; known: {sorted(DEFAULTS)}")
    section = {**DEFAULTS, **section}

    objective = _choice(section, "objective", OBJECTIVES)
    masking = _choice(section, "masking", MASKINGS)
    mask_probability = _float(section, "mask_probability", 0.0, 1.0, open_low=True, open_high=True)
    span_mean_length = _float(section, "span_mean_length", 1.0, 100.0)
    if not isinstance(section["nsp"], bool):
        raise ConfigError(f"[pretraining] nsp must be true or false, got {section['nsp']!r}")
    seq_len = _int(section, "seq_len", 8)
    batch_size = _int(section, "batch_size", 1)
    grad_accumulation = _int(section, "grad_accumulation", 1)
    max_steps = _int(section, "max_steps", 1)
    eval_frequency = _int(section, "eval_frequency", 1)
    checkpoint_frequency = _int(section, "checkpoint_frequency", 1)
    learn_rate = _float(section, "learn_rate", 0.0, 1.0, open_low=True)
    warmup_steps = _int(section, "warmup_steps", 0)
    if warmup_steps > max_steps:
        raise ConfigError(f"[pretraining] warmup_steps ({warmup_steps}) must not exceed max_steps ({max_steps})")
    weight_decay = _float(section, "weight_decay", 0.0, 1.0)
    grad_clip = section["grad_clip"]
    if grad_clip is not None:
        grad_clip = _float(section, "grad_clip", 0.0, float("inf"))
        grad_clip = grad_clip or None  # 0 disables clipping like null
    dropout = section["dropout"]
    if not isinstance(dropout, bool):
        dropout = _float(section, "dropout", 0.0, 1.0, open_high=True)
    seed = _int(section, "seed", 0)
    lang = section["lang"]
    if not isinstance(lang, str) or not lang:
        raise ConfigError(f"[pretraining] lang must be a spaCy language code, got {lang!r}")
    heldout_fraction = _float(section, "heldout_fraction", 0.0, 0.5)
    heldout_max_sequences = _int(section, "heldout_max_sequences", 1)
    text_key = section["text_key"]
    if not isinstance(text_key, str) or not text_key:
        raise ConfigError(f"[pretraining] text_key must be a non-empty string, got {text_key!r}")
    max_chars = _int(section, "max_chars", 1)

    raw_text = _paths(paths.get("raw_text"), "raw_text", must_exist=check_paths)
    if raw_text is None:
        raise ConfigError("[paths] raw_text is not set; pass --paths.raw_text FILE (.jsonl, .txt or .spacy)")
    heldout = _paths(paths.get("heldout"), "heldout", must_exist=check_paths)
    encoder_paths = _paths(paths.get("encoder"), "encoder", must_exist=check_paths)
    encoder = encoder_paths[0] if encoder_paths else None
    if encoder_paths and len(encoder_paths) > 1:
        raise ConfigError(f"[paths] encoder must be one checkpoint directory, got {encoder_paths}")

    model_type = None
    if objective in ("mlm", "clm"):
        if encoder is None:
            raise ConfigError(
                f"[paths] encoder is not set; objective {objective!r} continues pretraining a checkpoint: "
                "pass --paths.encoder MODEL_DIR"
            )
        if check_paths:
            model_type = checkpoint_model_type(encoder)
            if objective == "mlm" and model_type in CAUSAL_FAMILIES:
                raise ConfigError(
                    f"[paths] encoder {str(encoder)!r} is a {model_type} checkpoint, which has no masked-LM "
                    'head; set objective = "clm" (--pretraining.objective clm) for causal-LM pretraining'
                )
            if objective == "clm" and model_type not in CAUSAL_FAMILIES:
                raise ConfigError(
                    f"[paths] encoder {str(encoder)!r} is a {model_type} checkpoint; objective \"clm\" is for "
                    f"{', '.join(CAUSAL_FAMILIES)}; use objective = \"mlm\""
                )
            if section["nsp"] and model_type not in NSP_FAMILIES:
                raise ConfigError(
                    f"[pretraining] nsp = true needs a checkpoint of {', '.join(NSP_FAMILIES)} "
                    f"(next-sentence head); {str(encoder)!r} is {model_type}. Set nsp = false"
                )
        if section["nsp"] and objective == "clm":
            raise ConfigError('[pretraining] nsp = true is for objective = "mlm"')
    if check_paths and objective != "elmo":
        import spacy

        try:
            spacy.util.get_lang_class(lang)
        except Exception:
            raise ConfigError(f"[pretraining] lang = {lang!r} is not a language spaCy knows (e.g. \"en\", \"de\", \"xx\")") from None
    return PretrainSettings(
        raw_text=raw_text,
        encoder=encoder,
        heldout=heldout,
        objective=objective,
        masking=masking,
        mask_probability=mask_probability,
        span_mean_length=span_mean_length,
        nsp=section["nsp"],
        seq_len=seq_len,
        batch_size=batch_size,
        grad_accumulation=grad_accumulation,
        max_steps=max_steps,
        eval_frequency=eval_frequency,
        checkpoint_frequency=checkpoint_frequency,
        learn_rate=learn_rate,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        dropout=dropout,
        seed=seed,
        lang=lang,
        heldout_fraction=heldout_fraction,
        heldout_max_sequences=heldout_max_sequences,
        text_key=text_key,
        max_chars=max_chars,
        model_type=model_type,
    )
