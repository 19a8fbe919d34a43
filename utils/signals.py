"""SIGINT and SIGTERM (what Ctrl-C, SLURM and Kubernetes send) end a run cleanly.

Outside a :meth:`StopSignals.deferred` section a signal stops the run at once (nothing to save).
Inside it, the signal is only recorded: the training loop polls :attr:`StopSignals.requested` at
its safe points, saves a resumable checkpoint and stops. Once the run has ended
(:meth:`StopSignals.end`) further signals are ignored, so they cannot change its exit status.
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

from utils.errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Handlers for SIGINT/SIGTERM, installed for the life of a ``with`` block; ``keep``: leave
    them installed after it, ignoring signals (a process that ends right after the block, whose
    exit status a late signal must not turn into a kill)."""

    def __init__(self, keep: bool = False) -> None:
        self.signum: int | None = None
        self.keep = keep
        self.ended = False
        self._deferring = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        for signum in HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.keep:
            self.end()
        else:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.ended:
            return
        first = self.signum is None
        self.signum = self.signum or signum
        if self._deferring:
            if first:
                os.write(2, f"{signal.Signals(signum).name} received: stopping at the next safe point "
                            "(a checkpoint to resume from will be written)\n".encode())
            return
        raise Interrupted(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def end(self) -> None:
        """The run is over (finished, or stopped with its checkpoint written): ignore later signals."""
        self.ended = True

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals only set :attr:`requested` inside this block (nested blocks allowed)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def check(self) -> None:
        """Raise :class:`Interrupted` when a signal arrived (outside the training loop's polling)."""
        if self.signum is not None and not self.ended:
            raise Interrupted(self.signum)
