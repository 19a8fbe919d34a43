"""pytorch-template's BaseTrainer: the epoch loop, monitoring, early stop and checkpoints (every
``save_period`` epochs and always after the last one, so the final weights are on disk)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from utils.run_dir import BEST_NAME, epoch_checkpoint_name

logger = logging.getLogger("joem")


class BaseTrainer:
    """Runs ``_train_epoch`` for each epoch, tracks the monitored metric, saves checkpoints.

    ``settings``: the ``trainer`` section (``epochs``, ``save_period``, ``monitor``, ``early_stop``).
    Subclasses implement ``_train_epoch(epoch) -> dict`` (with the monitored key when the epoch was
    evaluated) and ``_save_checkpoint(path, epoch)``, and may override ``_epoch_done(epoch)``.
    """

    def __init__(self, settings, run_dir: Path, is_main: bool = True):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.epochs = settings.epochs
        self.save_period = settings.save_period
        if settings.monitor == "off":
            self.mnt_mode, self.mnt_metric = "off", None
        else:
            self.mnt_mode, self.mnt_metric = settings.monitor.split()
        self.mnt_best = -math.inf if self.mnt_mode == "max" else math.inf
        self.early_stop = settings.early_stop
        self.not_improved = 0
        self.start_epoch = 1
        self.epoch = 0
        self.completed_epoch = 0
        self.best_path: Path | None = None

    def _epoch_done(self, epoch: int) -> None:
        """Called once an epoch and its checkpoints are done."""

    def _improved(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return False
        return value > self.mnt_best if self.mnt_mode == "max" else value < self.mnt_best

    def train(self) -> None:
        """The full training loop (from ``start_epoch``)."""
        for epoch in range(self.start_epoch, self.epochs + 1):
            self.epoch = epoch
            log = self._train_epoch(epoch)
            self.completed_epoch = epoch
            if self.mnt_mode != "off" and self.mnt_metric in log:
                if self._improved(log[self.mnt_metric]):
                    self.mnt_best, self.not_improved, self.best_path = log[self.mnt_metric], 0, self.run_dir / BEST_NAME
                    if self.is_main:
                        self._save_checkpoint(self.best_path, epoch)
                        logger.info("saved %s (%s = %.2f)", BEST_NAME, self.mnt_metric, self.mnt_best)
                else:
                    self.not_improved += 1
            stopping = bool(self.early_stop) and self.not_improved >= self.early_stop
            if self.is_main and (epoch % self.save_period == 0 or epoch == self.epochs or stopping):
                self._save_checkpoint(self.run_dir / epoch_checkpoint_name(epoch), epoch)   # the final weights too
            if stopping:
                logger.info("%s did not improve for %d evaluations: early stop", self.mnt_metric, self.not_improved)
                break
            self._epoch_done(epoch)
