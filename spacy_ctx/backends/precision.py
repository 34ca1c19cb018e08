"""Cheaper arithmetic for the encoders: which autocast dtype to use, and int8 Linear layers.

``mixed_precision = "auto"`` picks bf16 autocast where the hardware computes bf16
natively and float32 elsewhere:

- CUDA: compute capability 8.0 or newer (Ampere, Hopper, ...), where bf16 matmuls
  run on the tensor cores;
- CPU: x86 with AVX-512 BF16 or AMX (Cooper Lake, Sapphire Rapids and newer,
  Zen 4 and newer), where oneDNN has bf16 dot-product instructions. Other CPUs
  *emulate* bf16 (AVX-512 without BF16 converts in software), which is slower than
  float32, so ``"auto"`` stays float32 there. Arm CPUs with BF16 are not detected
  (unmeasured): ask for ``"bf16"`` explicitly there.

``quantize = "int8"`` swaps the encoder's ``nn.Linear`` layers for dynamically
quantized ones (int8 weights per output channel, activations quantized per call
with one scale for the batch, int32 accumulation: fbgemm/oneDNN kernels that use
AVX-512 VNNI where the CPU has it). Only the Linear layers change: embeddings,
LayerNorm and attention stay float32. On CPUs with VNNI the activations use all 8
bits; torch's stock module always uses 7 (``reduce_range``, which avoids int16
overflow in the pre-VNNI ``vpmaddubsw`` kernels), which on MiniLM doubled the
error (worst token cosine vs float32 0.91 instead of 0.98). It is for CPU inference with a frozen encoder; the
float32 weights stay in memory and are what gets saved, so a pipeline folder is
the same Hugging Face checkpoint with or without quantization.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import ConfigError

logger = logging.getLogger("spacy_ctx")

# The autocast dtype of each resolved precision (None: float32, no autocast).
_AUTOCAST_DTYPES: Dict[str, Optional[torch.dtype]] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
MIXED_PRECISION_SETTINGS: Tuple[Optional[str], ...] = (None, "auto", "bf16", "fp16")
QUANTIZE_SETTINGS: Tuple[Optional[str], ...] = (None, "int8")

# /proc/cpuinfo flags of native bf16 arithmetic on x86.
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """What a ``mixed_precision`` setting means on one device.

    ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (the autocast dtype, fp32 =
    no autocast); ``reason``: why, in words (shown in logs and reports).
    """

    precision: str
    reason: str

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype, or None for float32 (no autocast)."""
        return _AUTOCAST_DTYPES[self.precision]


def check_mixed_precision(value: Optional[str]) -> Optional[str]:
    """``value`` if it is a valid ``mixed_precision`` setting, else a ConfigError."""
    if value not in MIXED_PRECISION_SETTINGS:
        raise ConfigError(
            f"mixed_precision must be one of null, \"auto\", \"bf16\" or \"fp16\", got {value!r}. "
            "\"auto\" uses bf16 where the device computes it natively (CUDA compute "
            "capability >= 8.0, CPUs with AVX-512 BF16 or AMX) and float32 elsewhere."
        )
    return value


def check_quantize(value: Optional[str]) -> Optional[str]:
    """``value`` if it is a valid ``quantize`` setting, else a ConfigError."""
    if value not in QUANTIZE_SETTINGS:
        raise ConfigError(
            f"quantize must be null or \"int8\" (dynamic int8 quantization of the "
            f"encoder's Linear layers, CPU inference with a frozen encoder), got {value!r}."
        )
    return value


def _cpuinfo_flags(path: Union[str, Path] = "/proc/cpuinfo") -> Optional[set]:
    """The CPU flags of the first processor in ``/proc/cpuinfo`` (None if unreadable)."""
    try:
        text = Path(path).read_text(encoding="utf8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_bf16_support(cpuinfo: Union[str, Path] = "/proc/cpuinfo") -> Tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and how that was decided.

    torch's own checks (``torch.cpu._is_avx512_bf16_supported`` and
    ``_is_amx_tile_supported``, which also see whether the OS enabled the
    registers) are asked first; where this torch lacks them, the ``avx512_bf16`` /
    ``amx_bf16`` flags of ``/proc/cpuinfo``. Not ``torch.ops.mkldnn._is_mkldnn_bf16_supported``:
    that is true on any AVX-512 CPU, including those that only emulate bf16.
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [check for check in checks if callable(check)]
    if checks:
        try:
            answers = [bool(check()) for check in checks]
        except Exception:  # noqa: BLE001 -- a private torch API; fall back to cpuinfo
            answers = None
        if answers is not None:
            if answers[0]:
                return True, "CPU with AVX-512 BF16 (torch.cpu)"
            if len(answers) > 1 and answers[1]:
                return True, "CPU with AMX (torch.cpu)"
            return False, "CPU without AVX-512 BF16 or AMX (torch.cpu)"
    flags = _cpuinfo_flags(cpuinfo)
    if flags is None:
        return False, "CPU features unknown (no torch check, /proc/cpuinfo unreadable)"
    found = [flag for flag in _CPU_BF16_FLAGS if flag in flags]
    if found:
        return True, f"CPU with {found[0]} (/proc/cpuinfo)"
    return False, "CPU without avx512_bf16 or amx_bf16 (/proc/cpuinfo)"


@functools.lru_cache(maxsize=None)
def _cpu_bf16_cached() -> Tuple[bool, str]:
    return cpu_bf16_support()


def cuda_bf16_support(device: torch.device) -> Tuple[bool, str]:
    """Whether a CUDA device computes bf16 natively (compute capability >= 8.0)."""
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) >= (8, 0):
        return True, f"{name} (compute capability {major}.{minor} >= 8.0)"
    return False, f"{name} (compute capability {major}.{minor} < 8.0)"


def resolve_precision(setting: Optional[str], device: Union[str, torch.device]) -> PrecisionChoice:
    """What ``mixed_precision = setting`` means on ``device``.

    ``None`` is float32, ``"bf16"``/``"fp16"`` are what they say, ``"auto"`` is bf16
    where the device computes it natively (see the module docstring) and float32
    elsewhere.
    """
    check_mixed_precision(setting)
    device = torch.device(device)
    if setting is None:
        return PrecisionChoice("fp32", "mixed_precision = null")
    if setting != "auto":
        return PrecisionChoice(setting, f"mixed_precision = {setting!r}")
    if device.type == "cuda":
        native, why = cuda_bf16_support(device)
    elif device.type == "cpu":
        native, why = _cpu_bf16_cached()
    else:
        native, why = False, f"device type {device.type!r} is not checked"
    return PrecisionChoice("bf16" if native else "fp32", f"auto: {why}")


# -- int8 ---------------------------------------------------------------------------------------
def _quantize_dynamic():
    """``torch.ao.quantization.quantize_dynamic`` and its per-channel qconfig.

    torch marks ``torch.ao.quantization`` deprecated in favour of torchao, whose
    CPU path needs ``torch.compile`` to be fast; the eager fbgemm/oneDNN kernels
    behind ``quantize_dynamic`` are still the fastest int8 CPU Linear torch ships
    (see benchmarks/precision.py), so we use them and silence the deprecation
    notice. If a later torch drops the module, the ConfigError says so.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        except ImportError as err:
            raise ConfigError(
                f"quantize = \"int8\" needs torch.ao.quantization.quantize_dynamic, which "
                f"torch {torch.__version__} does not have. Remove the quantize setting."
            ) from err
    return quantize_dynamic, per_channel_dynamic_qconfig


def int8_engine_available() -> bool:
    """Whether this torch build has a CPU engine for quantized Linear layers."""
    engines = getattr(torch.backends.quantized, "supported_engines", [])
    return any(engine in engines for engine in ("x86", "fbgemm", "onednn", "qnnpack"))


def cpu_has_vnni() -> bool:
    """Whether the CPU has AVX-512 VNNI / AVX-VNNI (int8 dot products into int32)."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    if callable(check):
        try:
            return bool(check())
        except Exception:  # noqa: BLE001 -- a private torch API; fall back to cpuinfo
            pass
    flags = _cpuinfo_flags() or set()
    return bool({"avx512_vnni", "avx_vnni"} & flags)


@functools.lru_cache(maxsize=1)
def _int8_linear_class() -> type:
    """torch's dynamically quantized Linear, with the activation range as a setting."""
    _quantize_dynamic()  # the import check, with its clear error
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    class Int8Linear(DynamicQuantizedLinear):
        """Dynamic int8 Linear; ``reduce_range`` False uses 8-bit activations."""

        reduce_range = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.ops.quantized.linear_dynamic(
                x, self._packed_params._packed_params, reduce_range=self.reduce_range
            )
            return y.to(x.dtype)

    return Int8Linear


def quantize_linear_int8(module: nn.Module, *, full_range: Optional[bool] = None) -> nn.Module:
    """A copy of ``module`` whose ``nn.Linear`` layers are dynamically quantized to int8.

    Weights: int8 per output channel (symmetric); activations: uint8 with a scale
    and zero point computed per call, 8 bits where the CPU has VNNI (exact int32
    products), else 7 (``full_range``: None = decide by the CPU). Every other tensor (embeddings, LayerNorm, biases of non-
    Linear modules) is *shared* with ``module``, not copied: the extra memory is
    the int8 weights (a quarter of the Linear layers' float32 size). ``module`` is
    not changed. The copy is in eval mode and for inference only (no gradients).
    """
    if not int8_engine_available():
        raise ConfigError(
            "quantize = \"int8\": this torch build has no quantized CPU engine "
            f"(torch.backends.quantized.supported_engines = {torch.backends.quantized.supported_engines})."
        )
    quantize_dynamic, qconfig = _quantize_dynamic()
    int8_linear = _int8_linear_class()
    full_range = cpu_has_vnni() if full_range is None else full_range
    # Share every parameter and buffer: deepcopy then copies only the module tree.
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    shallow = copy.deepcopy(module, memo)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        quantized = quantize_dynamic(
            shallow, {nn.Linear: qconfig}, mapping={nn.Linear: int8_linear}, inplace=True
        )
    for child in quantized.modules():
        if isinstance(child, int8_linear):
            child.reduce_range = not full_range
    return quantized.eval()


def count_int8_linear(module: nn.Module) -> int:
    """How many int8 Linear layers (from :func:`quantize_linear_int8`) ``module`` has."""
    return sum(1 for m in module.modules() if isinstance(m, _int8_linear_class()))


class DerivedModule:
    """A holder for a module derived from a backend's weights (the int8 copy).

    Not an ``nn.Module`` attribute, so it is neither a submodule (no parameters in
    the optimizer, nothing in ``state_dict``, not moved by ``.to()``) nor copied:
    deep copies and pickles of the backend get an empty holder and derive it again.
    """

    def __init__(self) -> None:
        self.module: Optional[nn.Module] = None

    def clear(self) -> None:
        self.module = None

    def __deepcopy__(self, memo) -> "DerivedModule":
        return DerivedModule()

    def __reduce__(self):
        return (DerivedModule, ())
