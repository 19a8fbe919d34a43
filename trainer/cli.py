"""The command line shared by train_pascal_zs3setting.py and train_context_zs3setting.py."""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from datetime import datetime

import torch
import torchvision

from utils.amp import parse_amp
from utils.parse_config import ConfigParser, CustomArgs
from utils.util import ConfigError

logger = logging.getLogger("joem")


def _n_unseen(value: str) -> str:
    return f"zs3-{int(value)}"


def _sigma(value: str):
    """``0.5`` -> 0.5; ``0.3,0.5,0.7`` -> a sweep list."""
    from trainer.calibration import sigma_values
    values = sigma_values(value, "--sigma")
    return values[0] if len(values) == 1 else values


def _sweep(value: str) -> dict:
    """``lo:hi:num`` -> a log-spaced sweep."""
    try:
        low, high, num = value.split(":")
        return {"log_range": [float(low), float(high)], "num": int(num)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep expects low:high:num, e.g. 0.05:20:25, got {value!r}") from None


OVERRIDES = [
    CustomArgs(["--n_unseen"], _n_unseen, "data;unseen_classes", "number of unseen classes: the ZS3 split 2/4/6/8/10"),
    CustomArgs(["--ratio"], float, "loss;ratio", "BAR downsampling ratio"),
    CustomArgs(["--temp"], float, "loss;temperature", "SC temperature"),
    CustomArgs(["--alpha"], float, "loss;alpha", "SC weight"),
    CustomArgs(["--sigma"], _sigma, "inference;sigma", "calibration factor, or several (0.3,0.5,0.7) for a sweep"),
    CustomArgs(["--sweep"], _sweep, "inference;sweep", "also evaluate a log-spaced sigma sweep low:high:num"),
    CustomArgs(["--calibration"], str, "inference;calibration", "top2 (official) or all (calibrated stacking)"),
    CustomArgs(["--seed"], int, "seed", "random seed"),
    CustomArgs(["--lr"], float, "optimizer;args;lr", "visual-encoder base learning rate"),
    CustomArgs(["--bs"], int, "data_loader;batch_size", "total batch size over all processes"),
    CustomArgs(["--epochs"], int, "trainer;epochs", "number of epochs"),
    CustomArgs(["--amp"], parse_amp, "trainer;amp", "mixed precision: bf16, fp16 or false"),
    CustomArgs(["--save_dir"], str, "trainer;save_dir", "root folder of run directories"),
]


def build_arg_parser(default_config: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="JoEm generalized zero-shot semantic segmentation")
    parser.add_argument("-c", "--config", default=None,
                        help=f"config JSON (default: {default_config}; with -r alone, the checkpoint's config)")
    parser.add_argument("-r", "--resume", default=None, help="checkpoint: resume training, or evaluate with --test")
    parser.add_argument("-d", "--device", default=None, help="GPU ids, e.g. 0,1,2,3 (several = DDP), or cpu")
    parser.add_argument("--test", action="store_true", help="evaluate the -r checkpoint on the validation split")
    parser.add_argument("--run_id", default=None, help="name of the run folder (default: a timestamp)")
    return parser


def main(default_config: str | None = None, argv: list[str] | None = None) -> int:
    """Parse the command line; train or test, launching one process per GPU when asked."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from utils.distributed import launched_by_torchrun, parse_devices
        args, _ = build_arg_parser(default_config).parse_known_args(argv)
        devices = parse_devices(args.device)
        if devices is not None and len(devices) > 1 and not launched_by_torchrun():
            import torch.multiprocessing as mp
            from utils.distributed import free_port
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            run_id = args.run_id or _timestamp()
            mp.spawn(_worker, args=(len(devices), argv, default_config, run_id), nprocs=len(devices), join=True)
            return 0
        return _worker(None, None, argv, default_config, args.run_id)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _timestamp() -> str:
    return datetime.now().strftime(r"%Y%m%d_%H%M%S")


def _worker(rank: int | None, world_size: int | None, argv: list[str], default_config: str | None,
            run_id: str | None) -> int:
    from base.base_trainer import TrainingDiverged
    from utils.distributed import broadcast_object, cleanup, init_process, parse_devices
    from utils.logger import setup_logging
    from utils.malloc import retain_freed_memory
    retain_freed_memory()
    parser = build_arg_parser(default_config)
    args = parser.parse_known_args(argv)[0]
    ctx = init_process(parse_devices(args.device), rank, world_size)
    try:
        if args.config is None and args.resume is None:
            if default_config is None:
                raise ConfigError("no config given: add -c config.json")
            argv = ["-c", default_config] + argv
        if args.test and args.resume is None:
            raise ConfigError("--test needs a checkpoint: add -r path/to/model_best.pth")
        run_id = broadcast_object(run_id or _timestamp())
        run_id = f"test_{run_id}" if args.test else run_id
        from trainer.session import load_resume_config
        config = ConfigParser.from_args(build_arg_parser(default_config), OVERRIDES, argv=argv,
                                        load_resume_config=load_resume_config, run_id=run_id,
                                        create_dirs=ctx.is_main)
        setup_logging(config.run_dir if ctx.is_main else None, ctx.is_main)
        from trainer.session import run
        run(config, ctx, test_only=args.test)
        return 0
    except ConfigError as err:
        if ctx.is_main:
            print(f"error: {err}", file=sys.stderr)
        if rank is not None:
            raise SystemExit(2)
        return 2
    except TrainingDiverged as err:
        logging.getLogger("joem").error("error: %s", err)
        if rank is not None:
            raise SystemExit(3)
        return 3
    except KeyboardInterrupt:
        return 130
    finally:
        from trainer.session import forget_loaded
        forget_loaded()
        cleanup()


def environment_banner(ctx) -> str:
    """Versions and devices, for the start-up banner."""
    if ctx.device.type == "cuda":
        name = torch.cuda.get_device_name(ctx.device)
        devices = f"{ctx.world_size} x {name}"
    else:
        devices = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    from utils.malloc import retain_freed_memory
    malloc = "freed memory retained" if retain_freed_memory() else "default"
    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}; "
            f"devices: {devices}; processes: {ctx.world_size}; malloc: {malloc}")


if __name__ == "__main__":
    sys.exit(main())
