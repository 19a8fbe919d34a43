"""Small file helpers shared by the whole project."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


class ConfigError(ValueError):
    """A user-facing error about a config, a file or a value; printed as one line."""


def error_exit(err: ConfigError, code: int = 2) -> int:
    """A command line's answer to a user error: one ``error: ...`` line on stderr, status 2."""
    print(f"error: {err}", file=sys.stderr)
    return code


def read_json(path: str | Path) -> Any:
    """Read a JSON file (dicts keep the file's key order); errors name the file."""
    path = Path(path)
    try:
        with path.open("rt") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(content: Any, path: str | Path) -> None:
    """Write JSON atomically (indent 4, key order kept)."""
    data = json.dumps(content, indent=4, sort_keys=False).encode() + b"\n"
    atomic_write(Path(path), lambda handle: handle.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file, then rename: a crash never leaves a half-written file."""
    atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def json_safe(value: Any) -> Any:
    """Replace NaN/Inf floats with None (recursively) so the JSON is valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
