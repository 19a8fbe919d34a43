"""Building a run from its request: data, class split, encoders (with the ``-r`` weights), loaders,
the precision resolved for the device; every check runs here, before the run folder exists. A run
continued from a checkpoint: which checkpoint of a folder, and the config changes it applies or refuses."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from data_loader import DataBundle, build_dataloader, prepare_data
from model.builder import build_encoders, load_encoder_weights, place
from utils.amp import Precision, resolve_precision
from utils.checkpoint import check_compatible, load_checkpoint, run_checkpoint
from utils.distributed import DistContext
from utils.errors import ConfigError, NothingToDo
from utils.run_dir import FINISHED, checkpoint_files, read_status
from utils.seeding import seed_everything
from utils.settings import Settings
from utils.signals import StopSignals

logger = logging.getLogger("joem")


@dataclass
class RunRequest:
    """What the command line asks for: checked settings, run folder, the ``-r`` checkpoint (path, content),
    whether the run continues in that folder (``in_place``) and whether it only evaluates (``test_only``)."""

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
    if ctx.distributed and ctx.device.type == "cuda":   # SyncBatchNorm outside a frozen backbone (CPU: BN per process)
        for name in ("aspp", "decoder", *(() if getattr(model, "freeze_backbone_bn", True) else ("backbone",))):
            setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))
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


# Keys a resumed run may not change: the optimizer state, the position in the schedule or in
# the epoch would no longer fit. (Architecture, classes and split are checked elsewhere.)
REFUSED = {"optimizer.type": "the saved optimizer state belongs to the old optimizer",
           "optimizer_gen.type": "the saved optimizer state belongs to the old optimizer",
           "lr_scheduler.interval": "the schedule's position counts epochs or steps"}
MID_EPOCH_REFUSED = {"data_loader.batch_size": "the interrupted epoch was split into batches of the old size",
                     "seed": "the interrupted epoch's order was drawn from the old seed"}


def find_resumable(folder: Path, test: bool = False) -> tuple[Path, dict] | None:
    """What ``-r RUN_DIR`` continues, with its content: the newest checkpoint that loads and holds a
    training state (others skipped with a warning); ``test``: the one the run is tested with."""
    if test:
        path, note = run_checkpoint(folder)
        logger.info("evaluating %s (%s)", path, note)
        return path, load_checkpoint(path)
    if read_status(folder).get("status") == FINISHED:
        raise NothingToDo(f"{folder}: the run is already finished; nothing to resume")
    for path in checkpoint_files(folder):
        try:
            checkpoint = load_checkpoint(path)
        except ConfigError as err:
            logger.warning("skipping %s", err)
            continue
        if "optimizer" in checkpoint and "visual_encoder" in checkpoint:
            return path, checkpoint
        logger.warning("skipping %s: no training state in it", path)
    return None


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping) and tree:
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, tree


def config_changes(before: Mapping, after: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every leaf that differs between two configs."""
    old, new = dict(_flatten(before)), dict(_flatten(after))
    missing = object()
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if old.get(key, missing) != new.get(key, missing)}


def check_resume_changes(before: Mapping, after: Mapping, mid_epoch: bool, path: Path) -> dict[str, tuple]:
    """The config changes a resumed run makes: refused ones are a one-line error naming the key and
    why; the others are logged (they are applied by the run) and returned."""
    changes = config_changes(before, after)
    refused = {**REFUSED, **(MID_EPOCH_REFUSED if mid_epoch else {})}
    for key, (old, new) in changes.items():
        if key in refused:
            where = " in the middle of an epoch" if key in MID_EPOCH_REFUSED else ""
            raise ConfigError(f"{key}: cannot change from {old!r} to {new!r} when resuming {path}{where} "
                              f"({refused[key]})")
    for key, (old, new) in changes.items():
        if key != "trainer.save_dir":
            logger.info("resuming with a changed setting: %s %r -> %r (applied)", key, old, new)
    return changes
