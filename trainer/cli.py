"""The command line shared by train_pascal_zs3setting.py and train_context_zs3setting.py."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.options import build_arg_parser, overrides_of
from utils.cli import error_exit
from utils.errors import ConfigError, NothingToDo
from utils.parse_config import load_config
from utils.run_dir import check_folder_name, new_run_id, test_run_id

if TYPE_CHECKING:
    from trainer.assemble import RunRequest

logger = logging.getLogger("joem")


def _resumable(folder: Path, test: bool) -> tuple[Path, dict] | None:
    """What ``-r`` on a run folder continues: the newest loadable training checkpoint (or, with
    ``--test``, the folder's model_best.pth, else its newest checkpoint: the final weights of a run
    that kept no best)."""
    from trainer.resume import find_resumable
    from utils.checkpoint import load_checkpoint, run_checkpoint
    from utils.run_dir import FINISHED, read_status
    if test:
        path, note = run_checkpoint(folder)
        logger.info("evaluating %s (%s)", path, note)
        return path, load_checkpoint(path)
    if read_status(folder).get("status") == FINISHED:
        raise NothingToDo(f"{folder}: the run is already finished; nothing to resume")
    return find_resumable(folder) if folder.is_dir() else None


def _run_config(config_path: str | None, raw: dict | None, resume) -> tuple[dict, str, bool]:
    """The config file given (or the default one), else the ``-r`` checkpoint's own config
    (and whether it is one a checkpoint recorded)."""
    from segmentation.official import is_official
    if config_path is not None:
        return load_config(config_path), config_path, False
    if raw is None:
        raise ConfigError("no config given: add -c config.json (or -r a checkpoint or run folder to continue)")
    if is_official(raw):
        raise ConfigError(f"{resume}: an official JoEm checkpoint holds no config or class split; pass -c CONFIG")
    if not isinstance(raw.get("config"), dict):
        raise ConfigError(f"{resume}: holds no config; pass the training config with -c")
    return raw["config"], str(resume), True


def _note_edited_config(run_dir: Path, config: dict) -> None:
    """Say so when a run folder's ``config.json`` was edited by hand: ``-r RUN_DIR`` continues with
    the checkpoint's config (the edit is kept as ``config.previous-N.json``)."""
    from trainer.resume import config_changes
    from utils.run_dir import CONFIG_NAME
    from utils.schema import RESOLVED_KEY
    from utils.util import read_json
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        return
    edited = {k: v for k, v in read_json(path).items() if k != RESOLVED_KEY}
    changed = sorted(config_changes(config, edited))
    if changed:
        logger.warning("%s differs from the checkpoint's config (%s): the run continues with the checkpoint's "
                       "config; to apply the edit, pass it: -r %s -c %s", path, ", ".join(changed[:5]) +
                       (f" and {len(changed) - 5} more" if len(changed) > 5 else ""), run_dir, path)


def resolve_run(args: argparse.Namespace, default_config: str | None, run_id: str) -> RunRequest:
    """The run the command line asks for: the config (``-c``, the default config, or the ``-r``
    checkpoint's own) checked once with the overrides into the run's settings, the ``-r``
    checkpoint's content (official files converted), the run folder, and whether the run
    continues in the folder it resumes from (``-r RUN_DIR``, ``-r auto``)."""
    from segmentation.trained import as_project_checkpoint
    from trainer.assemble import RunRequest
    from utils.checkpoint import load_checkpoint
    from utils.run_dir import run_path
    from utils.settings import Settings
    resume, raw, in_place, run_dir, settings = args.resume, None, False, None, None
    if resume == "auto":   # the requeued command's own config names the run folder and is used
        if args.run_id is None:
            raise ConfigError("-r auto continues the run named by --run_id: add --run_id NAME")
        source = args.config or default_config
        if source is None:
            raise ConfigError("-r auto needs the run's config: add -c config.json")
        settings = Settings.from_config(load_config(source), source, overrides_of(args))
        run_dir = run_path(settings.trainer.save_dir, settings.name, run_id)
        found = _resumable(run_dir, args.test)
        resume, raw = found if found else (None, None)
        in_place = True
    elif resume is not None and Path(resume).is_dir():
        found = _resumable(Path(resume), args.test)
        if found is None:
            raise ConfigError(f"{resume}: no loadable training checkpoint in this run folder")
        in_place, run_dir = not args.test, (None if args.test else Path(resume))
        resume, raw = found
    elif resume is not None:
        raw = load_checkpoint(resume)
    if settings is None:
        config, source, recorded = _run_config(args.config or (default_config if raw is None else None), raw, resume)
        settings = Settings.from_config(config, source, overrides_of(args), recorded=recorded)
        if in_place and recorded:
            _note_edited_config(run_dir, config)
    checkpoint = None if raw is None else as_project_checkpoint(raw, resume, settings)
    return RunRequest(settings, run_dir or run_path(settings.trainer.save_dir, settings.name, run_id),
                      None if resume is None else Path(resume), checkpoint, in_place, args.test)


def main(default_config: str | None = None, argv: list[str] | None = None) -> int:
    """Parse the command line; train or test, launching one process per GPU when asked.
    ``argv`` None: this is the process's command line (its signal handlers stay until it exits)."""
    process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_arg_parser(default_config)
    try:
        known = parser.parse_known_args(argv)[0]
        if known.seeds is not None or known.source is not None:   # multi-seed: its own options (--group ...) included
            from trainer.multiseed import main as multiseed_main
            return multiseed_main(argv, default_config)
        args = parser.parse_args(argv)
        if args.run_id is not None:
            check_folder_name(args.run_id, "--run_id")
        if args.group is not None or args.name is not None:
            raise ConfigError("--group names a group of --seeds runs, --name an evaluation of a --from group: "
                              "add --seeds or --from")
        from utils.distributed import launched_by_torchrun, parse_devices
        devices = parse_devices(args.device)
        if devices is not None and len(devices) > 1 and not launched_by_torchrun():
            return _spawn(devices, argv, default_config, args.run_id or new_run_id())
        return _worker(None, None, argv, default_config, args.run_id, process)
    except ConfigError as err:
        return error_exit(err)


def _spawn(devices: list[int], argv: list[str], default_config: str | None, run_id: str) -> int:
    """One process per GPU (DDP); this process waits for them and passes a signal it gets on to
    them (a Ctrl-C reaches them directly), so they stop together at a safe point. Its exit
    status is theirs (143 / 130 after a signal)."""
    import torch.multiprocessing as mp

    from utils.distributed import free_port
    from utils.signals import StopSignals
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    with StopSignals(keep=True) as stop, stop.deferred():
        context = mp.spawn(_worker, args=(len(devices), argv, default_config, run_id, True), nprocs=len(devices),
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


def _worker(rank: int | None, world_size: int | None, argv: list[str], default_config: str | None,
            run_id: str | None, process: bool = False) -> int:
    """One process of the run: its exit status (0, 2 bad input, 3 diverged, 128 + signal).
    ``process``: it ends this process (signals stay handled, and ignored once the run is over)."""
    from trainer.session import run
    from utils.distributed import broadcast_object, cleanup, init_process, parse_devices
    from utils.errors import Interrupted, TrainingDiverged
    from utils.logger import start_logging
    from utils.malloc import retain_freed_memory
    from utils.signals import StopSignals
    retain_freed_memory()
    args = build_arg_parser(default_config).parse_args(argv)
    code, ctx = 0, None
    with StopSignals(keep=process) as stop:
        try:
            ctx = init_process(parse_devices(args.device), rank, world_size)
            start_logging(ctx.is_main)
            if args.test and args.resume is None:
                raise ConfigError("--test needs a checkpoint: add -r path/to/model_best.pth")
            run_id = broadcast_object(run_id or args.run_id or new_run_id())
            request = resolve_run(args, default_config, test_run_id(run_id) if args.test else run_id)
            run(request, ctx, stop)
        except NothingToDo as done:
            print(done)
        except ConfigError as err:
            code = error_exit(err) if ctx is None or ctx.is_main else 2
        except TrainingDiverged as err:
            logger.error("error: %s", err)
            code = 3
        except Interrupted as err:
            if ctx is None or ctx.is_main:
                logging.getLogger("joem").warning("%s", err) if logging.getLogger().handlers else print(err)
            code = err.exit_code
        finally:
            stop.end()   # the run is over: a later signal (a launcher ending the others) is ignored
            cleanup()
    if rank is not None and code:
        raise SystemExit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
