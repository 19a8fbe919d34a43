"""Mixed precision: the config's ``amp`` value to a dtype and an autocast context."""
from __future__ import annotations

import contextlib

import torch

from utils.util import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_OFF = (None, False, "false", "none", "fp32", "off", "0")


def parse_amp(value: str) -> str | bool:
    """A command-line ``--amp`` value: ``False`` for the spellings of "off", else the value."""
    return False if value.lower() in _OFF else value


def amp_dtype(amp: str | bool | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"`` -> the dtype; ``False``/``None``/``"fp32"`` -> None."""
    if amp in _OFF:
        return None
    if amp not in AMP_DTYPES:
        raise ConfigError(f"amp: unknown value {amp!r}; valid: \"bf16\", \"fp16\", false")
    return AMP_DTYPES[amp]


def autocast_context(device: torch.device | str, amp: str | bool | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on the device's type for ``amp``, or a no-op context when it is off."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype)
