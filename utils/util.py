"""Small file helpers shared by the whole project: one-line errors, JSON, atomic writes."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from utils.errors import ConfigError, StorageError

TMP_SUFFIX = ".tmp"


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


def file_mode() -> int:
    """The permissions new files get under this process's umask (0o666 & ~umask), read without
    changing it where /proc/self/status tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)   # elsewhere: read it by setting it, then put it back
    os.umask(umask)
    return 0o666 & ~umask


def storage_error(err: OSError, path: Path, what: str = "write") -> StorageError:
    """A one-line error for a failed file operation: the file, the OS's reason."""
    reason = err.strerror or type(err).__name__
    return StorageError(f"cannot {what} {path}: {reason}")


def make_dirs(path: str | Path) -> Path:
    """``mkdir -p``; an OS refusal (read-only, permission) is a one-line StorageError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(err, path, "create folder") from None
    return path


class _WriteRecorder:
    """A binary file that remembers the first OS error of its ``write`` (torch's zip writer
    turns it into a RuntimeError about stream positions)."""

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str):
        return getattr(self.handle, name)


def atomic_write(path: Path, write: Callable) -> None:
    """Write through a temporary file in the same folder (``.<name>.*.tmp``), fsync, then rename
    over ``path``: a crash or a full disk never leaves a half-written ``path``. The file follows
    the umask; OS errors become one-line StorageErrors."""
    path = Path(path)
    make_dirs(path.parent)
    tmp, recorder = None, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            recorder = _WriteRecorder(handle)
            write(recorder)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise storage_error(err, path) from None
    except RuntimeError:
        if recorder is None or recorder.error is None:
            raise
        raise storage_error(recorder.error, path) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the ``.*.tmp`` files :func:`atomic_write` leaves when its process is killed
    (call only when no other process writes into ``folder``)."""
    for path in Path(folder).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.unlink()


def write_text(text: str, path: str | Path) -> None:
    """Write a UTF-8 text file atomically."""
    data = text.encode()
    atomic_write(Path(path), lambda handle: handle.write(data))


def write_json(content: Any, path: str | Path) -> None:
    """Write JSON atomically (indent 4, key order kept)."""
    write_text(json.dumps(content, indent=4, sort_keys=False) + "\n", path)


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
