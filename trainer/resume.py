"""Continuing a run: the newest loadable checkpoint of a folder (requeue), and the config changes
a resumed run applies (or refuses) relative to the run it continues."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

from utils.checkpoint import load_checkpoint
from utils.errors import ConfigError
from utils.run_dir import checkpoint_files

logger = logging.getLogger("joem")

# Keys a resumed run may not change: the optimizer state, the position in the schedule or in
# the epoch would no longer fit. (Architecture, classes and split are checked elsewhere.)
REFUSED = {"optimizer.type": "the saved optimizer state belongs to the old optimizer",
           "optimizer_gen.type": "the saved optimizer state belongs to the old optimizer",
           "lr_scheduler.interval": "the schedule's position counts epochs or steps"}
MID_EPOCH_REFUSED = {"data_loader.batch_size": "the interrupted epoch was split into batches of the old size",
                     "seed": "the interrupted epoch's order was drawn from the old seed"}


def find_resumable(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``folder`` that loads and holds a training state (optimizers),
    with its content; unreadable or partial files are skipped with a warning."""
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
