"""The one JoEm Trainer: the training loop (epochs of steps, per-epoch seeding, validation), its
stops (a signal: a resumable checkpoint at the next safe point; divergence: nothing saved)."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from base.base_trainer import BaseTrainer
from data_loader.loader import steps_per_epoch
from trainer.checkpointing import (discard_interrupted, rank_state, restore_training,
                                  training_checkpoint)
from trainer.evaluate import Validation, validate
from trainer.parallel import gradient_average, training_forward
from trainer.reporting import Reporter
from trainer.resume import checkpoint_files
from trainer.step import StepSettings, norms_finite, train_step
from utils.amp import amp_dtype
from utils.checkpoint import save_checkpoint, set_rng_state
from utils.distributed import (AgreedBatches, DistContext, agreed_signal, all_gather_object, all_reduce_sum,
                               broadcast_object)
from utils.errors import ConfigError, Interrupted, NonFiniteLoss, TrainingDiverged
from utils.logger import progress_enabled
from utils.run_dir import INTERRUPTED_NAME
from utils.settings import Settings
from utils.signals import StopSignals

logger = logging.getLogger("joem")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Trainer(BaseTrainer):
    """CE + BAR + alpha * SC training of both encoders, with validation and checkpoints.

    Args:
        settings: the run's checked settings (precision resolved); run_dir: its folder; ctx: process/device;
        model / semantic_encoder: the encoders (on ``ctx.device``); split: the ClassSplit;
        embeddings: class embeddings (num_classes x D); train_loader / val_loader;
        optimizer, optimizer_gen, scheduler (+ its ``interval``); reporter: where results go;
        stop: the run's signal handlers (polled after every step and evaluation batch).
    """

    def __init__(self, settings: Settings, run_dir: Path, ctx: DistContext, model: nn.Module,
                 semantic_encoder: nn.Module, split, embeddings: torch.Tensor, train_loader, val_loader,
                 optimizer, optimizer_gen, scheduler, interval: str, reporter: Reporter,
                 stop: StopSignals | None = None):
        super().__init__(settings.trainer, run_dir, ctx.is_main)
        self.settings, self.ctx, self.split = settings, ctx, split
        self.step_settings = StepSettings.of(settings)
        self.device = ctx.device
        self.model, self.semantic_encoder = model, semantic_encoder
        self.forward = training_forward(model, ctx, settings.trainer.compile)
        self.after_backward = gradient_average(semantic_encoder, ctx)
        self.embeddings = embeddings.to(self.device)
        self.seen_object = torch.tensor(split.seen_object, device=self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.optimizer, self.optimizer_gen = optimizer, optimizer_gen
        self.scheduler, self.interval = scheduler, interval
        self.reporter = reporter
        self.validation = Validation(model, semantic_encoder, split, self.embeddings, settings, reporter, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype(settings.trainer.amp) == torch.float16)
        self.stop = stop or StopSignals()
        self.steps_per_epoch = steps_per_epoch(train_loader)
        self.global_step = 0
        self.best_sigma: float | None = None   # the best sigma of the last validation (sweeps)
        self.progress: dict | None = None      # where a resumed run stopped inside an epoch
        self.resume_rng: dict | None = None
        self.resumed_from: Path | None = None

    def _train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        try:
            losses = train_step(self.forward, self.semantic_encoder, self.optimizer, self.optimizer_gen,
                                self.scaler, images, labels, self.embeddings, self.seen_object, self.step_settings,
                                self.after_backward)
        except NonFiniteLoss as err:
            raise TrainingDiverged(f"{err.values} is not finite at epoch {self.epoch} (step {self.global_step + 1} of "
                                   f"the run): training stopped before the optimizer step; {self._last_good()}"
                                   ) from None
        if self.scheduler is not None and self.interval == "step":
            self.scheduler.step()
        return losses

    def _begin_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Per-epoch seeding: the same epoch sees the same data order, augmentation and dropout
        whether the run was resumed or not; a resumed epoch starts at ``start_step``."""
        seed_everything(self.settings.seed * 100003 + epoch * 1009 + self.ctx.rank)
        if self.train_loader.generator is not None:   # the loader's own draws (worker seeds)
            self.train_loader.generator.manual_seed(self.settings.seed * 100003 + epoch * 1009 + self.ctx.rank)
        # the position counts the samples of every process (an epoch resumed with another number continues there)
        self.train_loader.sampler.set_epoch(epoch, start_step * self.train_loader.batch_size * self.ctx.world_size)

    def _stop_requested(self) -> bool:
        """Whether a signal asks the run to stop (every process agrees on the same step and signal)."""
        return bool(agreed_signal(self.stop, self.device)) if self.ctx.distributed else self.stop.requested

    def _train_epoch(self, epoch: int) -> dict:
        progress, self.progress = (self.progress if self.progress and self.progress["epoch"] == epoch else None), None
        if progress is not None and progress["phase"] == "validate":
            means = progress["means"]        # the steps and the epoch's LR step are done
        else:
            means = self._train_steps(epoch, progress)
        log = dict(means)
        if self.val_loader is not None and (epoch % self.settings.trainer.val_period == 0 or epoch == self.epochs):
            try:
                log.update(self.validate(epoch, "val"))
            except Interrupted:
                self._interrupt(epoch, {"phase": "validate", "step": self.steps_per_epoch, "means": means})
        return log

    def _train_steps(self, epoch: int, progress: dict | None) -> dict[str, float]:
        """The epoch's training steps (from ``progress["step"]`` when resuming inside it); returns
        the mean losses and steps the epoch's LR schedule."""
        start_step = progress["step"] if progress else 0
        self._begin_epoch(epoch, start_step)
        if progress is not None and self.resume_rng is not None:
            set_rng_state(self.resume_rng)   # dropout continues exactly where it stopped
        self.model.train()
        self.semantic_encoder.train()
        sums = {k: torch.tensor(v, device=self.device) for k, v in (progress or {}).get("sums", {}).items()}
        steps = start_step
        start = time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.epochs}", leave=False, initial=start_step,
                   total=self.steps_per_epoch, disable=not (self.is_main and progress_enabled()))
        for batch in bar:
            losses = self._train_step(batch)
            steps += 1
            self.global_step += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value
            self.reporter.training_step(self.global_step, losses)
            if steps % 10 == 0:
                bar.set_postfix(loss=f"{float(losses['total']):.3f}")
            if self._stop_requested():
                self._interrupt(epoch, {"phase": "train", "step": steps,
                                        "sums": {k: float(v) for k, v in sums.items()}})
        if steps == 0:
            raise TrainingDiverged("the training loader yielded no batch: the training set is smaller than "
                                   "one batch (lower data_loader.batch_size or check the split)")
        means = {f"loss_{k}": float(all_reduce_sum(v.clone()) / (steps * self.ctx.world_size))
                 for k, v in sums.items()}
        lrs = self._learning_rates()
        if self.scheduler is not None and self.interval == "epoch":
            self.scheduler.step()
        self.reporter.epoch(epoch, self.epochs, means, lrs, time.perf_counter() - start, steps - start_step)
        return means

    def _epoch_done(self, epoch: int) -> None:
        if self._stop_requested():
            self._interrupt(epoch, None)

    def _interrupt(self, epoch: int, progress: dict | None) -> None:
        """Save ``checkpoint-interrupted.pth`` (the position inside ``epoch``, or its end when
        ``progress`` is None; every process's own state in it) and stop with :class:`Interrupted`
        (on every process once the file is written)."""
        if progress is not None:
            progress = {"epoch": epoch, "steps_per_epoch": self.steps_per_epoch, **progress}
        path = self.run_dir / INTERRUPTED_NAME
        ranks = all_gather_object(rank_state(self, (progress or {}).get("sums")))
        failure = None
        if self.is_main:
            try:
                self._save_checkpoint(path, self.completed_epoch, progress, ranks)
            except Exception as err:
                failure = err
        if self.ctx.distributed:   # no process ends before the file is written (a launcher would kill the writer)
            message = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
            if message is not None and failure is None:
                raise ConfigError(f"the interrupted checkpoint was not written by process 0 ({message})")
        if failure is not None:
            raise failure
        if progress is None:
            where = f"the end of epoch {epoch}"
        elif progress["phase"] == "validate":
            where = f"epoch {epoch}'s validation (it reruns on resume)"
        else:
            where = f"epoch {epoch}, step {progress['step']}/{self.steps_per_epoch}"
        raise Interrupted(self.stop.signum or 2, f"stopped at {where}: saved {path}; resume with -r {self.run_dir}")

    def _last_good(self) -> str:
        """The newest checkpoint on disk (every saved checkpoint has finite weights), for messages."""
        files = checkpoint_files(self.run_dir) if self.run_dir.is_dir() else []
        newest = files[0] if files else self.resumed_from
        if newest is None:
            return "no checkpoint was written yet (nothing to resume from)"
        return f"the last good checkpoint is {newest}"

    def _learning_rates(self) -> dict[str, float]:
        rates = {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}
        rates["semantic"] = self.optimizer_gen.param_groups[0]["lr"]
        return rates

    def validate(self, epoch: int, split_name: str) -> dict:
        """Evaluate the current weights on the validation loader and report (see
        :func:`trainer.evaluate.validate`); the encoders return to training mode."""
        loader, stop = self.val_loader, self.stop
        if self.ctx.distributed:   # the processes agree before every batch whether to stop
            loader, stop = AgreedBatches(self.val_loader, self.stop, self.device), None
        record = validate(self.validation, loader, epoch=epoch, split_name=split_name, stop=stop)
        self.best_sigma = record.get("best_sigma", self.best_sigma)
        self.model.train()
        self.semantic_encoder.train()
        return record

    def _save_checkpoint(self, path: Path, epoch: int, progress: dict | None = None, ranks: list | None = None) -> None:
        """Write a checkpoint, never one whose weights are not finite (or overflow float32); a
        newer one supersedes (removes) an interrupted checkpoint this run resumed from."""
        if not norms_finite([*self.model.parameters(), *self.semantic_encoder.parameters()]):
            raise TrainingDiverged(f"the weights are not finite after epoch {self.epoch}, step {self.global_step}: "
                                   f"{path.name} was not written; {self._last_good()}")
        save_checkpoint(path, **training_checkpoint(self, epoch, progress, ranks))
        logger.debug("saved %s", path)
        if path.name != INTERRUPTED_NAME:
            discard_interrupted(self.run_dir, path)

    def resume(self, checkpoint: dict, path: Path, changes: dict | None = None) -> None:
        """Continue from a full training checkpoint (weights already loaded) read from ``path``."""
        restore_training(self, checkpoint, changes)
        self.resumed_from = Path(path)
