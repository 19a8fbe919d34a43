"""The training command line's options (train_pascal_zs3setting.py, train_context_zs3setting.py,
python -m trainer.cli; listed by python -m trainer.multiseed too) and the config overrides they make."""
from __future__ import annotations

import argparse

from utils.amp import parse_amp
from utils.cli import ArgParser
from utils.errors import ConfigError
from utils.parse_config import CustomArgs, parse_assignment
from utils.schema import UNSEEN_KEY, sigma_values


def _n_unseen(value: str) -> str:
    return f"zs3-{int(value)}"


def _sigma(value: str) -> float | list[float]:
    """``0.5`` -> 0.5; ``0.3,0.5,0.7`` -> a sweep list (parsed by the one sigma parser)."""
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
    CustomArgs(["--n_unseen"], _n_unseen, UNSEEN_KEY, "number of unseen classes: the ZS3 split 2/4/6/8/10"),
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


def build_arg_parser(default_config: str | None) -> ArgParser:
    """Every option, the overrides included (so ``-h`` lists them all)."""
    parser = ArgParser(
        description="Train or evaluate JoEm (generalized zero-shot semantic segmentation).",
        epilog="Exit status: 0 ok, 2 bad config/input (one 'error:' line), 3 training diverged, 130/143 stopped by "
               "SIGINT/SIGTERM (a resumable checkpoint is written).")
    parser.add_argument("-c", "--config", default=None,
                        help=f"config JSON (default: {default_config}; with -r alone, the checkpoint's config)")
    parser.add_argument("-r", "--resume", default=None,
                        help="a checkpoint to resume training from (into a new run folder) or to evaluate with --test; "
                             "a run folder: continue that run in place from its newest loadable checkpoint "
                             "(--test: its final weights, or the checkpoint it chose on its own selection split, "
                             "and says which); 'auto': the run folder named by --run_id, continued when it has a "
                             "checkpoint, else started (a requeued job reruns its own command)")
    parser.add_argument("-d", "--device", default=None, help="GPU ids, e.g. 0,1,2,3 (several = DDP), or cpu")
    parser.add_argument("--test", action="store_true",
                        help="evaluate the -r checkpoint on the reported split (data.val_split)")
    parser.add_argument("--run_id", default=None,
                        help="name of the run folder under <save_dir>/<name> (default: time and a random suffix; may "
                             "contain '/'; an absolute path is the run folder itself)")
    parser.add_argument("--save_predictions", action="store_true",
                        help="with --test (or the final test): write each image's predicted mask as a palette PNG "
                             "into predictions_test/")
    seeds = parser.add_argument_group("multi-seed experiments (handed over to python -m trainer.multiseed)")
    seeds.add_argument("--seeds", default=None,
                       help="several runs, one per seed (e.g. 1,2,3; with -d 0,1,2 one seed per GPU) into one group "
                            "folder (--group NAME), then their mean ± std in aggregate.md/.json (see "
                            "docs/experiments.md)")
    seeds.add_argument("--group", default=None, help="with --seeds: the group folder's name (default: a timestamp)")
    seeds.add_argument("--from", dest="source", default=None,
                       help="with --test: a group folder of a multi-seed training, every seed's final weights "
                            "evaluated again")
    seeds.add_argument("--name", default=None, help="with --from: name of this evaluation (a folder in the group)")
    group = parser.add_argument_group("config overrides")
    group.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                       help="set any nested config key, e.g. -o data.root=/data/VOC2012 -o trainer.epochs=5 "
                            "(values parsed as JSON where they parse; repeatable)")
    for opt in OVERRIDES:
        group.add_argument(*opt.flags, default=None, type=opt.type, help=f"{opt.help} ({opt.target})")
    return parser


def overrides_of(args: argparse.Namespace) -> dict:
    """The command line's config overrides, in order: -o assignments, then the shortcuts."""
    overrides = dict(parse_assignment(text) for text in args.override)
    for opt in OVERRIDES:   # each shortcut is one --long_option
        if (value := getattr(args, opt.flags[0][2:])) is not None:
            overrides[opt.target] = value
    if args.save_predictions:
        overrides["inference.save_predictions"] = True
    return overrides
