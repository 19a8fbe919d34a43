"""Every error class of the project and the one-line form of an exception. Exit codes
(:mod:`utils.cli`): a :class:`ConfigError` 2, :class:`TrainingDiverged` 3, :class:`Interrupted` 128 + signal."""
from __future__ import annotations

import signal


class ConfigError(ValueError):
    """A user-facing error about a config, a file or a value; printed as one line."""


class StorageError(ConfigError):
    """A file could not be written (read-only folder, disk full, permission denied); one line."""


class DataError(ConfigError):
    """A bad data file (missing, unreadable, bad label values, size mismatch); names the file."""


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder."""


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or the weights became NaN or Inf."""


class NonFiniteLoss(TrainingDiverged):
    """The step's loss or gradient is NaN or Inf (nothing was updated); ``values`` says which."""

    def __init__(self, values: str):
        super().__init__(f"not finite: {values}")
        self.values = values


class Interrupted(Exception):
    """The run was stopped by a signal; the exit status is 128 + the signal number."""

    def __init__(self, signum: int, message: str | None = None):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class NothingToDo(Exception):
    """The run asked for is already complete (a requeued job after its end): exit 0."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """``Type: first non-empty line of the message`` (just ``Type`` for an empty message),
    cut to ``limit`` characters of message when given."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text[:limit]}" if text else type(err).__name__
