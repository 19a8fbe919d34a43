"""Building a run from its request: data, class split, encoders (with the ``-r`` weights), loaders,
the precision resolved for the device; every check runs here, before the run folder exists."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from data_loader import DataBundle, build_dataloader, prepare_data
from model.builder import build_encoders, load_encoder_weights, place
from trainer.parallel import to_sync_bn
from trainer.resume import check_resume_changes
from utils.amp import Precision, resolve_precision
from utils.checkpoint import check_compatible
from utils.distributed import DistContext
from utils.errors import ConfigError
from utils.seeding import seed_everything
from utils.settings import Settings
from utils.signals import StopSignals

logger = logging.getLogger("joem")


@dataclass
class RunRequest:
    """What the command line asks for: the checked settings, the run folder, the ``-r`` checkpoint
    (its path and content, official files converted), whether the run continues in that folder
    (``in_place``) and whether it only evaluates (``test_only``)."""

    settings: Settings
    run_dir: Path
    resume: Path | None = None
    checkpoint: dict | None = None
    in_place: bool = False
    test_only: bool = False


@dataclass
class RunParts:
    """A built run: settings with the precision resolved, data, encoders on the device, loaders,
    and the config changes a resumed run applies."""

    settings: Settings
    precision: Precision
    bundle: DataBundle
    model: torch.nn.Module
    semantic_encoder: torch.nn.Module
    train_loader: object | None
    selection_loader: object | None
    test_loader: object
    changes: dict


def assemble(request: RunRequest, ctx: DistContext, stop: StopSignals) -> RunParts:
    """Check and build everything the run needs (a run that fails here leaves no folder)."""
    settings, checkpoint, test_only = request.settings, request.checkpoint, request.test_only
    seed_everything(settings.seed)
    bundle = prepare_data(settings.data, train=not test_only, source=settings.source, logger=logger)
    split = bundle.split
    if settings.loader.batch_size % ctx.world_size:
        raise ConfigError(f"data_loader.batch_size {settings.loader.batch_size} is not divisible by the "
                          f"{ctx.world_size} processes")
    changes = {}
    if checkpoint is not None:
        check_compatible(checkpoint, request.resume, settings, split.to_dict())
        if not test_only and "optimizer" in checkpoint:
            progress = checkpoint.get("progress")
            changes = check_resume_changes(checkpoint["config"], settings.config,
                                           progress is not None and progress["phase"] == "train", request.resume)
    precision = resolve_precision(settings.trainer.amp, ctx.device)   # once, for this run's device
    settings = settings.with_precision(precision)
    torch.manual_seed(settings.seed)
    model, semantic_encoder = build_encoders(settings, split.num_classes, bundle.embeddings.shape[1],
                                             pretrained=checkpoint is None)
    if checkpoint is not None:
        load_encoder_weights(model, semantic_encoder, checkpoint, request.resume)
    place(model, semantic_encoder, ctx.device, settings.trainer.channels_last)
    if ctx.distributed and ctx.device.type == "cuda":
        to_sync_bn(model)
    loader = settings.loader
    loader_args = {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
                   "persistent_workers": loader.persistent_workers, "seed": settings.seed}

    def evaluation(dataset) -> object | None:
        return None if dataset is None else build_dataloader(dataset, batch_size=loader.val_batch_size, train=False,
                                                             distributed=ctx.distributed, **loader_args)
    train_loader = None if test_only else build_dataloader(
        bundle.train_set, batch_size=loader.batch_size // ctx.world_size, train=True, distributed=ctx.distributed,
        shuffle=loader.shuffle, **loader_args)
    stop.check()
    return RunParts(settings, precision, bundle, model, semantic_encoder, train_loader,
                    evaluation(bundle.selection_set), evaluation(bundle.val_set), changes)
