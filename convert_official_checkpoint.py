"""Convert an official JoEm checkpoint pair (fe_ + gen_) into this project's single file.

    python convert_official_checkpoint.py -c configs/config_pascal_zs3setting.json \
        -r saved/official/model_best_fe.pth --out converted.pth
"""
import argparse
import logging
import sys
from pathlib import Path

from segmentation.official import convert_official
from utils.checkpoint import save_checkpoint
from utils.cli import ArgParser, run_command
from utils.errors import ConfigError
from utils.parse_config import load_config
from utils.settings import Settings


def convert(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out}: exists; choose another --out (nothing is overwritten)")
    content = convert_official(args.resume, Settings.from_config(load_config(args.config), args.config))
    for key in ("format", "version"):  # save_checkpoint writes its own
        del content[key]
    save_checkpoint(out, **content)
    print(f"wrote {out}")
    return 0


def build_parser() -> ArgParser:
    parser = ArgParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="the config naming the classes, split and embeddings")
    parser.add_argument("-r", "--resume", required=True, help="official fe_checkpoint-epochN.pth or model_best_fe.pth")
    parser.add_argument("--out", required=True, help="output checkpoint (refuses to overwrite an existing file)")
    return parser


def main(argv=None) -> int:
    return run_command(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
