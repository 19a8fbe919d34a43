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
import socket
import sys
import time
from pathlib import Path

from utils.util import ConfigError, make_dirs, read_json, remove_stale_temporaries, storage_error, write_json

LOCK_NAME = "run.lock"
GROUP_LOCK_NAME = "group.lock"
STATUS_NAME = "run.json"
FINISHED = "finished"


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder."""


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
    return folder.is_dir() and (any(folder.glob("*.pth")) or (folder / "metrics.jsonl").is_file()
                                or (folder / "config.json").is_file())


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
            leftovers = {p.name for p in self.path.iterdir()} - {"config.json", "train.log", STATUS_NAME, LOCK_NAME}
            if not leftovers:
                for child in self.path.iterdir():
                    child.unlink()
                self.path.rmdir()
