"""The command line shared by train_pascal_zs3setting.py and train_context_zs3setting.py."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from utils.amp import parse_amp
from utils.parse_config import CustomArgs, ConfigParser, load_config, new_run_id, parse_assignment
from utils.util import ConfigError, error_exit

logger = logging.getLogger("joem")


def _n_unseen(value: str) -> str:
    return f"zs3-{int(value)}"


def _sigma(value: str) -> float | list[float]:
    """``0.5`` -> 0.5; ``0.3,0.5,0.7`` -> a sweep list (parsed by the one sigma parser)."""
    from model.inference import sigma_values
    try:
        values = sigma_values(value, "--sigma")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return values[0] if len(values) == 1 else values


def _sweep(value: str) -> dict:
    """``lo:hi:num`` -> a log-spaced sweep."""
    try:
        low, high, num = value.split(":")
        return {"log_range": [float(low), float(high)], "num": int(num)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep expects low:high:num, e.g. 0.05:20:25, got {value!r}") from None


# Shortcuts for the most used keys; -o KEY=VALUE sets any other.
OVERRIDES = [
    CustomArgs(["--n_unseen"], _n_unseen, "data.unseen_classes", "number of unseen classes: the ZS3 split 2/4/6/8/10"),
    CustomArgs(["--ratio"], float, "loss.ratio", "BAR downsampling ratio"),
    CustomArgs(["--temp"], float, "loss.temperature", "SC temperature"),
    CustomArgs(["--alpha"], float, "loss.alpha", "SC weight"),
    CustomArgs(["--sigma"], _sigma, "inference.sigma", "calibration factor, or several (0.3,0.5,0.7) for a sweep"),
    CustomArgs(["--sweep"], _sweep, "inference.sweep", "also evaluate a log-spaced sigma sweep low:high:num"),
    CustomArgs(["--calibration"], str, "inference.calibration", "top2 (official) or all (calibrated stacking)"),
    CustomArgs(["--seed"], int, "seed", "random seed"),
    CustomArgs(["--lr"], float, "optimizer.args.lr", "visual-encoder base learning rate"),
    CustomArgs(["--bs"], int, "data_loader.batch_size", "total batch size over all processes"),
    CustomArgs(["--epochs"], int, "trainer.epochs", "number of epochs"),
    CustomArgs(["--amp"], parse_amp, "trainer.amp",
               "precision: auto (what the device runs natively: bf16 on GPUs of compute capability >= 8 and "
               "CPUs with AMX/AVX512-BF16, fp16 on older GPUs, else fp32), bf16, fp16 or false"),
    CustomArgs(["--save_dir"], str, "trainer.save_dir", "root folder of run directories"),
]


def build_arg_parser(default_config: str | None) -> argparse.ArgumentParser:
    """Every option, the overrides included (so ``-h`` lists them all)."""
    parser = argparse.ArgumentParser(
        description="Train or evaluate JoEm (generalized zero-shot semantic segmentation).",
        epilog="Exit status: 0 ok, 2 bad config/input (one 'error:' line), 3 training diverged, 130 interrupted.")
    parser.add_argument("-c", "--config", default=None,
                        help=f"config JSON (default: {default_config}; with -r alone, the checkpoint's config)")
    parser.add_argument("-r", "--resume", default=None,
                        help="a checkpoint to resume training from (into a new run folder) or to evaluate with --test; "
                             "a run folder: continue that run in place from its newest loadable checkpoint "
                             "(--test: its model_best.pth); 'auto': the run folder named by --run_id, continued "
                             "when it has a checkpoint, else started (a requeued job reruns its own command)")
    parser.add_argument("-d", "--device", default=None, help="GPU ids, e.g. 0,1,2,3 (several = DDP), or cpu")
    parser.add_argument("--test", action="store_true", help="evaluate the -r checkpoint on the validation split")
    parser.add_argument("--run_id", default=None,
                        help="name of the run folder (default: time and a random suffix; may contain '/')")
    parser.add_argument("--save_predictions", action="store_true",
                        help="with --test (or the final test): write each image's predicted mask as a palette PNG "
                             "into predictions_test/")
    parser.add_argument("--seeds", default=None,
                        help="several runs, one per seed (e.g. 1,2,3; with -d 0,1,2 one seed per GPU) into one group "
                             "folder (--group NAME), then their mean ± std in aggregate.md/.json (see "
                             "docs/experiments.md; python -m trainer.multiseed)")
    group = parser.add_argument_group("config overrides")
    group.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                       help="set any nested config key, e.g. -o data.root=/data/VOC2012 -o trainer.epochs=5 "
                            "(values parsed as JSON where they parse; repeatable)")
    for opt in OVERRIDES:
        group.add_argument(*opt.flags, default=None, type=opt.type, help=f"{opt.help} ({opt.target})")
    return parser


def _dest(flags: list) -> str:
    return next((f for f in flags if f.startswith("--")), flags[0]).lstrip("-").replace("-", "_")


def overrides_of(args: argparse.Namespace) -> dict:
    """The command line's config overrides, in order: -o assignments, then the shortcuts."""
    overrides = dict(parse_assignment(text) for text in args.override)
    overrides.update({opt.target: getattr(args, _dest(opt.flags)) for opt in OVERRIDES
                      if getattr(args, _dest(opt.flags)) is not None})
    if args.save_predictions:
        overrides["inference.save_predictions"] = True
    return overrides


class NothingToDo(Exception):
    """The run asked for is already complete (a requeued job after its end): exit 0."""


def _resumable(folder: Path, test: bool) -> tuple[Path, dict] | None:
    """What ``-r`` on a run folder continues: the newest loadable training checkpoint (or, with
    ``--test``, the folder's model_best.pth)."""
    from trainer.resume import find_resumable
    from utils.checkpoint import load_checkpoint
    from utils.run_dir import FINISHED, read_status
    if test:
        best = folder / "model_best.pth"
        if not best.is_file():
            raise ConfigError(f"{folder}: no model_best.pth to evaluate")
        return best, load_checkpoint(best)
    if read_status(folder).get("status") == FINISHED:
        raise NothingToDo(f"{folder}: the run is already finished; nothing to resume")
    return find_resumable(folder) if folder.is_dir() else None


def _run_config(config_path: str | None, raw: dict | None, resume) -> tuple[dict, str]:
    """The config file given (or the default one), else the ``-r`` checkpoint's own config."""
    from model.official import is_official
    if config_path is not None:
        return load_config(config_path), config_path
    if raw is None:
        raise ConfigError("no config given: add -c config.json (or -r a checkpoint or run folder to continue)")
    if is_official(raw):
        raise ConfigError(f"{resume}: an official JoEm checkpoint holds no config or class split; pass -c CONFIG")
    if not isinstance(raw.get("config"), dict):
        raise ConfigError(f"{resume}: holds no config; pass the training config with -c")
    return raw["config"], str(resume)


def resolve_run(args: argparse.Namespace, default_config: str | None,
                run_id: str) -> tuple[ConfigParser, dict | None, bool]:
    """The run's config (``-c``, the default config, or the ``-r`` checkpoint's own) with the
    overrides applied, the ``-r`` checkpoint's content (official files converted), and whether
    the run continues in the folder it resumes from (``-r RUN_DIR``, ``-r auto``)."""
    from model.trained import as_project_checkpoint
    from trainer.settings import CONFIG_SCHEMA
    from utils.checkpoint import load_checkpoint
    resume, raw, in_place, run_dir, config = args.resume, None, False, None, None
    if resume == "auto":   # the requeued command's own config names the run folder and is used
        if args.run_id is None:
            raise ConfigError("-r auto continues the run named by --run_id: add --run_id NAME")
        source = args.config or default_config
        if source is None:
            raise ConfigError("-r auto needs the run's config: add -c config.json")
        config = load_config(source)
        probe = ConfigParser(config, overrides=overrides_of(args), run_id=run_id, schema=CONFIG_SCHEMA)
        found = _resumable(probe.run_dir, args.test)
        resume, raw = found if found else (None, None)
        in_place, run_dir = True, probe.run_dir
    elif resume is not None and Path(resume).is_dir():
        found = _resumable(Path(resume), args.test)
        if found is None:
            raise ConfigError(f"{resume}: no loadable training checkpoint in this run folder")
        in_place, run_dir = not args.test, (None if args.test else Path(resume))
        resume, raw = found
    elif resume is not None:
        raw = load_checkpoint(resume)
    if config is None:
        config, source = _run_config(args.config or (default_config if raw is None else None), raw, resume)
    parser = ConfigParser(config, resume, overrides_of(args), run_id=run_id, run_dir=run_dir, config_path=source,
                          schema=CONFIG_SCHEMA)
    checkpoint = None if raw is None else as_project_checkpoint(raw, resume, parser.config, source)
    return parser, checkpoint, in_place


def test_run_id(run_id: str) -> str:
    """``a/b`` -> ``a/test_b``: a --test run's folder name."""
    head, _, last = run_id.rpartition("/")
    return f"{head}/test_{last}" if head else f"test_{last}"


def main(default_config: str | None = None, argv: list[str] | None = None) -> int:
    """Parse the command line; train or test, launching one process per GPU when asked.
    ``argv`` None: this is the process's command line (its signal handlers stay until it exits)."""
    process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_arg_parser(default_config)
    if parser.parse_known_args(argv)[0].seeds is not None:   # its own options (--group ...) included
        from trainer.multiseed import main as multiseed_main
        return multiseed_main(argv, default_config)
    args = parser.parse_args(argv)
    try:
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
    from base.base_trainer import TrainingDiverged
    from trainer.session import run
    from utils.distributed import broadcast_object, cleanup, init_process, parse_devices
    from utils.logger import start_logging
    from utils.malloc import retain_freed_memory
    from utils.signals import Interrupted, StopSignals
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
            config, checkpoint, in_place = resolve_run(args, default_config, test_run_id(run_id) if args.test else run_id)
            run(config, ctx, checkpoint, test_only=args.test, stop=stop, in_place=in_place)
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
