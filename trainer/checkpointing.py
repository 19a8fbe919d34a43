"""What a training checkpoint holds, and how a Trainer continues from one."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from utils.checkpoint import architecture, set_rng_state

logger = logging.getLogger("joem")


def training_checkpoint(trainer: Any, epoch: int) -> dict:
    """``trainer`` (a :class:`trainer.trainer.Trainer`) as checkpoint content: both encoders, both optimizers, the LR schedule, the GradScaler, epoch and step, the
    monitored best, config, class split and embeddings (RNG states are added when saving)."""
    return {"epoch": epoch, "visual_encoder": trainer.model.state_dict(),
            "semantic_encoder": trainer.semantic_encoder.state_dict(),
            "optimizer": trainer.optimizer.state_dict(), "optimizer_gen": trainer.optimizer_gen.state_dict(),
            "lr_scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
            "scaler": trainer.scaler.state_dict(), "monitor_best": trainer.mnt_best,
            "global_step": trainer.global_step, "best_sigma": trainer.best_sigma,
            "best_checkpoint": str(trainer.best_path) if trainer.best_path is not None else None,
            "config": json.loads(json.dumps(trainer.config.config)), "class_split": trainer.split.to_dict(),
            "embeddings": trainer.embeddings.detach().cpu(), "architecture": architecture(trainer.config.config)}


def restore_training(trainer: Any, checkpoint: dict) -> None:
    """Continue from a full training checkpoint whose weights are already loaded: optimizers,
    LR schedule (re-based when the run's length changed), scaler, epoch, best metric, RNG."""
    trainer.optimizer.load_state_dict(checkpoint["optimizer"])
    trainer.optimizer_gen.load_state_dict(checkpoint["optimizer_gen"])
    if trainer.scheduler is not None and checkpoint.get("lr_scheduler") is not None:
        old_total = trainer.scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if old_total is not None:
            logger.info("schedule length changed from %d to %d: poly LR recomputed", old_total, trainer.scheduler.total)
    if checkpoint.get("scaler"):
        trainer.scaler.load_state_dict(checkpoint["scaler"])
    trainer.start_epoch = int(checkpoint["epoch"]) + 1
    trainer.completed_epoch = int(checkpoint["epoch"])
    trainer.mnt_best = float(checkpoint.get("monitor_best", trainer.mnt_best))
    trainer.best_sigma = checkpoint.get("best_sigma")
    best = checkpoint.get("best_checkpoint")   # the best checkpoint so far may live in the resumed run
    trainer.best_path = Path(best) if best and Path(best).is_file() else None
    trainer.global_step = int(checkpoint.get("global_step", 0))
    if "rng" in checkpoint:
        set_rng_state(checkpoint["rng"])
    logger.info("resumed from epoch %d (best %s = %s)", checkpoint["epoch"], trainer.mnt_metric, trainer.mnt_best)
