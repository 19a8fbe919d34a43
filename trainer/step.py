"""One JoEm optimisation step (CE + BAR + alpha * SC), shared by the Trainer and the benchmarks."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from model.loss import joem_loss
from utils.amp import autocast_context
from utils.errors import NonFiniteLoss
from utils.settings import Settings


@dataclass
class StepSettings:
    """Loss weights and numerics of a training step (from the config's ``loss``/``trainer``)."""

    loss_args: dict = field(default_factory=dict)  # joem_loss keywords
    bar_detach_features: bool = False
    amp: str | bool | None = None
    channels_last: bool = False

    @classmethod
    def of(cls, settings: Settings) -> "StepSettings":
        """The step of a run's settings (its ``loss`` section, precision and memory format)."""
        args = {k: v for k, v in asdict(settings.loss).items() if k != "bar_detach_features"}   # joem_loss keywords
        return cls(args, settings.loss.bar_detach_features, settings.trainer.amp, settings.trainer.channels_last)


def norms_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor's float32 L2 norm is finite: no NaN, Inf or value beyond ~1e19 (a diverged update)."""
    if not tensors:
        return True
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    return bool(torch.isfinite(torch.stack(norms)).all())


def train_step(model: Callable, semantic_encoder: torch.nn.Module, optimizer: torch.optim.Optimizer,
               optimizer_gen: torch.optim.Optimizer, scaler: torch.amp.GradScaler, images: torch.Tensor,
               labels: torch.Tensor, embeddings: torch.Tensor, seen_object: torch.Tensor, settings: StepSettings,
               after_backward: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """Forward under autocast, losses in float32, both optimizers step through the GradScaler (fp16);
    ``after_backward``: between backward and the steps (the semantic encoder's gradient average)."""
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_context(images.device, settings.amp):
        logits, features = model(images)
    features = features.float()
    losses = joem_loss(logits.float(), features.detach() if settings.bar_detach_features else features, labels,
                       embeddings, semantic_encoder, seen_object, **settings.loss_args)
    total = losses["total"]
    if not torch.isfinite(total):
        raise NonFiniteLoss("loss (" + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()) + ")")
    optimizer.zero_grad(set_to_none=True)
    optimizer_gen.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if after_backward is not None:
        after_backward()
    if not scaler.is_enabled():   # fp16: the GradScaler skips steps with overflowing gradients itself
        if not norms_finite([p.grad for m in (model, semantic_encoder) for p in m.parameters() if p.grad is not None]):
            raise NonFiniteLoss(f"gradient (loss {total.item():.4g})")
    scaler.step(optimizer)
    scaler.step(optimizer_gen)
    scaler.update()
    return {k: v.detach() for k, v in losses.items()}
