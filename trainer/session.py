"""A run's lifecycle: its folder (lock, status, config.json, log), training or the test-only
evaluation, the final test, and the status the run ends with (see trainer.assemble for how
the run is built)."""
from __future__ import annotations

import logging

from data_loader.layouts import split_label
from trainer.assemble import RunParts, RunRequest, assemble
from trainer.evaluate import Validation, validate
from trainer.reporting import Reporter
from trainer.trainer import TEST, Trainer
from utils.amp import Precision
from utils.distributed import DistContext
from utils.environment import banner
from utils.errors import ConfigError, Interrupted, TrainingDiverged
from utils.logger import log_to_file
from utils.run_dir import RunFolder
from utils.schema import RESOLVED_KEY
from utils.signals import StopSignals

logger = logging.getLogger("joem")


def protocol(request: RunRequest, parts: RunParts) -> dict:
    """Which split chooses the checkpoint and which split is reported (banner and config.json)."""
    data, bundle = parts.settings.data, parts.bundle
    if request.test_only:
        selection = "none (the -r checkpoint is tested)"
    elif bundle.selection_set is not None and parts.settings.trainer.monitor != "off":
        selection = f"{bundle.selection} by {parts.settings.trainer.monitor}"
    else:
        selection = bundle.selection if bundle.selection_set is None else \
            f"none (the final weights are tested; {bundle.selection} is only evaluated)"
    return {"selection": selection, "reported": split_label(data.val_split)}


def _banner(request: RunRequest, parts: RunParts, ctx: DistContext) -> str:
    settings, bundle = parts.settings, parts.bundle
    data, split, batch = settings.data, bundle.split, settings.loader.batch_size
    chosen = protocol(request, parts)

    def count(dataset) -> str:
        return "-" if dataset is None else str(len(dataset))
    lines = [f"run: {request.run_dir}",
             f"mode: {'test' if request.test_only else 'train'}; dataset: {data.type} at {data.root}",
             f"classes: {split.num_classes} ({len(split.seen)} seen"
             f"{' incl. background' if split.has_background else ', no background class'}, {len(split.unseen)} unseen)",
             f"unseen: {', '.join(split.unseen_names) or 'none'}",
             f"seen: {', '.join(split.seen_names)}",
             f"training images with unseen pixels removed: {data.remove_unseen_images}; "
             f"background ignored: {data.ignore_bg}; unseen pixels ignored in training: {data.ignore_unseen}",
             f"model selection: {chosen['selection']}; reported split: {chosen['reported']!r}",
             f"embeddings: {tuple(bundle.embeddings.shape)}; train images: {count(bundle.train_set)}; "
             f"selection images: {count(bundle.selection_set)}; test images: {count(bundle.val_set)}",
             f"effective batch size: {batch} ({ctx.world_size} process(es) x {batch // ctx.world_size}); "
             f"{parts.precision.describe()}; channels_last: {settings.trainer.channels_last}",
             banner(ctx.device, ctx.world_size)]
    return "\n".join(lines)


def _precision_notes(precision: Precision, checkpoint: dict | None, test_only: bool) -> list[str]:
    """Warnings for the log: a precision known to be slow here; a resumed run whose precision
    (``auto`` re-resolved on another machine) differs from its checkpoint's."""
    notes = [f"warning: {precision.warning}"] if precision.warning else []
    earlier = (checkpoint or {}).get("precision")
    if not test_only and earlier and earlier.get("amp") != precision.name:
        notes.append(f"precision: {precision.name} on this machine ({precision.reason}); the checkpoint was "
                     f"trained in {earlier.get('amp')} ({earlier.get('reason')}): the resumed run continues in "
                     f"{precision.name} and is not bit-exact with an uninterrupted one")
    return notes


def run(request: RunRequest, ctx: DistContext, stop: StopSignals | None = None) -> dict:
    """Train (or with ``request.test_only`` evaluate ``request.checkpoint``); returns the final
    headline record.

    Every check runs before the run folder is made (a run that fails them leaves no folder);
    the folder is locked for the run's life; ``request.in_place``: continue the run of that
    folder. A signal inside training saves the interrupted checkpoint and raises
    :class:`utils.errors.Interrupted`."""
    stop = stop or StopSignals()
    parts = assemble(request, ctx, stop)
    settings, split, checkpoint = parts.settings, parts.bundle.split, request.checkpoint
    folder = RunFolder(request.run_dir, resume_in_place=request.in_place)
    started, reporter = False, None
    try:
        if ctx.is_main:
            folder.open()
            folder.write_config({**settings.record(), RESOLVED_KEY: {**parts.precision.record(),
                                                                     "protocol": protocol(request, parts)}})
            if parts.bundle.selection_set is not None and not request.test_only:
                folder.write_selection(parts.bundle.selection_names)
            log_to_file(request.run_dir)
            folder.set_status("running")
            logger.info(_banner(request, parts, ctx))
            for note in _precision_notes(parts.precision, checkpoint, request.test_only):
                logger.warning(note)
            if checkpoint is not None:
                logger.info("loaded %s (epoch %s)", request.resume, checkpoint.get("epoch"))
        reporter = Reporter(request.run_dir, split.unseen_names, ctx.is_main, settings.trainer.tensorboard,
                            settings.trainer.log_step, parts.precision.name)
        if request.in_place:
            reporter.keep_records_until(int(checkpoint["epoch"]) if checkpoint is not None else 0)
        if request.test_only:
            started = True
            validation = Validation(parts.model, parts.semantic_encoder, split, parts.bundle.embeddings, settings,
                                    reporter, ctx.device)
            record = validate(validation, parts.test_loader, epoch=int(checkpoint.get("epoch", 0)), split_name=TEST,
                              stop=stop)
        else:
            record = _train(request, parts, ctx, reporter, stop)
            started = True
        stop.end()   # a signal from now on is ignored: the run is complete
        if ctx.is_main:
            folder.set_status("finished")
        reporter.final(record)
        return record
    except Interrupted as err:
        started = started or folder.interrupted_checkpoint.is_file()
        _record_status(folder, ctx, "interrupted", str(err))
        raise
    except TrainingDiverged as err:
        started = True
        _record_status(folder, ctx, "diverged", str(err))
        raise
    except BaseException as err:
        _record_status(folder, ctx, "failed", f"{type(err).__name__}: {err}")
        raise
    finally:
        if reporter is not None:
            reporter.close()
        if ctx.is_main:
            folder.close(remove=not started)


def _record_status(folder: RunFolder, ctx: DistContext, status: str, message: str) -> None:
    """Best effort: the status file may itself be unwritable (a full disk)."""
    if ctx.is_main and folder.lock.handle is not None:
        try:
            folder.set_status(status, message=message)
        except ConfigError:
            pass


def _train(request: RunRequest, parts: RunParts, ctx: DistContext, reporter: Reporter, stop: StopSignals) -> dict:
    checkpoint = request.checkpoint
    trainer = Trainer(parts, request.run_dir, ctx, reporter, stop)
    if checkpoint is not None and "optimizer" in checkpoint:
        trainer.resume(checkpoint, request.resume, parts.changes)
    elif checkpoint is not None:
        logger.info("training starts at epoch 1 from the weights of %s (it holds no optimizer state)", request.resume)
    with stop.deferred():
        trainer.train()
        if not parts.settings.trainer.test_after_train:
            return {}
        try:
            return trainer.test()
        except Interrupted as err:
            raise Interrupted(err.signum, f"stopped during the final test (training is complete); run it again "
                                          f"with -r {request.run_dir}") from None
