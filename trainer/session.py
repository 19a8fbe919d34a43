"""One run from a resolved config: check it, build data, encoders and optimizers; train or test."""
from __future__ import annotations

import logging

import torch

from base.base_trainer import TrainingDiverged
from data_loader import build_dataloader, prepare_data
from model.builder import build_encoders, load_encoder_weights, place
from trainer.evaluate import validate
from trainer.optim import build_optimizers, build_scheduler
from trainer.parallel import to_sync_bn
from trainer.reporting import Reporter
from trainer.resume import check_resume_changes
from trainer.settings import RESOLVED_KEY, RunSettings, check_config
from trainer.trainer import Trainer, seed_everything
from utils.amp import Precision, resolve_precision
from utils.checkpoint import check_compatible, load_checkpoint
from utils.distributed import DistContext, broadcast_object
from utils.environment import banner
from utils.logger import log_to_file
from utils.parse_config import ConfigParser
from utils.run_dir import RunFolder
from utils.signals import Interrupted, StopSignals
from utils.util import ConfigError, read_json, write_json

logger = logging.getLogger("joem")


def _banner(config: ConfigParser, settings: RunSettings, ctx: DistContext, bundle, test_only: bool,
            precision: Precision) -> str:
    data, split, batch = config["data"], bundle.split, settings.loader.batch_size
    lines = [f"run: {config.run_dir}",
             f"mode: {'test' if test_only else 'train'}; dataset: {data.get('type')} at {data.get('root')}",
             f"classes: {split.num_classes} ({len(split.seen)} seen"
             f"{' incl. background' if split.has_background else ', no background class'}, {len(split.unseen)} unseen)",
             f"unseen: {', '.join(split.unseen_names) or 'none'}",
             f"seen: {', '.join(split.seen_names)}",
             f"training images with unseen pixels removed: {data.get('remove_unseen_images', True)}; "
             f"ignore_bg: {data.get('ignore_bg', False)}; ignore_unseen: {data.get('ignore_unseen', False)}",
             f"embeddings: {tuple(bundle.embeddings.shape)}; "
             f"train images: {len(bundle.train_set) if bundle.train_set is not None else '-'}; "
             f"val images: {len(bundle.val_set) if bundle.val_set is not None else '-'}",
             f"effective batch size: {batch} ({ctx.world_size} process(es) x {batch // ctx.world_size}); "
             f"{precision.describe()}; channels_last: {settings.trainer.channels_last}",
             banner(ctx.device, ctx.world_size)]
    return "\n".join(lines)


def _write_config(config: ConfigParser, precision: Precision) -> None:
    """``config.json`` (the resolved config, plus what ``auto`` resolved to on this machine under
    ``"resolved"``); a resumed run that changed it keeps the earlier one as ``config.previous-N.json``."""
    path = config.run_dir / "config.json"
    content = {**config.config, RESOLVED_KEY: precision.record()}
    if path.is_file():
        earlier = read_json(path)
        if earlier == content:
            return
        number = 1 + sum(1 for _ in config.run_dir.glob("config.previous-*.json"))
        write_json(earlier, config.run_dir / f"config.previous-{number}.json")
    write_json(content, path)


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


def _progress(checkpoint: dict | None) -> dict | None:
    return None if checkpoint is None else checkpoint.get("progress")


def run(config: ConfigParser, ctx: DistContext, checkpoint: dict | None = None, *, test_only: bool = False,
        stop: StopSignals | None = None, in_place: bool = False) -> dict:
    """Train (or with ``test_only`` evaluate ``checkpoint``, the ``-r`` file's content, official
    files already converted); returns the final headline record.

    Every check runs before the run folder is made (a run that fails them leaves no folder);
    the folder is locked for the run's life; ``in_place``: continue the run of that folder.
    A signal inside training saves ``checkpoint-interrupted.pth`` and raises
    :class:`utils.signals.Interrupted`."""
    stop = stop or StopSignals()
    config.config.pop(RESOLVED_KEY, None)   # a run's config.json given as -c: re-resolve here
    settings = check_config(config.config, config.source)
    seed_everything(settings.seed)
    bundle = prepare_data(config["data"], train=not test_only, val=True, source=config.source, logger=logger)
    split = bundle.split
    if settings.loader.batch_size % ctx.world_size:
        raise ConfigError(f"data_loader.batch_size {settings.loader.batch_size} is not divisible by the "
                          f"{ctx.world_size} processes")
    changes = {}
    if checkpoint is not None:
        check_compatible(checkpoint, config.resume, config.config, split.to_dict())
        if not test_only and "optimizer" in checkpoint:
            progress = _progress(checkpoint)
            changes = check_resume_changes(checkpoint["config"], config.config,
                                           progress is not None and progress["phase"] == "train", config.resume)
    precision = resolve_precision(settings.trainer.amp, ctx.device)   # once, for this run's device
    settings = settings.with_precision(precision)
    torch.manual_seed(settings.seed)
    model, semantic_encoder = build_encoders(config.config, split.num_classes, bundle.embeddings.shape[1],
                                             pretrained=checkpoint is None)
    if checkpoint is not None:
        load_encoder_weights(model, semantic_encoder, checkpoint, config.resume)
    place(model, semantic_encoder, ctx.device, settings.trainer.channels_last)
    if ctx.distributed and ctx.device.type == "cuda":
        to_sync_bn(model)
    loader = settings.loader
    loader_args = {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
                   "persistent_workers": loader.persistent_workers, "seed": settings.seed}
    val_loader = build_dataloader(bundle.val_set, batch_size=loader.val_batch_size, train=False,
                                  distributed=ctx.distributed, **loader_args)
    train_loader = None if test_only else build_dataloader(
        bundle.train_set, batch_size=loader.batch_size // ctx.world_size, train=True, distributed=ctx.distributed,
        shuffle=loader.shuffle, **loader_args)
    stop.check()

    folder = RunFolder(config.run_dir, resume_in_place=in_place)
    started, reporter = False, None
    try:
        if ctx.is_main:
            folder.open()
            _write_config(config, precision)
            log_to_file(config.run_dir)
            folder.set_status("running")
            logger.info(_banner(config, settings, ctx, bundle, test_only, precision))
            for note in _precision_notes(precision, checkpoint, test_only):
                logger.warning(note)
            if checkpoint is not None:
                logger.info("loaded %s (epoch %s)", config.resume, checkpoint.get("epoch"))
        reporter = Reporter(config.run_dir, split.unseen_names, ctx.is_main, settings.trainer.tensorboard,
                            settings.trainer.log_step, precision.name)
        if in_place:
            reporter.keep_records_until(int(checkpoint["epoch"]) if checkpoint is not None else 0)
        if test_only:
            started = True
            record = validate(model, semantic_encoder, val_loader, split, bundle.embeddings, settings.inference,
                              reporter, epoch=int(checkpoint.get("epoch", 0)), split_name="test", device=ctx.device,
                              amp=settings.trainer.amp, channels_last=settings.trainer.channels_last,
                              keep_samples=settings.trainer.tensorboard_images if reporter.wants_images else 0,
                              save_predictions=settings.inference.save_predictions, stop=stop)
        else:
            record = _train(config, settings, ctx, model, semantic_encoder, split, bundle.embeddings, train_loader,
                            val_loader, reporter, checkpoint, changes, stop)
            started = True
        stop.end()   # a signal from now on is ignored: the run is complete
        if ctx.is_main:
            folder.set_status("finished")
        reporter.final(record)
        return record
    except Interrupted as err:
        started = started or (config.run_dir / "checkpoint-interrupted.pth").is_file()
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


def _train(config: ConfigParser, settings: RunSettings, ctx: DistContext, model, semantic_encoder, split, embeddings,
           train_loader, val_loader, reporter: Reporter, checkpoint: dict | None, changes: dict,
           stop: StopSignals) -> dict:
    optimizer, optimizer_gen = build_optimizers(config.config, model, semantic_encoder)
    scheduler, interval = build_scheduler(config.config, optimizer, train_loader)
    trainer = Trainer(config, settings, ctx, model, semantic_encoder, split, embeddings, train_loader, val_loader,
                      optimizer, optimizer_gen, scheduler, interval, reporter, stop)
    if checkpoint is not None and "optimizer" in checkpoint:
        trainer.resume(checkpoint, config.resume, changes)
    elif checkpoint is not None:
        logger.info("training starts at epoch 1 from the weights of %s (it holds no optimizer state)", config.resume)
    with stop.deferred():
        trainer.train()
        if not settings.trainer.test_after_train:
            return {}
        try:
            return _final_test(trainer, ctx)
        except Interrupted as err:
            raise Interrupted(err.signum, f"stopped during the final test (training is complete); run it again "
                                          f"with -r {config.run_dir}") from None


def _final_test(trainer: Trainer, ctx: DistContext) -> dict:
    """Evaluate the best checkpoint (this run's, or the resumed run's when this one saved none;
    else the final weights) as split 'test'."""
    best = trainer.best_path
    if ctx.distributed:
        torch.distributed.barrier()
        best = broadcast_object(best)
    epoch = trainer.completed_epoch
    if best is not None and best.is_file():
        checkpoint = load_checkpoint(best)
        load_encoder_weights(trainer.model, trainer.semantic_encoder, checkpoint, best)
        epoch = int(checkpoint["epoch"])
        logger.info("final test with %s (epoch %d)", best, epoch)
    return trainer.validate(epoch, "test")
