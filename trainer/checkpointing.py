"""What a training checkpoint holds, and how a Trainer continues from one."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from trainer.optim import param_groups
from utils.checkpoint import architecture, rng_state, set_rng_state
from utils.errors import ConfigError
from utils.run_dir import INTERRUPTED_NAME

logger = logging.getLogger("joem")
_ENCODERS = {"visual_encoder": "model", "semantic_encoder": "semantic_encoder"}


def rank_state(trainer: Any, sums: dict | None = None) -> dict:
    """What differs between the processes of a run, for its own checkpoint entry: its RNG
    states (CPU and CUDA: dropout), the loss sums of the epoch so far, and its encoders' buffers
    (batch-norm statistics are per process on CPU; validation uses them)."""
    return {"rng": rng_state(), "sums": dict(sums or {}),
            "buffers": {part: {name: buffer.detach().cpu() for name, buffer in getattr(trainer, attr).named_buffers()}
                        for part, attr in _ENCODERS.items()}}


def discard_interrupted(run_dir: Path, newer: Path) -> None:
    """Remove ``run_dir``'s interrupted checkpoint once ``newer`` (written later in the run) supersedes it."""
    path = Path(run_dir) / INTERRUPTED_NAME
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as err:
        logger.warning("could not remove %s (superseded by %s): %s", path, newer.name, err.strerror or err)
        return
    logger.info("removed %s (superseded by %s)", path, newer.name)


def training_checkpoint(trainer: Any, epoch: int, progress: dict | None = None, ranks: list | None = None) -> dict:
    """``trainer`` (a :class:`trainer.trainer.Trainer`) as checkpoint content: both encoders, both
    optimizers, the LR schedule, the GradScaler, the last completed ``epoch``, the global step, the
    monitored best, config, class split and embeddings (RNG states are added when saving).
    ``progress``: where in an unfinished epoch the run stopped (phase, step, loss sums);
    ``ranks``: every process's :func:`rank_state` (an interrupted run), in rank order."""
    return {"epoch": epoch, "progress": progress, "world_size": trainer.ctx.world_size, "ranks": ranks,
            "visual_encoder": trainer.model.state_dict(),
            "semantic_encoder": trainer.semantic_encoder.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "optimizer_gen": trainer.optimizer_gen.state_dict(),
            "lr_scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
            "scaler": trainer.scaler.state_dict(), "monitor_best": trainer.mnt_best,
            "not_improved": trainer.not_improved, "global_step": trainer.global_step, "best_sigma": trainer.best_sigma,
            "best_checkpoint": str(trainer.best_path) if trainer.best_path is not None else None,
            "config": json.loads(json.dumps(trainer.settings.config)), "class_split": trainer.split.to_dict(),
            "embeddings": trainer.embeddings.detach().cpu(), "architecture": architecture(trainer.settings),
            "precision": trainer.settings.precision}


def _apply_optimizer_settings(trainer: Any, changes: dict) -> None:
    """Config changes of the optimizers' arguments on top of their restored state."""
    settings = trainer.settings
    if any(key.startswith("optimizer.") for key in changes):
        args = settings.optimizer.args
        fresh = param_groups(trainer.model, settings.optimizer)
        for group, new in zip(trainer.optimizer.param_groups, fresh):
            group.update({k: v for k, v in args.items() if k in group and k != "lr"})
            group["initial_lr"] = group["lr"] = new["lr"]
        if trainer.scheduler is not None:
            trainer.scheduler.scheduler.base_lrs = [group["lr"] for group in fresh]
            trainer.scheduler.rebase()
    if any(key.startswith("optimizer_gen.") for key in changes):
        args = settings.optimizer_gen.args
        for group in trainer.optimizer_gen.param_groups:
            group.update({k: v for k, v in args.items() if k in group})


def restore_training(trainer: Any, checkpoint: dict, changes: dict | None = None) -> None:
    """Continue from a full training checkpoint whose weights are already loaded: optimizers,
    LR schedule (re-based when the run's length changed), scaler, position (epoch, or the step of
    an interrupted epoch), best metric, RNG; then the config ``changes`` to the optimizers."""
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])
    trainer.optimizer_gen.load_state_dict(checkpoint["optimizer_gen"])
    if trainer.scheduler is not None and checkpoint.get("lr_scheduler") is not None:
        old_total = trainer.scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if old_total is not None:
            logger.info("schedule length changed from %d to %d: poly LR recomputed", old_total, trainer.scheduler.total)
    if checkpoint.get("scaler"):
        trainer.scaler.load_state_dict(checkpoint["scaler"])
    _apply_optimizer_settings(trainer, changes or {})
    trainer.completed_epoch = int(checkpoint["epoch"])
    progress = checkpoint.get("progress")
    if progress is not None and progress.get("steps_per_epoch") not in (None, trainer.steps_per_epoch):
        raise ConfigError(f"the interrupted epoch had {progress['steps_per_epoch']} steps, this run has "
                          f"{trainer.steps_per_epoch} (dataset or batch size changed): resume from an epoch "
                          "checkpoint instead")
    trainer.progress = progress
    trainer.start_epoch = int(progress["epoch"]) if progress else trainer.completed_epoch + 1
    trainer.mnt_best = float(checkpoint.get("monitor_best", trainer.mnt_best))
    trainer.not_improved = int(checkpoint.get("not_improved", 0))
    trainer.best_sigma = checkpoint.get("best_sigma")
    best = checkpoint.get("best_checkpoint")   # the best checkpoint so far may live in the resumed run
    trainer.best_path = Path(best) if best and Path(best).is_file() else None
    trainer.global_step = int(checkpoint.get("global_step", 0))
    if "rng" in checkpoint:
        set_rng_state(checkpoint["rng"])
        trainer.resume_rng = checkpoint["rng"]
    trainer.progress = _restore_rank(trainer, checkpoint, progress)
    where = (f"epoch {progress['epoch']}, step {progress['step']}/{progress['steps_per_epoch']}"
             f"{' (validation)' if progress['phase'] == 'validate' else ''}" if progress
             else f"the end of epoch {checkpoint['epoch']}")
    logger.info("resumed at %s (best %s = %s)", where, trainer.mnt_metric, trainer.mnt_best)


def _restore_rank(trainer: Any, checkpoint: dict, progress: dict | None) -> dict | None:
    """This process's own state from the checkpoint's per-process entries (same number of
    processes: exact); with another number of processes, the run continues from the same sample
    position, with a warning that it is not bit-exact. Returns the progress to continue from."""
    ranks, world = checkpoint.get("ranks"), trainer.ctx.world_size
    saved_world = int(checkpoint.get("world_size") or (len(ranks) if ranks else world))
    if saved_world == world:
        if ranks:
            mine = ranks[trainer.ctx.rank]
            trainer.resume_rng = mine["rng"]
            for part, attr in _ENCODERS.items():
                module = getattr(trainer, attr)
                for name, value in mine["buffers"][part].items():
                    module.get_buffer(name).copy_(value)
            if progress is not None:
                progress = {**progress, "sums": mine["sums"]}
        return progress
    trainer.resume_rng = None   # each process's streams start from the epoch's seeds
    where = f"the start of epoch {trainer.start_epoch}"
    if progress is not None:
        position = progress["step"] * trainer.train_loader.batch_size * world
        where = f"sample {position} of epoch {progress['epoch']} (step {progress['step']})"
        if ranks and progress["phase"] == "train":   # each new process carries an equal share of the sums
            keys = ranks[0]["sums"]
            progress = {**progress, "sums": {k: sum(r["sums"][k] for r in ranks) / len(ranks) for k in keys}}
    logger.warning("resuming with %d process(es) a run saved with %d: it continues from %s, but is not bit-exact "
                   "with an uninterrupted run (the batches are split over the processes differently)",
                   world, saved_world, where)
    return progress
