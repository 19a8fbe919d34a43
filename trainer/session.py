"""A run from its command line to its end: what it asks for (config, ``-r`` checkpoint, folder),
its processes (one per GPU), its folder (lock, status, config.json, log), training or the test-only
evaluation, the final test and its status (trainer.assemble builds the run)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch.multiprocessing as mp

from data_loader.layouts import split_label
from segmentation.official import is_official
from segmentation.trained import as_project_checkpoint
from trainer.assemble import RunParts, RunRequest, assemble, config_changes, find_resumable
from trainer.evaluate import Validation, validate
from trainer.options import build_arg_parser, overrides_of
from trainer.reporting import Reporter
from trainer.trainer import TEST, Trainer
from utils import distributed  # its functions looked up at each call (the fault tests replace some)
from utils.amp import Precision
from utils.checkpoint import load_checkpoint
from utils.cli import error_exit
from utils.environment import banner
from utils.errors import ConfigError, Interrupted, NothingToDo, TrainingDiverged
from utils.logger import log_to_file, start_logging
from utils.malloc import retain_freed_memory
from utils.parse_config import load_config
from utils.run_dir import CONFIG_NAME, RunFolder, check_folder_name, new_run_id, run_path, test_run_id
from utils.schema import RESOLVED_KEY
from utils.settings import Settings
from utils.signals import StopSignals
from utils.util import read_json

logger = logging.getLogger("joem")


def launch(default_config: str | None, argv: list[str], process: bool = False) -> int:
    """One run of the training command line (``trainer.cli.main`` without ``--seeds``/``--from``); several
    GPU ids: one process each. ``process``: ``argv`` is this process's (its signal handlers stay)."""
    try:
        args = build_arg_parser(default_config).parse_args(argv)
        if args.run_id is not None:
            check_folder_name(args.run_id, "--run_id")
        if args.group is not None or args.name is not None:
            raise ConfigError("--group names a group of --seeds runs, --name an evaluation of a --from group: "
                              "add --seeds or --from")
        devices = distributed.parse_devices(args.device)
        if devices is not None and len(devices) > 1 and not distributed.launched_by_torchrun():
            return _spawn(devices, args, default_config, args.run_id or new_run_id())
        return _worker(None, None, args, default_config, args.run_id, process)
    except ConfigError as err:
        return error_exit(err)


def _spawn(devices: list[int], args: argparse.Namespace, default_config: str | None, run_id: str) -> int:
    """One process per GPU (DDP); a signal this process gets is passed on to them (a Ctrl-C
    reaches them directly), so they stop together at a safe point. Returns their exit status."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))
    with StopSignals(keep=True) as stop, stop.deferred():
        context = mp.spawn(_worker, args=(len(devices), args, default_config, run_id, True), nprocs=len(devices),
                           join=False)
        passed = False
        try:
            while not context.join(timeout=0.2):
                if stop.requested and not passed:
                    passed = True
                    for process in context.processes:
                        if process.is_alive():
                            os.kill(process.pid, stop.signum)
        except mp.ProcessExitedException as err:
            return err.exit_code
    return 0


def _worker(rank: int | None, world_size: int | None, args: argparse.Namespace, default_config: str | None,
            run_id: str | None, process: bool = False) -> int:
    """One process of the run: its exit status (0, 2 bad input, 3 diverged, 128 + signal).
    ``process``: it ends this process (signals stay handled, and ignored once the run is over)."""
    retain_freed_memory()
    code, ctx = 0, None
    with StopSignals(keep=process) as stop:
        try:
            ctx = distributed.init_process(distributed.parse_devices(args.device), rank, world_size)
            start_logging(ctx.is_main)
            if args.test and args.resume is None:
                raise ConfigError("--test needs a checkpoint: add -r RUN_DIR (or -r a checkpoint .pth)")
            run_id = distributed.broadcast_object(run_id or args.run_id or new_run_id())
            run(resolve_run(args, default_config, test_run_id(run_id) if args.test else run_id), ctx, stop)
        except NothingToDo as done:
            print(done)
        except ConfigError as err:
            code = error_exit(err) if ctx is None or ctx.is_main else 2
        except TrainingDiverged as err:
            logger.error("error: %s", err)
            code = 3
        except Interrupted as err:
            if ctx is None or ctx.is_main:
                logger.warning("%s", err) if logging.getLogger().handlers else print(err)
            code = err.exit_code
        finally:
            stop.end()   # the run is over: a later signal (a launcher ending the others) is ignored
            distributed.cleanup()
    if rank is not None and code:
        raise SystemExit(code)
    return code


def resolve_run(args: argparse.Namespace, default_config: str | None, run_id: str) -> RunRequest:
    """The run the command line asks for: settings (``-c``, the default config or the ``-r`` checkpoint's, with
    the overrides), ``-r`` checkpoint, run folder, whether it continues there (``-r RUN_DIR``, ``-r auto``)."""
    resume, raw, run_dir = args.resume, None, None
    source = args.config or (default_config if resume in (None, "auto") else None)   # else the -r checkpoint's
    settings = None if source is None else Settings.from_config(load_config(source), source, overrides_of(args))
    if resume == "auto":   # the requeued command's own config names the run folder and is used
        if args.run_id is None:
            raise ConfigError("-r auto continues the run named by --run_id: add --run_id NAME")
        if settings is None:
            raise ConfigError("-r auto needs the run's config: add -c config.json")
        run_dir = run_path(settings.trainer.save_dir, settings.name, run_id)
        resume, raw = find_resumable(run_dir, args.test) or (None, None)
    elif resume is not None and Path(resume).is_dir():
        found = find_resumable(Path(resume), args.test)
        if found is None:
            raise ConfigError(f"{resume}: no loadable training checkpoint in this run folder")
        run_dir = None if args.test else Path(resume)
        resume, raw = found
    elif resume is not None:
        raw = load_checkpoint(resume)
    if settings is None:   # the -r checkpoint's own config
        if raw is None:
            raise ConfigError("no config given: add -c config.json (or -r a checkpoint or run folder to continue)")
        if is_official(raw):
            raise ConfigError(f"{resume}: an official JoEm checkpoint holds no config or class split; pass -c CONFIG")
        if not isinstance(raw.get("config"), dict):
            raise ConfigError(f"{resume}: holds no config; pass the training config with -c")
        settings = Settings.from_config(raw["config"], str(resume), overrides_of(args), recorded=True)
        if run_dir is not None:
            _note_edited_config(run_dir, raw["config"])
    checkpoint = None if raw is None else as_project_checkpoint(raw, resume, settings)
    return RunRequest(settings, run_dir or run_path(settings.trainer.save_dir, settings.name, run_id),
                      None if resume is None else Path(resume), checkpoint, run_dir is not None, args.test)


def _note_edited_config(run_dir: Path, config: dict) -> None:
    """Warn when ``run_dir``'s config.json was edited by hand: ``-r RUN_DIR`` continues with the
    checkpoint's config (the edit is kept as ``config.previous-N.json``)."""
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return
    changed = sorted(config_changes(config, {k: v for k, v in read_json(path).items() if k != RESOLVED_KEY}))
    if changed:
        logger.warning("%s differs from the checkpoint's config (%s): the run continues with the checkpoint's "
                       "config; to apply the edit, pass it: -r %s -c %s", path, ", ".join(changed[:5]) +
                       (f" and {len(changed) - 5} more" if len(changed) > 5 else ""), run_dir, path)


def protocol(request: RunRequest, parts: RunParts) -> dict:
    """Which split chooses the checkpoint and which split is reported (banner and config.json)."""
    data, bundle = parts.settings.data, parts.bundle
    if request.test_only:
        selection = "none (the -r checkpoint is tested)"
    elif parts.settings.selects_checkpoint:
        selection = f"{bundle.selection} by {parts.settings.trainer.monitor}"
    else:
        selection = bundle.selection if bundle.selection_set is None else \
            f"none (the final weights are tested; {bundle.selection} is only evaluated)"
    return {"selection": selection, "reported": split_label(data.val_split)}


def _banner(request: RunRequest, parts: RunParts, ctx: distributed.DistContext) -> str:
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


def run(request: RunRequest, ctx: distributed.DistContext, stop: StopSignals | None = None) -> dict:
    """Train (or with ``request.test_only`` evaluate ``request.checkpoint``); returns the final headline
    record. Every check runs before the run folder is made (a run that fails them leaves none); the
    folder is locked for the run's life; a signal inside training saves the interrupted checkpoint."""
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
                              stop=stop, chosen_sigma=checkpoint.get("best_sigma"))
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


def _record_status(folder: RunFolder, ctx: distributed.DistContext, status: str, message: str) -> None:
    """Best effort: the status file may itself be unwritable (a full disk)."""
    if ctx.is_main and folder.lock.handle is not None:
        try:
            folder.set_status(status, message=message)
        except ConfigError:
            pass


def _train(request: RunRequest, parts: RunParts, ctx: distributed.DistContext, reporter: Reporter,
           stop: StopSignals) -> dict:
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
