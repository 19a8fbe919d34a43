"""One run, one folder: a lock held for the run's life, a status file, stale temporaries cleaned.

The lock is an exclusive ``fcntl.flock`` on ``run.lock``, which the kernel releases however the
process ends (kill -9 included); the file names its holder for the error a second run gets.
``run.json`` says what the run is doing: running, finished, interrupted, diverged or failed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

from utils.errors import ConfigError, RunFolderBusy
from utils.util import make_dirs, read_json, remove_stale_temporaries, storage_error, write_json, write_text

# Every file name of a run folder (and of a multi-seed group folder), spelled here only.
LOCK_NAME = "run.lock"
GROUP_LOCK_NAME = "group.lock"
STATUS_NAME = "run.json"
CONFIG_NAME = "config.json"
LOG_NAME = "train.log"
METRICS_NAME = "metrics.jsonl"
BEST_NAME = "model_best.pth"
INTERRUPTED_NAME = "checkpoint-interrupted.pth"
TENSORBOARD_NAME = "tensorboard"
SELECTION_NAME = "selection.txt"   # the images of a carved model-selection split, one name a line
AGGREGATE_NAME = "aggregate"   # a multi-seed group's aggregate.md and aggregate.json
FINISHED = "finished"
CHECKPOINT_GLOB = "*.pth"
_EPOCH_CHECKPOINT = re.compile(r"checkpoint-epoch(\d+)\.pth")
SEED_FOLDER = re.compile(r"(?:test_)?seed(-?\d+)")   # a group's seedN run folders, and their test_seedN


def epoch_checkpoint_name(epoch: int) -> str:
    """The checkpoint saved after ``epoch`` (every ``trainer.save_period``, and after the last epoch)."""
    return f"checkpoint-epoch{epoch}.pth"


def epoch_checkpoints(folder: str | Path) -> dict[int, Path]:
    """A run folder's epoch checkpoints by epoch."""
    return {int(match.group(1)): path for path in Path(folder).glob("checkpoint-epoch*.pth")
            if (match := _EPOCH_CHECKPOINT.fullmatch(path.name))}


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The folder's checkpoints, newest first (by modification time); temporaries excluded."""
    files = [p for p in Path(folder).glob(CHECKPOINT_GLOB) if not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def seed_name(seed: int) -> str:
    """A multi-seed group's run folder of ``seed``."""
    return f"seed{seed}"


def test_run_id(run_id: str) -> str:
    """``a/b`` -> ``a/test_b``: the folder of a ``--test`` evaluation of run id ``run_id``."""
    head, _, last = run_id.rpartition("/")
    return f"{head}/test_{last}" if head else f"test_{last}"


def check_folder_name(value: str, option: str) -> str:
    """A ``--run_id``/``--group``/``--name`` value that stays inside its parent folder: relative,
    with no ``.`` or ``..`` part (``--run_id`` may also be an absolute path, the folder itself)."""
    path = Path(value)
    if not value.strip() or (not path.is_absolute() and (any(part in (".", "..") for part in value.split("/"))
                                                         or not path.parts)):
        raise ConfigError(f"{option}: expected a folder name inside the experiment folder (no '.' or '..' parts), "
                          f"got {value!r}")
    return value


def sweep_name(split: str) -> str:
    """The stem of a split's sweep files (``.json``, ``.csv``, ``.png``)."""
    return f"sweep_{split}"


def predictions_name(split: str) -> str:
    """The folder of a split's predicted masks (``--save_predictions``)."""
    return f"predictions_{split}"


def backup_path(path: Path) -> Path:
    """Where an earlier version of ``path`` is kept: ``<stem>.previous-N<suffix>`` with the next free N."""
    path = Path(path)
    number = 1 + sum(1 for _ in path.parent.glob(f"{path.stem}.previous-*{path.suffix}"))
    return path.with_name(f"{path.stem}.previous-{number}{path.suffix}")


def new_run_id() -> str:
    """A run folder name that does not collide: microsecond time plus a random suffix."""
    return f"{datetime.now().strftime('%Y%m%d_%H%M%S_%f')}_{secrets.token_hex(2)}"


def run_path(save_dir: str | Path, name: str, run_id: str | None = None) -> Path:
    """A run's folder: ``<trainer.save_dir>/<name>/<run_id>`` (default run id: :func:`new_run_id`; an
    absolute run id is the folder itself)."""
    return Path(str(save_dir)) / name / (run_id or new_run_id())


def read_status(folder: Path) -> dict:
    """The folder's ``run.json`` (empty when there is none or it is unreadable)."""
    try:
        status = read_json(Path(folder) / STATUS_NAME)
    except ConfigError:
        return {}
    return status if isinstance(status, dict) else {}


def _holder(handle, patience_s: float = 2.0) -> str:
    """The line a lock's holder writes ("pid N on host H since T"); a holder that has only just taken
    the lock writes it within moments, so an empty file is read again for up to ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while True:
        handle.seek(0)
        text = handle.read().strip()
        if text or time.monotonic() > deadline:
            return text or "another process"
        time.sleep(0.02)


class RunLock:
    """An exclusive lock on a run folder (or, with ``name``, ``what`` and ``hint`` set, a
    multi-seed group folder) for as long as this object holds it."""

    def __init__(self, folder: Path, name: str = LOCK_NAME, what: str = "run folder", hint: str = "--run_id"):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what, self.hint = what, hint
        self.handle = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunFolderBusy` naming the process that holds it."""
        make_dirs(self.folder)
        while True:
            try:
                handle = open(self.path, "a+")
            except OSError as err:
                raise storage_error(err, self.path, "create") from None
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                busy = err.errno in (errno.EAGAIN, errno.EACCES)
                holder = _holder(handle) if busy else ""
                handle.close()
                if busy:
                    raise RunFolderBusy(f"{self.folder}: {self.what} in use by {holder}; wait for it to end, or "
                                        f"choose another {self.hint}") from None
                raise storage_error(err, self.path, "lock") from None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            handle.close()   # its holder released it (and removed the file) meanwhile: try again
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        self.handle.close()   # closing drops the flock
        self.handle = None


class RunFolder:
    """The folder of one run, created and locked by :meth:`open`, released by :meth:`close`;
    ``resume_in_place``: it continues an earlier run here, else earlier results are refused."""

    def __init__(self, path: Path, resume_in_place: bool = False):
        self.path = Path(path)
        self.resume_in_place = resume_in_place
        self.lock = RunLock(self.path)
        self.created = False

    def open(self) -> "RunFolder":
        self.created = not self.path.exists()
        self.lock.acquire()
        earlier = any(self.path.glob(CHECKPOINT_GLOB)) or any((self.path / name).is_file()
                                                             for name in (METRICS_NAME, CONFIG_NAME))
        if not self.resume_in_place and not self.created and earlier:
            status = read_status(self.path).get("status", "unknown")
            self.lock.release()
            raise ConfigError(f"{self.path}: run folder exists (earlier run, status {status}); choose another "
                              f"--run_id, or continue it with -r {self.path}")
        remove_stale_temporaries(self.path)
        return self

    @property
    def interrupted_checkpoint(self) -> Path:
        return self.path / INTERRUPTED_NAME

    def write_selection(self, names: list[str]) -> None:
        """``selection.txt``: the images the model-selection split holds (one name a line)."""
        write_text("".join(f"{name}\n" for name in names), self.path / SELECTION_NAME)

    def write_config(self, content: dict) -> None:
        """``config.json``; a resumed run that changed it keeps the earlier one as ``config.previous-N.json``."""
        path = self.path / CONFIG_NAME
        if path.is_file():
            earlier = read_json(path)
            if earlier == content:
                return
            write_json(earlier, backup_path(path))
        write_json(content, path)

    def set_status(self, status: str, **extra) -> None:
        """Record what the run is doing in ``run.json`` (atomically)."""
        content = {"status": status, "pid": os.getpid(), "host": socket.gethostname(),
                   "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv, **extra}
        write_json(content, self.path / STATUS_NAME)

    def close(self, remove: bool = False) -> None:
        """Release the lock; ``remove``: delete the folder when this run created it and it holds
        only what the run wrote at start-up (a run whose start-up failed leaves nothing)."""
        self.lock.release()
        if remove and self.created and self.path.is_dir():
            leftovers = {p.name for p in self.path.iterdir()} - {CONFIG_NAME, LOG_NAME, STATUS_NAME, LOCK_NAME}
            if not leftovers:
                for child in self.path.iterdir():
                    child.unlink()
                self.path.rmdir()
