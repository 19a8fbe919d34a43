"""Data parallelism and compilation of the training forward: DDP wrapping, SyncBatchNorm, the
semantic encoder's gradient average, ``torch.compile``."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from utils.distributed import DistContext, all_reduce_sum


def training_forward(model: nn.Module, ctx: DistContext, compile_model: bool = False) -> Callable:
    """What the training step calls: the visual encoder, DDP-wrapped when distributed and
    ``torch.compile``d when asked (evaluation keeps calling the plain model)."""
    forward: Callable = model
    if ctx.distributed:
        forward = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if compile_model:
        forward = torch.compile(forward)
    return forward


def to_sync_bn(model: nn.Module) -> None:
    """SyncBatchNorm outside the frozen backbone (CUDA only; on CPU each process keeps its own BN)."""
    for name in ("aspp", "decoder"):
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))
    if not getattr(model, "freeze_backbone_bn", True):
        model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)


def gradient_average(module: nn.Module, ctx: DistContext) -> Callable[[], None] | None:
    """For a module that DDP does not wrap (the semantic encoder): a function averaging its
    gradients over the processes, or None when not distributed."""
    if not ctx.distributed:
        return None

    def average() -> None:
        for param in module.parameters():
            if param.grad is not None:
                all_reduce_sum(param.grad).div_(ctx.world_size)
    return average
