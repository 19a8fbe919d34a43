"""Mixed precision: the config's ``amp``, ``"auto"`` resolved per device, as a dtype and an autocast
context. ``"auto"`` (the shipped default) picks what the hardware runs natively:

* CUDA: bf16 on compute capability >= 8.0 (Ampere and newer), else fp16 with a GradScaler;
* CPU: bf16 where torch reports native bf16 matrix support (AMX or AVX512-BF16, and neither
  ``ATEN_CPU_CAPABILITY`` nor ``ONEDNN_MAX_CPU_ISA`` limits torch below it), else fp32.

An explicit ``"bf16"`` on a CPU without native bf16 (10-20x slower than fp32) runs with a warning.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from utils.errors import ConfigError

AUTO = "auto"
AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_OFF = (None, False, "false", "none", "fp32", "off", "0")
# Measured on a 2-core AVX2 EPYC (docs/benchmarks.md): bf16+cl vs fp32 training throughput.
NON_NATIVE_BF16_SLOWDOWN = "about 15x"


def parse_amp(value: str) -> str | bool:
    """A command-line ``--amp`` value: ``False`` for the spellings of "off", else the value."""
    return False if value.lower() in _OFF else value


def check_amp(amp: str | bool | None) -> None:
    """Raise a one-line ConfigError unless ``amp`` is ``"auto"``, a known precision or off."""
    if amp != AUTO and amp not in _OFF and amp not in AMP_DTYPES:
        raise ConfigError(f"amp: unknown value {amp!r}; valid: \"auto\", \"bf16\", \"fp16\", false")


def amp_dtype(amp: str | bool | None) -> torch.dtype | None:
    """A resolved ``amp``: ``"bf16"``/``"fp16"`` -> the dtype; ``False``/``None``/``"fp32"`` -> None."""
    check_amp(amp)
    if amp == AUTO:
        raise ValueError("amp 'auto' must be resolved for a device first (utils.amp.resolve_precision)")
    return None if amp in _OFF else AMP_DTYPES[amp]


def autocast_context(device: torch.device | str, amp: str | bool | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on the device's type for a resolved ``amp``, or a no-op context when it is off."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@dataclass(frozen=True)
class CpuBf16:
    """What this CPU (as torch will use it) offers for bf16 matrix products."""

    native: bool
    detail: str   # "AMX", "AVX512-BF16", or why not


def cpu_bf16_support() -> CpuBf16:
    """Native bf16 matrix support as torch reports it: the hardware (AMX tiles or AVX512-BF16)
    and torch's dispatch (ATen's CPU capability, oneDNN's bf16 support; both follow the
    ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` limits)."""
    amx, avx512_bf16 = torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()
    if not (amx or avx512_bf16):
        return CpuBf16(False, "this CPU has no native bf16 (no AMX, no AVX512-BF16)")
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return CpuBf16(False, f"torch dispatches {capability} kernels on this CPU (ATEN_CPU_CAPABILITY), "
                              "without native bf16")
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return CpuBf16(False, "oneDNN runs without native bf16 here (ONEDNN_MAX_CPU_ISA)")
    return CpuBf16(True, "AMX" if amx else "AVX512-BF16")


@dataclass(frozen=True)
class Precision:
    """A resolved ``amp``: the value the run uses (``"bf16"``, ``"fp16"`` or ``False``), what was
    asked for, why, and a warning when the choice is known to be slow on this device."""

    amp: str | bool
    requested: str | bool | None
    reason: str
    warning: str | None = None

    @property
    def name(self) -> str:
        return "fp32" if self.amp is False else str(self.amp)

    def describe(self) -> str:
        """One line for the banner, e.g. ``precision: fp32 (auto: this CPU has no native bf16)``."""
        return f"precision: {self.name} ({self.reason})"

    def record(self) -> dict:
        """What the run writes into config.json, metrics.jsonl and its checkpoints."""
        return {"amp": self.name, "requested": "fp32" if self.requested in _OFF else self.requested,
                "reason": self.reason}


def resolve_precision(amp: str | bool | None, device: torch.device | str) -> Precision:
    """``amp`` as a run on ``device`` uses it: ``"auto"`` by the rule above; an explicit value as
    given (with a warning for bf16 on a CPU without native bf16)."""
    check_amp(amp)
    device = torch.device(device)
    if amp != AUTO:
        resolved = False if amp in _OFF else {"bfloat16": "bf16", "float16": "fp16"}.get(amp, amp)
        support = cpu_bf16_support() if resolved == "bf16" and device.type == "cpu" else None
        warning = None if support is None or support.native else (
            f"amp bf16 on a CPU without native bf16 ({support.detail}) runs {NON_NATIVE_BF16_SLOWDOWN} slower than "
            "fp32; use \"amp\": \"auto\" (or --amp auto)")
        return Precision(resolved, amp, "as configured", warning)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        what = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
        return (Precision("bf16", amp, f"auto: {what} has native bf16") if major >= 8 else
                Precision("fp16", amp, f"auto: {what} has no native bf16; fp16 with a gradient scaler"))
    if device.type != "cpu":
        return Precision(False, amp, f"auto: fp32 on {device.type}")
    support = cpu_bf16_support()
    return (Precision("bf16", amp, f"auto: this CPU has native bf16 ({support.detail})") if support.native
            else Precision(False, amp, f"auto: {support.detail}"))
