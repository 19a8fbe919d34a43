"""The one JoEm Trainer: the training loop (epochs of steps, per-epoch seeding, validation)."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from base.base_trainer import BaseTrainer, TrainingDiverged
from trainer.checkpointing import restore_training, training_checkpoint
from trainer.evaluate import validate
from trainer.parallel import gradient_average, training_forward
from trainer.reporting import Reporter
from trainer.settings import RunSettings
from trainer.step import NonFiniteLoss, train_step
from utils.amp import amp_dtype
from utils.checkpoint import save_checkpoint
from utils.distributed import DistContext, all_reduce_sum
from utils.logger import progress_enabled

logger = logging.getLogger("joem")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class Trainer(BaseTrainer):
    """CE + BAR + alpha * SC training of both encoders, with validation and checkpoints.

    Args:
        config: the ConfigParser; settings: its checked sections; ctx: process/device;
        model / semantic_encoder: the encoders (on ``ctx.device``); split: the ClassSplit;
        embeddings: class embeddings (num_classes x D); train_loader / val_loader;
        optimizer, optimizer_gen, scheduler (+ its ``interval``); reporter: where results go.
    """

    def __init__(self, config, settings: RunSettings, ctx: DistContext, model: nn.Module,
                 semantic_encoder: nn.Module, split, embeddings: torch.Tensor, train_loader, val_loader,
                 optimizer, optimizer_gen, scheduler, interval: str, reporter: Reporter):
        super().__init__(settings.trainer, config.run_dir, ctx.is_main)
        self.config, self.settings, self.ctx, self.split = config, settings, ctx, split
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
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype(settings.trainer.amp) == torch.float16)
        self.global_step = 0
        self.best_sigma: float | None = None   # the best sigma of the last validation (sweeps)

    def _train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        try:
            losses = train_step(self.forward, self.semantic_encoder, self.optimizer, self.optimizer_gen,
                                self.scaler, images, labels, self.embeddings, self.seen_object, self.settings.step,
                                self.after_backward)
        except NonFiniteLoss as err:
            raise TrainingDiverged(f"loss is not finite at epoch {self.epoch}, step {self.global_step} "
                                   f"({err.values}); training stopped, the last good checkpoint in "
                                   f"{self.run_dir} is kept") from None
        if self.scheduler is not None and self.interval == "step":
            self.scheduler.step()
        return losses

    def _begin_epoch(self, epoch: int) -> None:
        """Per-epoch seeding: the same epoch sees the same data order, augmentation and dropout
        whether the run was resumed or not."""
        seed = self.settings.seed
        seed_everything(seed * 100003 + epoch * 1009 + self.ctx.rank)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:
            generator.manual_seed(seed * 100003 + epoch)

    def _train_epoch(self, epoch: int) -> dict:
        self._begin_epoch(epoch)
        self.model.train()
        self.semantic_encoder.train()
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        start = time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.epochs}", leave=False,
                   disable=not (self.is_main and progress_enabled()))
        for batch in bar:
            losses = self._train_step(batch)
            steps += 1
            self.global_step += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value
            self.reporter.training_step(self.global_step, losses)
            if steps % 10 == 0:
                bar.set_postfix(loss=f"{float(losses['total']):.3f}")
        if steps == 0:
            raise TrainingDiverged("the training loader yielded no batch: the training set is smaller than "
                                   "one batch (lower data_loader.batch_size or check the split)")
        means = {f"loss_{k}": float(all_reduce_sum(v.clone()) / (steps * self.ctx.world_size))
                 for k, v in sums.items()}
        lrs = self._learning_rates()
        if self.scheduler is not None and self.interval == "epoch":
            self.scheduler.step()
        self.reporter.epoch(epoch, self.epochs, means, lrs, time.perf_counter() - start, steps)
        log = dict(means)
        if self.val_loader is not None and (epoch % self.settings.trainer.val_period == 0 or epoch == self.epochs):
            log.update(self.validate(epoch, "val"))
        return log

    def _learning_rates(self) -> dict[str, float]:
        rates = {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}
        rates["semantic"] = self.optimizer_gen.param_groups[0]["lr"]
        return rates

    def validate(self, epoch: int, split_name: str) -> dict:
        """Evaluate the current weights on the validation loader and report (see
        :func:`trainer.evaluate.validate`); the encoders return to training mode."""
        trainer = self.settings.trainer
        record = validate(self.model, self.semantic_encoder, self.val_loader, self.split, self.embeddings,
                          self.settings.inference, self.reporter, epoch=epoch, split_name=split_name,
                          device=self.device, amp=trainer.amp, channels_last=trainer.channels_last,
                          keep_samples=trainer.tensorboard_images if self.reporter.wants_images else 0,
                          save_predictions=split_name == "test" and self.settings.inference.save_predictions)
        self.best_sigma = record.get("best_sigma", self.best_sigma)
        self.model.train()
        self.semantic_encoder.train()
        return record

    def _save_checkpoint(self, path: Path, epoch: int) -> None:
        save_checkpoint(path, **training_checkpoint(self, epoch))
        logger.debug("saved %s", path)

    def resume(self, checkpoint: dict) -> None:
        """Continue from a full training checkpoint (weights already loaded)."""
        restore_training(self, checkpoint)
