"""One run, one folder: a lock held for the run's life, a status file, stale temporaries cleaned.

The lock is ``run.lock`` with an exclusive ``fcntl.flock`` held by the live process: the kernel
releases it when that process ends, however it ends (kill -9 included), so a lock left behind
is recognised as stale and taken over. The file names its holder (pid, host, start time) for
the one-line error a second run gets. ``run.json`` says what the run is doing: running,
finished, interrupted, diverged or failed.
"""
from __future__ import annotations

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
GROUP_LOGS_NAME = "logs"       # a multi-seed group's logs/seedN.log
FINISHED = "finished"
CHECKPOINT_GLOB = "*.pth"
_EPOCH_CHECKPOINT = re.compile(r"checkpoint-epoch(\d+)\.pth")
SEED_FOLDER = re.compile(r"(?:test_)?seed(-?\d+)")   # a group's seedN run folders, and their test_seedN


def epoch_checkpoint_name(epoch: int) -> str:
    """The checkpoint saved after ``epoch`` (every ``trainer.save_period``, and after the last epoch)."""
    return f"checkpoint-epoch{epoch}.pth"


def epoch_checkpoints(folder: str | Path) -> dict[int, Path]:
    """A run folder's epoch checkpoints by epoch."""
    found = {}
    for path in Path(folder).glob("checkpoint-epoch*.pth"):
        match = _EPOCH_CHECKPOINT.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


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
    path = Path(folder) / STATUS_NAME
    try:
        status = read_json(path)
    except ConfigError:
        return {}
    return status if isinstance(status, dict) else {}


def has_results(folder: Path) -> bool:
    """Whether a folder holds an earlier run's work (checkpoints, metrics or a config)."""
    folder = Path(folder)
    return folder.is_dir() and (any(folder.glob(CHECKPOINT_GLOB)) or (folder / METRICS_NAME).is_file()
                                or (folder / CONFIG_NAME).is_file())


class RunLock:
    """An exclusive lock on a run folder (or, with ``name="group.lock"`` and ``what="group
    folder"``, a multi-seed group folder) for as long as this object holds it."""

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
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    raise RunFolderBusy(f"{self.folder}: {self.what} in use by {holder}; wait for it to end, or "
                                        f"choose another {self.hint}") from None
                raise storage_error(err, self.path, "lock") from None
            if self._still_the_lock_file(handle):
                break
            handle.close()   # its holder released it (and removed the file) meanwhile: try again
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle

    def _still_the_lock_file(self, handle) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except OSError:
            return False

    def release(self) -> None:
        if self.handle is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        self.handle.close()   # closing drops the flock
        self.handle = None


class RunFolder:
    """The folder of one run: created and locked by :meth:`open`, released by :meth:`close`.

    ``resume_in_place``: the run continues an earlier run in this folder (requeue); otherwise a
    folder that holds an earlier run's results is refused (nothing is overwritten).
    """

    def __init__(self, path: Path, resume_in_place: bool = False):
        self.path = Path(path)
        self.resume_in_place = resume_in_place
        self.lock = RunLock(self.path)
        self.created = False

    def open(self) -> "RunFolder":
        self.created = not self.path.exists()
        self.lock.acquire()
        if not self.resume_in_place and not self.created and has_results(self.path):
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
