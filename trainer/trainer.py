"""The one JoEm Trainer: the training loop (epochs of steps, per-epoch seeding, validation on the selection
split), its checkpoints and resume, its stops (a signal: a resumable checkpoint; divergence: nothing saved)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from base.base_trainer import BaseTrainer
from data_loader.loader import steps_per_epoch
from model.builder import load_encoder_weights
from trainer.assemble import RunParts
from trainer.evaluate import Validation, validate
from trainer.optim import build_optimizers, build_scheduler
from trainer.reporting import Reporter
from trainer.step import StepSettings, norms_finite, train_step
from utils.amp import amp_dtype
from utils.checkpoint import architecture, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from utils.distributed import (
    AgreedBatches,
    DistContext,
    agreed_signal,
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
)
from utils.errors import ConfigError, Interrupted, NonFiniteLoss, TrainingDiverged
from utils.logger import progress_enabled
from utils.run_dir import INTERRUPTED_NAME, checkpoint_files
from utils.seeding import epoch_seed, seed_everything
from utils.signals import StopSignals

logger = logging.getLogger("joem")
SELECTION, TEST = "selection", "test"   # the evaluations' split names (metrics.jsonl, TensorBoard)


class Trainer(BaseTrainer):
    """CE + BAR + alpha * SC training of both encoders of ``parts`` (a built run), checkpoints in ``run_dir``;
    ``stop``: the run's signal handlers (polled after every step and evaluation batch)."""

    def __init__(self, parts: RunParts, run_dir: Path, ctx: DistContext, reporter: Reporter,
                 stop: StopSignals | None = None):
        settings = parts.settings
        super().__init__(settings.trainer, run_dir, ctx.is_main)
        self.settings, self.ctx, self.split, self.device = settings, ctx, parts.bundle.split, ctx.device
        self.model, self.semantic_encoder = parts.model, parts.semantic_encoder
        self.encoders = {"visual_encoder": self.model, "semantic_encoder": self.semantic_encoder}
        self.step_settings = StepSettings.of(settings)
        self.forward = self.model   # what the training step calls (evaluation keeps calling the plain model)
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
        if settings.trainer.compile:
            self.forward = torch.compile(self.forward)
        self.after_backward = self._average_semantic_gradients if ctx.distributed else None
        self.embeddings = parts.bundle.embeddings.to(self.device)
        self.seen_object = torch.tensor(self.split.seen_object, device=self.device)
        self.train_loader, self.selection_loader, self.test_loader = (parts.train_loader, parts.selection_loader,
                                                                      parts.test_loader)
        self.optimizer, self.optimizer_gen = build_optimizers(settings, self.model, self.semantic_encoder)
        self.scheduler, self.interval = build_scheduler(settings, self.optimizer, self.train_loader)
        self.reporter = reporter
        self.validation = Validation(self.model, self.semantic_encoder, self.split, self.embeddings, settings,
                                     reporter, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype(settings.trainer.amp) == torch.float16)
        self.stop = stop or StopSignals()
        self.steps_per_epoch = steps_per_epoch(self.train_loader)
        self.global_step = 0
        self.best_sigma: float | None = None   # the best sigma of the last validation (sweeps)
        self.progress: dict | None = None      # where a resumed run stopped inside an epoch
        self.resume_rng: dict | None = None
        self.resumed_from: Path | None = None

    # --- the loop -------------------------------------------------------------------------------
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

    def _average_semantic_gradients(self) -> None:
        """Between backward and the optimizer steps: the semantic encoder (not DDP-wrapped) averaged."""
        for param in self.semantic_encoder.parameters():
            if param.grad is not None:
                all_reduce_sum(param.grad).div_(self.ctx.world_size)

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
        period = self.settings.trainer.val_period
        if self.selection_loader is not None and (epoch % period == 0 or epoch == self.epochs):
            try:
                log.update(self.validate(epoch, SELECTION))
            except Interrupted:
                self._interrupt(epoch, {"phase": "validate", "step": self.steps_per_epoch, "means": means})
        return log

    def _train_steps(self, epoch: int, progress: dict | None) -> dict[str, float]:
        """The epoch's training steps (from ``progress["step"]`` when resuming inside it); returns
        the mean losses and steps the epoch's LR schedule."""
        start_step = progress["step"] if progress else 0
        # per-epoch seeding: an epoch sees the same data order, augmentation and dropout, resumed or not
        seed = epoch_seed(self.settings.seed, epoch, self.ctx.rank)
        seed_everything(seed)
        if self.train_loader.generator is not None:   # the loader's own draws (worker seeds)
            self.train_loader.generator.manual_seed(seed)
        # the position counts the samples of every process (an epoch resumed with another number continues there)
        self.train_loader.sampler.set_epoch(epoch, start_step * self.train_loader.batch_size * self.ctx.world_size)
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
        lrs = {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}
        lrs["semantic"] = self.optimizer_gen.param_groups[0]["lr"]
        if self.scheduler is not None and self.interval == "epoch":
            self.scheduler.step()
        self.reporter.epoch(epoch, self.epochs, means, lrs, time.perf_counter() - start, steps - start_step)
        return means

    def _epoch_done(self, epoch: int) -> None:
        if self._stop_requested():
            self._interrupt(epoch, None)

    def validate(self, epoch: int, split_name: str) -> dict:
        """Evaluate and report the current weights on the selection split (``"test"``: the reported one)."""
        loader, stop = (self.test_loader if split_name == TEST else self.selection_loader), self.stop
        if self.ctx.distributed:   # the processes agree before every batch whether to stop
            loader, stop = AgreedBatches(loader, self.stop, self.device), None
        record = validate(self.validation, loader, epoch=epoch, split_name=split_name, stop=stop,
                          chosen_sigma=self.best_sigma)
        self.best_sigma = record.get("best_sigma", self.best_sigma)
        self.model.train()
        self.semantic_encoder.train()
        return record

    def test(self) -> dict:
        """The final test on the reported split: the checkpoint chosen on the selection split (this
        run's, or the resumed run's when this one saved none), else the final weights."""
        best = self.best_path
        if self.ctx.distributed:
            torch.distributed.barrier()
            best = broadcast_object(best)
        epoch = self.completed_epoch
        if best is not None and best.is_file():
            checkpoint = load_checkpoint(best)
            load_encoder_weights(self.model, self.semantic_encoder, checkpoint, best)
            epoch, self.best_sigma = int(checkpoint["epoch"]), checkpoint.get("best_sigma")
            logger.info("final test with %s (epoch %d, chosen on the selection split)", best, epoch)
        else:
            logger.info("final test with the weights of epoch %d (no checkpoint selection)", epoch)
        return self.validate(epoch, TEST)

    # --- stops ------------------------------------------------------------------------------------
    def _interrupt(self, epoch: int, progress: dict | None) -> None:
        """Save ``checkpoint-interrupted.pth`` (the position inside ``epoch``, or its end when ``progress``
        is None) and raise :class:`Interrupted` on every process once the file is written."""
        if progress is not None:
            progress = {"epoch": epoch, "steps_per_epoch": self.steps_per_epoch, **progress}
        path = self.run_dir / INTERRUPTED_NAME
        ranks = all_gather_object(self._rank_state((progress or {}).get("sums")))
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
        raise Interrupted(self.stop.signum or 2, f"stopped at {_position(progress, epoch)}: saved {path}; resume "
                                                 f"with -r {self.run_dir}")

    def _last_good(self) -> str:
        """The newest checkpoint on disk (every saved checkpoint has finite weights), for messages."""
        newest = next(iter(checkpoint_files(self.run_dir)), self.resumed_from)
        if newest is None:
            return "no checkpoint was written yet (nothing to resume from)"
        return f"the last good checkpoint is {newest}"

    # --- checkpoints --------------------------------------------------------------------------------
    def _rank_state(self, sums: dict | None = None) -> dict:
        """What differs between the processes: RNG states (dropout), the epoch's loss sums so far and the
        encoders' buffers (batch-norm statistics are per process on CPU; validation uses them)."""
        return {"rng": rng_state(), "sums": dict(sums or {}),
                "buffers": {part: {name: buffer.detach().cpu() for name, buffer in module.named_buffers()}
                            for part, module in self.encoders.items()}}

    def _save_checkpoint(self, path: Path, epoch: int, progress: dict | None = None, ranks: list | None = None) -> None:
        """Write a checkpoint (never one whose weights are not finite): the training state after ``epoch``
        (``progress``: where in an unfinished epoch the run stopped; ``ranks``: every process's own state),
        config, class split and embeddings. It supersedes (removes) the interrupted checkpoint."""
        if not norms_finite([*self.model.parameters(), *self.semantic_encoder.parameters()]):
            raise TrainingDiverged(f"the weights are not finite after epoch {self.epoch}, step {self.global_step}: "
                                   f"{path.name} was not written; {self._last_good()}")
        save_checkpoint(
            path, epoch=epoch, progress=progress, world_size=self.ctx.world_size, ranks=ranks,
            **{part: module.state_dict() for part, module in self.encoders.items()},
            optimizer=self.optimizer.state_dict(), optimizer_gen=self.optimizer_gen.state_dict(),
            lr_scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            scaler=self.scaler.state_dict(), monitor_best=self.mnt_best, not_improved=self.not_improved,
            global_step=self.global_step, best_sigma=self.best_sigma,
            best_checkpoint=str(self.best_path) if self.best_path is not None else None,
            config=json.loads(json.dumps(self.settings.config)), class_split=self.split.to_dict(),
            embeddings=self.embeddings.detach().cpu(), architecture=architecture(self.settings),
            precision=self.settings.precision)
        logger.debug("saved %s", path)
        if path.name == INTERRUPTED_NAME:
            return
        interrupted = self.run_dir / INTERRUPTED_NAME
        try:
            interrupted.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            logger.warning("could not remove %s (superseded by %s): %s", interrupted, path.name, err.strerror or err)
        else:
            logger.info("removed %s (superseded by %s)", interrupted, path.name)

    def resume(self, checkpoint: dict, path: Path, changes: dict | None = None) -> None:
        """Continue from the training checkpoint of ``path`` (its weights already loaded): optimizers, LR
        schedule, scaler, position, best metric, RNG; then the config ``changes`` to the optimizers."""
        self.resumed_from = Path(path)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.optimizer_gen.load_state_dict(checkpoint["optimizer_gen"])
        if self.scheduler is not None and checkpoint.get("lr_scheduler") is not None:
            old_total = self.scheduler.load_state_dict(checkpoint["lr_scheduler"])
            if old_total is not None:
                logger.info("schedule length changed from %d to %d: poly LR recomputed", old_total,
                            self.scheduler.total)
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self._apply_optimizer_changes(changes or {})
        self.completed_epoch = int(checkpoint["epoch"])
        progress = checkpoint.get("progress")
        if progress is not None and progress.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            raise ConfigError(f"the interrupted epoch had {progress['steps_per_epoch']} steps, this run has "
                              f"{self.steps_per_epoch} (dataset or batch size changed): resume from an epoch "
                              "checkpoint instead")
        self.start_epoch = int(progress["epoch"]) if progress else self.completed_epoch + 1
        self.mnt_best = float(checkpoint.get("monitor_best", self.mnt_best))
        self.not_improved = int(checkpoint.get("not_improved", 0))
        self.best_sigma = checkpoint.get("best_sigma")
        best = checkpoint.get("best_checkpoint")   # the best checkpoint so far may live in the resumed run
        self.best_path = Path(best) if best and Path(best).is_file() else None
        self.global_step = int(checkpoint.get("global_step", 0))
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])
            self.resume_rng = checkpoint["rng"]
        self.progress = self._restore_rank(checkpoint, progress)
        logger.info("resumed at %s (best %s = %s)", _position(progress, checkpoint["epoch"]), self.mnt_metric,
                    self.mnt_best)

    def _apply_optimizer_changes(self, changes: dict) -> None:
        """Config changes of the optimizers' arguments on top of their restored state."""
        settings = self.settings
        if any(key.startswith("optimizer.") for key in changes):
            fresh = self.model.param_groups(settings.optimizer.lr, settings.optimizer.head_lr_mult)
            for group, new in zip(self.optimizer.param_groups, fresh):
                group.update({k: v for k, v in settings.optimizer.args.items() if k in group and k != "lr"})
                group["initial_lr"] = group["lr"] = new["lr"]
            if self.scheduler is not None:
                self.scheduler.scheduler.base_lrs = [group["lr"] for group in fresh]
                self.scheduler.rebase()
        if any(key.startswith("optimizer_gen.") for key in changes):
            for group in self.optimizer_gen.param_groups:
                group.update({k: v for k, v in settings.optimizer_gen.args.items() if k in group})

    def _restore_rank(self, checkpoint: dict, progress: dict | None) -> dict | None:
        """This process's own state from the checkpoint (exact with the same number of processes; with
        another, from the same sample position, not bit-exact). Returns the progress to continue from."""
        ranks, world = checkpoint.get("ranks"), self.ctx.world_size
        saved_world = int(checkpoint.get("world_size") or (len(ranks) if ranks else world))
        if saved_world == world:
            if ranks:
                mine = ranks[self.ctx.rank]
                self.resume_rng = mine["rng"]
                for part, module in self.encoders.items():
                    for name, value in mine["buffers"][part].items():
                        module.get_buffer(name).copy_(value)
                if progress is not None:
                    progress = {**progress, "sums": mine["sums"]}
            return progress
        self.resume_rng = None   # each process's streams start from the epoch's seeds
        where = f"the start of epoch {self.start_epoch}"
        if progress is not None:
            position = progress["step"] * self.train_loader.batch_size * world
            where = f"sample {position} of epoch {progress['epoch']} (step {progress['step']})"
            if ranks and progress["phase"] == "train":   # each new process carries an equal share of the sums
                keys = ranks[0]["sums"]
                progress = {**progress, "sums": {k: sum(r["sums"][k] for r in ranks) / len(ranks) for k in keys}}
        logger.warning("resuming with %d process(es) a run saved with %d: it continues from %s, but is not bit-exact "
                       "with an uninterrupted run (the batches are split over the processes differently)",
                       world, saved_world, where)
        return progress


def _position(progress: dict | None, epoch: int) -> str:
    """Where a run stopped (or resumes): the end of ``epoch``, a step of an epoch or its validation."""
    if progress is None:
        return f"the end of epoch {epoch}"
    if progress["phase"] == "validate":
        return f"epoch {progress['epoch']}'s validation (it reruns on resume)"
    return f"epoch {progress['epoch']}, step {progress['step']}/{progress['steps_per_epoch']}"
