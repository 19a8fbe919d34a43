"""The optimizers and the LR schedule of a training run, built from the checked settings."""
from __future__ import annotations

import torch

from data_loader.loader import steps_per_epoch
from utils.parse_config import construct
from utils.settings import Settings


def build_optimizers(settings: Settings, model: torch.nn.Module,
                     semantic_encoder: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """SGD-style optimizer for the visual encoder (1x backbone, ``head_lr_mult`` x ASPP+decoder)
    and the semantic encoder's optimizer (``optimizer_gen``, constant LR as official)."""
    groups = model.param_groups(settings.optimizer.lr, settings.optimizer.head_lr_mult)
    return (construct(torch.optim, settings.optimizer, "optimizer", groups),
            construct(torch.optim, settings.optimizer_gen, "optimizer_gen", semantic_encoder.parameters()))


class PolySchedule:
    """Poly LR in closed form, ``base_lr * (1 - position / total) ** power``, so a resumed run of another
    length only needs the new total (:meth:`rebase`: every group at the new schedule's current value)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total: int, power: float):
        self.total, self.power = max(1, int(total)), float(power)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)

    def factor(self, position: int) -> float:
        return (1.0 - min(position, self.total) / self.total) ** self.power

    def step(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {**self.scheduler.state_dict(), "total": self.total, "power": self.power}

    def load_state_dict(self, state: dict) -> int | None:
        """Continue from ``state`` (re-based on this total); returns the saved total when it differs."""
        saved_total = state.get("total", state.get("total_iters"))
        self.scheduler.load_state_dict({k: v for k, v in state.items() if k not in ("total", "power", "total_iters")})
        self.rebase()
        return saved_total if saved_total is not None and saved_total != self.total else None

    def rebase(self) -> None:
        """Set every group's LR to this schedule's value at the current position."""
        position = self.scheduler.last_epoch
        for group, base in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.factor(position)


def build_scheduler(settings: Settings, optimizer: torch.optim.Optimizer,
                    train_loader) -> tuple[PolySchedule | None, str]:
    """Poly LR (``interval`` "epoch": stepped once per epoch, epoch 1 at the base LR, as the
    official code; "step": every iteration) or ``"constant"`` (None). Returns (schedule, interval)."""
    spec = settings.scheduler
    if spec.type.lower() == "constant":
        return None, spec.interval
    epochs = settings.trainer.epochs
    total = epochs if spec.interval == "epoch" else epochs * max(1, steps_per_epoch(train_loader))
    return PolySchedule(optimizer, total, spec.power), spec.interval
