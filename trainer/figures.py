"""A figure of predictions on validation images: photo, ground truth, prediction, one row each.

Images: the config's validation split (by default the checkpoint's config), spread over those with
unseen-class pixels, as the dataset decodes them (the decoding their labels are aligned with);
predictions: :class:`segmentation.segmenter.Segmenter` (what ``--test`` and ``predict.py`` use)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from data_loader import prepare_data
from data_loader.transforms import denormalize
from segmentation.segmenter import Segmenter
from utils.cli import ArgParser, run_command
from utils.parse_config import load_config
from utils.settings import Settings
from utils.visualization import colorize, palette


def pick_samples(val_set, unseen: set[int], count: int) -> list[int]:
    """``count`` samples spread evenly over the split (neighbouring video frames look alike), among
    those with unseen-class pixels when there are such samples."""
    candidates = [index for index in range(len(val_set))   # labels only: no image is decoded here
                  if np.isin(val_set.read_label(index), list(unseen)).any()] or list(range(len(val_set)))
    step = len(candidates) / min(count, len(candidates))
    return [candidates[int(k * step)] for k in range(min(count, len(candidates)))]


def draw(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], names: list[str], unseen: list[int],
         title: str, out: Path) -> None:
    """Save a grid: one row per image (photo, ground truth, prediction) and a class legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    height, width = rows[0][0].shape[-2:]
    figure, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows) * height / width + 0.9), squeeze=False)
    for row, (image, truth, pred) in zip(axes, rows):
        for axis, panel, label in zip(row, (image, colorize(truth), colorize(pred)),
                                      ("photo", "ground truth", "prediction")):
            axis.imshow(panel.permute(1, 2, 0).numpy())
            axis.set_title(label, fontsize=9)
            axis.axis("off")
    colours = palette().float() / 255
    handles = [Patch(color=colours[i].tolist(), label=f"{name}{' *' if i in unseen else ''}")
               for i, name in enumerate(names)]
    handles.append(Patch(facecolor="white", edgecolor="0.6", label="ignored / void"))
    figure.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.06, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def make_figure(args: argparse.Namespace) -> int:
    segmenter = Segmenter.from_checkpoint(args.checkpoint, config=args.config)
    settings = Settings.from_config(load_config(args.config), args.config) if args.config \
        else segmenter.trained.settings
    val_set = prepare_data(settings.data, train=False, val=True, source=settings.source).val_set
    unseen = list(segmenter.trained.split.unseen)
    rows = []
    for index in pick_samples(val_set, set(unseen), max(1, args.count)):
        item = val_set[index]
        rows.append((denormalize(item["image"]), item["label"], segmenter.predict_input(item["image"]).labels))
    title = args.title or f"{Path(args.checkpoint).parent.name}: sigma {segmenter.sigma:g}, " \
                          f"{segmenter.calibration} calibration (* = unseen)"
    draw(rows, segmenter.names, unseen, title, Path(args.out))
    print(f"wrote {args.out}")
    return 0


def build_parser() -> ArgParser:
    parser = ArgParser(description=__doc__.splitlines()[0])
    parser.add_argument("-r", "--checkpoint", required=True,
                        help="checkpoint (checkpoint-epochN.pth, model_best.pth) or a run folder")
    parser.add_argument("-c", "--config", help="config whose reported split to show (default: the checkpoint's)")
    parser.add_argument("--count", type=int, default=4, help="images (rows), default 4")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--out", required=True, help="PNG to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), make_figure, argv)


if __name__ == "__main__":
    sys.exit(main())
