"""The one JoEm Trainer used for every dataset."""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from base.base_trainer import BaseTrainer, TrainingDiverged
from model.inference import CALIBRATIONS
from trainer.step import NonFiniteLoss, StepSettings, train_step
from trainer.evaluate import (AUSUC_GRID, evaluate, format_class_table, format_metrics_table,
                              metrics_record)
from utils.amp import amp_dtype
from utils.checkpoint import architecture, save_checkpoint, set_rng_state
from utils.distributed import DistContext, all_reduce_sum
from utils.logger import progress_enabled
from trainer.calibration import format_sweep_table, summarize, sigma_values, sweep_figure, write_sweep
from utils.util import ConfigError
from utils.visualization import colorize, denormalize

logger = logging.getLogger("joem")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def json_safe(value):
    """Replace NaN/Inf floats with None so the JSON is valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class Trainer(BaseTrainer):
    """CE + BAR + alpha * SC training of both encoders, calibrated evaluation, checkpoints.

    Args:
        config: the ConfigParser; ctx: process/device; model / semantic_encoder: the encoders
        (already on ``ctx.device``); split: the ClassSplit; embeddings: class embeddings
        (num_classes x D); train_loader / val_loader; optimizer, optimizer_gen, scheduler
        (+ its ``interval``); writer: a TensorBoard SummaryWriter or None.
    """

    def __init__(self, config, ctx: DistContext, model: nn.Module, semantic_encoder: nn.Module, split, embeddings,
                 train_loader, val_loader, optimizer, optimizer_gen, scheduler, interval: str, writer=None):
        super().__init__(config["trainer"], config.run_dir, ctx.is_main)
        self.config, self.ctx, self.split = config, ctx, split
        self.device = ctx.device
        self.model, self.semantic_encoder = model, semantic_encoder
        self.train_model = model
        if ctx.distributed:
            self.train_model = DistributedDataParallel(model, device_ids=[ctx.device.index]
                                                       if ctx.device.type == "cuda" else None)
        if config["trainer"].get("compile", False):  # the training forward only; evaluation stays eager
            self.train_model = torch.compile(self.train_model)
        self.embeddings = embeddings.to(self.device)
        self.seen_object = torch.tensor(split.seen_object, device=self.device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.optimizer, self.optimizer_gen = optimizer, optimizer_gen
        self.scheduler, self.interval = scheduler, interval
        self.writer = writer
        trainer_cfg = config["trainer"]
        self.step_settings = StepSettings.from_config(config)
        self.amp, self.channels_last = self.step_settings.amp, self.step_settings.channels_last
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype(self.amp) == torch.float16)
        self.val_period = int(trainer_cfg.get("val_period", 1))
        self.vis_images = int(trainer_cfg.get("tensorboard_images", 4))
        self.log_step = int(trainer_cfg.get("log_step", 50))
        self.seed = int(config.get("seed", 0))
        # inference.sigma: one value, or several (a sweep whose best harmonic mIoU is reported);
        # inference.sweep: extra sigmas evaluated in the same pass (recorded in metrics.jsonl).
        sigmas = sigma_values(config["inference"]["sigma"])
        if not sigmas:
            raise ConfigError("inference.sigma: missing")
        self.sigma = sigmas[0] if len(sigmas) == 1 else None
        extra = sigma_values(config["inference"].get("sweep"), "inference.sweep")
        self.sweep = sigmas if self.sigma is None else [s for s in extra if s != self.sigma]
        self.calibration = config["inference"].get("calibration", "top2")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"inference.calibration: {self.calibration!r}; valid: {', '.join(CALIBRATIONS)}")
        self.excluded = [0] if split.ignore_bg else []  # ignored background is never predicted
        self.eval_seen = [c for c in split.seen if c not in self.excluded]
        self.metrics_path = config.run_dir / "metrics.jsonl"
        self.global_step = 0

    # --- training ------------------------------------------------------------------
    def _train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        try:
            losses = train_step(self.train_model, self.semantic_encoder, self.optimizer, self.optimizer_gen,
                                self.scaler, images, labels, self.embeddings, self.seen_object, self.step_settings,
                                self._average_semantic_gradients if self.ctx.distributed else None)
        except NonFiniteLoss as err:
            raise TrainingDiverged(f"loss is not finite at epoch {self.epoch}, step {self.global_step} "
                                   f"({err.values}); training stopped, the last good checkpoint in "
                                   f"{self.run_dir} is kept") from None
        if self.scheduler is not None and self.interval == "step":
            self.scheduler.step()
        return losses

    def _average_semantic_gradients(self) -> None:
        """The semantic encoder is not DDP-wrapped: average its gradients over processes."""
        for param in self.semantic_encoder.parameters():
            if param.grad is not None:
                all_reduce_sum(param.grad).div_(self.ctx.world_size)

    def _begin_epoch(self, epoch: int) -> None:
        """Per-epoch seeding: the same epoch sees the same data order, augmentation and dropout
        whether the run was resumed or not."""
        seed_everything(self.seed * 100003 + epoch * 1009 + self.ctx.rank)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:
            generator.manual_seed(self.seed * 100003 + epoch)

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
            if self.writer is not None and self.global_step % self.log_step == 0:
                for key, value in losses.items():
                    self.writer.add_scalar(f"train/loss_{key}", float(value), self.global_step)
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
        elapsed = time.perf_counter() - start
        logger.info("epoch %d/%d  loss %.4f (ce %.4f, bar %.4f, sc %.4f)  lr %s  %.1fs (%.2f s/step)",
                    epoch, self.epochs, means["loss_total"], means["loss_ce"], means["loss_bar"], means["loss_sc"],
                    " ".join(f"{k}={v:.3g}" for k, v in lrs.items()), elapsed, elapsed / steps)
        if self.writer is not None:
            for key, value in {**means, **{f"lr_{k}": v for k, v in lrs.items()}}.items():
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        log = dict(means)
        if self.val_loader is not None and (epoch % self.val_period == 0 or epoch == self.epochs):
            log.update(self.validate(epoch, "val"))
        return log

    def _learning_rates(self) -> dict[str, float]:
        rates = {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}
        rates["semantic"] = self.optimizer_gen.param_groups[0]["lr"]
        return rates

    # --- evaluation -------------------------------------------------------------------
    def validate(self, epoch: int, split_name: str) -> dict:
        """Evaluate on the validation loader; log tables, TensorBoard and metrics.jsonl.
        Returns the headline record (percent values): at the configured sigma, or the best
        harmonic mIoU of a sweep given as ``inference.sigma``."""
        sigmas = ([self.sigma] if self.sigma is not None else []) + self.sweep
        result = evaluate(self.model, self.semantic_encoder, self.val_loader, self.embeddings, self.eval_seen,
                          self.split.unseen, sigmas, device=self.device, amp=self.amp,
                          channels_last=self.channels_last, extremes=bool(self.sweep), excluded=self.excluded,
                          calibration=self.calibration,
                          keep_samples=self.vis_images if self.writer is not None else 0, desc=split_name)
        records = [metrics_record(ev, self.split.names, s) for ev, s in zip(result.evaluators, result.sigmas)]
        summary = None
        if self.sweep:
            ends = {name: metrics_record(ev, self.split.names, float("nan")) for name, ev in result.extremes.items()}
            stacking = [metrics_record(ev, self.split.names, s) for ev, s in zip(result.stacking, AUSUC_GRID)]
            summary = summarize(records, ends, stacking, self.calibration)
        main = records[0] if self.sigma is not None else next(
            r for r in records if r["sigma"] == summary["best"]["sigma"])
        if summary is not None:
            main = {**main, "ausuc": summary["ausuc"], "best_sigma": summary["best"]["sigma"]}
        if self.is_main:
            self._report(epoch, split_name, main, records, summary, result.samples)
        self.model.train()
        self.semantic_encoder.train()
        return {k: v for k, v in main.items() if isinstance(v, float) or v is None}

    def _report(self, epoch: int, split_name: str, main: dict, records: list[dict], summary: dict | None,
                samples: list[dict]) -> None:
        """Console/file tables, metrics.jsonl, sweep files and TensorBoard for one evaluation."""
        logger.info("%s (epoch %d, sigma %g):\n%s", split_name, epoch, main["sigma"], format_metrics_table(main))
        logger.info("per-class IoU:\n%s", format_class_table(main, self.split.unseen_names))
        with self.metrics_path.open("a") as handle:
            for record in records:
                record = main if record["sigma"] == main["sigma"] else record
                handle.write(json.dumps(json_safe({"epoch": epoch, "split": split_name, **record})) + "\n")
        if summary is not None:
            logger.info("calibration sweep (%s, epoch %d):\n%s", split_name, epoch, format_sweep_table(summary))
            paths = write_sweep(self.run_dir, summary, f"sweep_{split_name}")
            logger.info("sweep written: %s", ", ".join(str(p) for p in paths))
        if self.writer is not None:
            for key, value in main.items():
                if isinstance(value, float):
                    self.writer.add_scalar(f"{split_name}/{key}", value, epoch)
            if summary is not None:
                self.writer.add_figure(f"{split_name}/seen_unseen_curve", sweep_figure(summary), epoch)
            self._log_images(samples, split_name, epoch)

    def _log_images(self, samples: list[dict], tag: str, epoch: int) -> None:
        for index, sample in enumerate(samples):
            panel = torch.cat([denormalize(sample["image"]), colorize(sample["label"]),
                               colorize(sample["pred"][0])], dim=2)
            self.writer.add_image(f"{tag}/image_truth_prediction_{index}", panel, epoch)

    # --- checkpoints ------------------------------------------------------------------
    def checkpoint_content(self, epoch: int) -> dict:
        return {"epoch": epoch, "visual_encoder": self.model.state_dict(),
                "semantic_encoder": self.semantic_encoder.state_dict(),
                "optimizer": self.optimizer.state_dict(), "optimizer_gen": self.optimizer_gen.state_dict(),
                "lr_scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "monitor_best": self.mnt_best, "global_step": self.global_step,
                "best_checkpoint": str(self.best_path) if self.best_path is not None else None,
                "config": json.loads(json.dumps(self.config.config)), "class_split": self.split.to_dict(),
                "embeddings": self.embeddings.detach().cpu(),
                "architecture": architecture(self.config.config)}

    def _save_checkpoint(self, path: Path, epoch: int) -> None:
        save_checkpoint(path, **self.checkpoint_content(epoch))
        logger.debug("saved %s", path)

    def _rebase_schedule(self, total_iters: int) -> None:
        """The run's length changed on resume (e.g. ``--epochs``): recompute the poly LR in
        closed form for the new length at the current position."""
        scheduler = self.scheduler
        logger.info("schedule length changed from %d to %d: poly LR recomputed", scheduler.total_iters, total_iters)
        scheduler.total_iters = total_iters
        factor = (1.0 - min(scheduler.last_epoch, total_iters) / total_iters) ** scheduler.power
        for group, base in zip(self.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * factor
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def resume(self, checkpoint: dict) -> None:
        """Continue from a full training checkpoint (already validated and loaded weights)."""
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.optimizer_gen.load_state_dict(checkpoint["optimizer_gen"])
        if self.scheduler is not None and checkpoint.get("lr_scheduler") is not None:
            expected_total = self.scheduler.total_iters
            self.scheduler.load_state_dict(checkpoint["lr_scheduler"])
            if self.scheduler.total_iters != expected_total:
                self._rebase_schedule(expected_total)
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch = int(checkpoint["epoch"]) + 1
        self.completed_epoch = int(checkpoint["epoch"])
        self.mnt_best = float(checkpoint.get("monitor_best", self.mnt_best))
        # the best checkpoint so far may live in the run that is resumed
        best = checkpoint.get("best_checkpoint")
        self.best_path = Path(best) if best and Path(best).is_file() else None
        self.global_step = int(checkpoint.get("global_step", 0))
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])
        logger.info("resumed from epoch %d (best %s = %s)", checkpoint["epoch"], self.mnt_metric, self.mnt_best)
