"""Segment images with a trained JoEm model and any class list (see docs/predict.md).

    python predict.py -r model_best.pth --images a.jpg photos/ --out preds/ \\
        [--classes "background,cat,dog,zebra" --embeddings extra.npy] [--sigma 0.5]

A thin command line over :class:`segmentation.segmenter.Segmenter` (the Python API). Writes
``<stem>_mask.png`` (palette PNG of class indices), ``<stem>_overlay.png``, ``legend.png`` and
``classes.txt`` into ``--out``. Exit status: 0 success, 1 some images could not be read
(skipped with a warning), 2 usage or configuration error (``error: ...`` on stderr).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from data_loader.layouts import IMAGE_EXTENSIONS
from segmentation.segmenter import Segmenter, image_tensor
from utils.amp import parse_amp
from utils.cli import ArgParser, run_command
from utils.errors import ConfigError, DataError
from utils.schema import CALIBRATIONS, sigma_values
from utils.visualization import colorize, palette, save_mask

MAX_CLASSES = 256          # mask values must fit a palette PNG
OUTPUT_SUFFIXES = ("_mask.png", "_overlay.png")
RUN_FILES = ("legend.png", "classes.txt")


def _sigma(value: str) -> float:
    values = sigma_values(value, "--sigma")
    if len(values) != 1:
        raise ConfigError(f"--sigma: one value, got {value!r}")
    return values[0]


def build_parser() -> ArgParser:
    """The command-line interface."""
    parser = ArgParser(description="Segment images with a trained JoEm model and any class list.",
                       epilog="Exit status: 0 ok, 1 some images were unreadable (skipped), 2 usage/config error.")
    parser.add_argument("-r", "--resume", "--checkpoint", dest="checkpoint", required=True,
                        help="checkpoint of this project (checkpoint-epochN.pth, model_best.pth, or a run folder: its "
                             "final weights, or model_best.pth when it selected on a selection split) or an official "
                             "JoEm model_best_fe.pth / fe_checkpoint-epochN.pth (its gen_ file beside it; needs -c)")
    parser.add_argument("-c", "--config", default=None,
                        help="config naming classes, split and embeddings (only for official JoEm checkpoints)")
    parser.add_argument("--images", nargs="+", required=True,
                        help="image files and/or folders (folders: their "
                             f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files, sorted, not recursive)")
    parser.add_argument("--out", required=True, help="output folder (created; same-name outputs are overwritten)")
    parser.add_argument("--classes", help="class list: comma-separated names or a file with one name a line "
                                          "(default: the checkpoint's classes)")
    parser.add_argument("--embeddings", help="embedding file (.npy/.pt/.pkl, classes x dims) for classes "
                                             "missing from the checkpoint")
    parser.add_argument("--embedding-classes",
                        help="names of the rows of --embeddings: comma list or file (default: the sidecar "
                             "<stem>.classes.txt beside the embedding file)")
    parser.add_argument("--normalize", nargs="?", const="checkpoint", choices=("checkpoint", "none", "l2", "max_norm"),
                        help="normalise --embeddings rows; alone: as the checkpoint's config normalises its "
                             "embeddings (default: no normalisation)")
    parser.add_argument("--unseen", help="classes to calibrate, comma list or file ('none' for no calibration); "
                                         "default: the checkpoint's unseen classes plus every extra class")
    parser.add_argument("--sigma", type=str, help="Apollonius calibration factor for unseen classes "
                                                  "(default: the checkpoint config's inference.sigma)")
    parser.add_argument("--calibration", choices=CALIBRATIONS,
                        help="top2 (official) or all (default: the checkpoint config's inference.calibration)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--amp", help="auto, bf16, fp16 or false (default: the checkpoint config's trainer.amp, "
                                      "as --test; auto: what this device runs natively)")
    parser.add_argument("--max-size", type=int, help="longer image side above which the sliding window is used, 0 = "
                                                     "never (default: the checkpoint config's inference.window)")
    parser.add_argument("--tile", type=int, help="sliding-window tile side, multiple of 16 (default: the config's)")
    parser.add_argument("--overlap", type=int, help="sliding-window overlap, multiple of 4 and < --tile (default: the "
                                                    "config's)")
    parser.add_argument("--tile-batch", type=int, help="tiles per forward pass (default: the config's)")
    parser.add_argument("--alpha", type=float, default=0.5, help="colour weight in the overlays (default 0.5)")
    return parser


def collect_images(paths: Sequence[str], skip_dir: Path | None = None) -> list[Path]:
    """Image files from files and folders (folder contents sorted, by extension).

    Files given explicitly are taken whatever their extension. In ``skip_dir`` (the output
    folder), this tool's own outputs are ignored so that re-runs do not segment masks.
    """
    images: list[Path] = []
    for spec in paths:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if skip_dir is not None and path.resolve() == skip_dir.resolve():
                found = [p for p in found if not p.name.endswith(OUTPUT_SUFFIXES) and p.name not in RUN_FILES]
            if not found:
                print(f"warning: {path}: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images", file=sys.stderr)
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            raise ConfigError(f"--images: {path}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in images))
    if not unique:
        raise ConfigError("--images: no images found")
    return [Path(p) for p in unique]


def output_stems(images: Sequence[Path]) -> list[str]:
    """One output stem per image: its file stem, with ``-2``, ``-3``... for repeated stems."""
    used: set[str] = set()
    stems = []
    for path in images:
        stem, number = path.stem, 1
        while stem in used:
            number += 1
            stem = f"{path.stem}-{number}"
        used.add(stem)
        stems.append(stem)
    return stems


def check_outputs(images: Sequence[Path], stems: Sequence[str], out: Path) -> None:
    """Refuse to run when an output file would overwrite one of the input images."""
    inputs = {p.resolve() for p in images}
    planned = [out / f"{stem}{suffix}" for stem in stems for suffix in OUTPUT_SUFFIXES] + [out / f for f in RUN_FILES]
    clash = [p for p in planned if p.resolve() in inputs]
    if clash:
        raise ConfigError(f"--out: writing {clash[0]} would overwrite an input image; choose another --out")


def save_overlay(image: torch.Tensor, labels: torch.Tensor, path: Path, alpha: float = 0.5) -> None:
    """The image (uint8 3 x H x W) blended with the class colours (``alpha`` = colour weight)."""
    blended = (1 - alpha) * image.float() + alpha * colorize(labels).float()
    Image.fromarray(blended.round().to(torch.uint8).permute(1, 2, 0).numpy()).save(path)


def _font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def save_legend(names: Sequence[str], unseen: Sequence[int], sigma: float, path: Path) -> None:
    """A colour swatch and the name of every class; unseen classes marked with '*'."""
    font, swatch, row, margin = _font(), 18, 24, 10
    labels = [f"{i}  {name}{' *' if i in set(unseen) else ''}" for i, name in enumerate(names)]
    footer = [f"* unseen (calibrated, sigma={sigma:g})"] if unseen else []
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textbbox((0, 0), text, font=font)[2] for text in labels + footer)
    legend = Image.new("RGB", (margin * 3 + swatch + text_w, margin * 2 + row * (len(labels) + len(footer))), "white")
    draw = ImageDraw.Draw(legend)
    colours = palette()
    for i, text in enumerate(labels):
        top = margin + i * row
        draw.rectangle([margin, top, margin + swatch, top + swatch], fill=tuple(colours[i].tolist()), outline="gray")
        draw.text((margin * 2 + swatch, top + 2), text, fill="black", font=font)
    for j, text in enumerate(footer):
        draw.text((margin, margin + (len(labels) + j) * row + 2), text, fill="black", font=font)
    legend.save(path)


def describe(labels: torch.Tensor, names: Sequence[str], top: int = 3) -> str:
    """The ``top`` classes by pixel share, e.g. ``cat 52.1%, background 40.3%``."""
    counts = torch.bincount(labels.flatten(), minlength=len(names)).double()
    shares = counts / counts.sum()
    order = shares.argsort(descending=True)[:top]

    def percent(share: float) -> str:
        return f"{100 * share:.1f}%" if share >= 0.0005 else "<0.1%"
    return ", ".join(f"{names[i]} {percent(float(shares[i]))}" for i in order.tolist() if shares[i] > 0)


def make_segmenter(args: argparse.Namespace) -> Segmenter:
    """The Segmenter the options describe (unset options: the checkpoint's config)."""
    window = {key: value for key, value in (("max_size", args.max_size), ("tile", args.tile),
                                            ("overlap", args.overlap), ("batch", args.tile_batch))
              if value is not None}
    if args.embedding_classes and not args.embeddings:
        raise ConfigError("--embedding-classes needs --embeddings FILE")
    if args.normalize and not args.embeddings:
        raise ConfigError("--normalize applies to --embeddings FILE, which is missing")
    if args.embeddings and not args.classes:
        print("warning: --embeddings given without --classes: using the checkpoint's classes only; "
              "name the extra classes in --classes", file=sys.stderr)
    segmenter = Segmenter.from_checkpoint(
        args.checkpoint, args.config, args.device, classes=args.classes, embeddings=args.embeddings,
        embedding_classes=args.embedding_classes, normalize=args.normalize, unseen=args.unseen,
        sigma=None if args.sigma is None else _sigma(args.sigma), calibration=args.calibration,
        amp=None if args.amp is None else parse_amp(args.amp), window=window or None)
    if segmenter.checkpoint_note:
        print(f"checkpoint: {segmenter.checkpoint} ({segmenter.checkpoint_note})")
    if len(segmenter.names) > MAX_CLASSES:
        raise ConfigError(f"--classes: {len(segmenter.names)} classes, at most {MAX_CLASSES} fit a palette mask")
    return segmenter


def run(args: argparse.Namespace) -> int:
    """Segment every image; returns the exit status (0, or 1 when some images were skipped)."""
    if not 0 <= args.alpha <= 1:
        raise ConfigError(f"--alpha: must be in [0, 1], got {args.alpha}")
    out = Path(args.out)
    images = collect_images(args.images, skip_dir=out)
    stems = output_stems(images)
    check_outputs(images, stems, out)
    segmenter = make_segmenter(args)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "classes.txt").write_text("".join(f"{name}\n" for name in segmenter.names))
        save_legend(segmenter.names, segmenter.unseen, segmenter.sigma, out / "legend.png")
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write ({err.strerror or err})") from None
    unseen_names = ", ".join(segmenter.names[i] for i in segmenter.unseen) or "none"
    amp = f", {segmenter.precision.name}"
    if segmenter.precision.warning:
        print(f"warning: {segmenter.precision.warning}", file=sys.stderr)
    print(f"{len(images)} image(s), {len(segmenter.names)} classes (unseen: {unseen_names}; sigma "
          f"{segmenter.sigma:g}, {segmenter.calibration} calibration), device {segmenter.trained.device}{amp} -> {out}")
    skipped = 0
    for path, stem in zip(images, stems):
        start = time.perf_counter()
        try:
            image = image_tensor(path)
        except DataError as err:
            print(f"warning: {err}; skipped", file=sys.stderr)
            skipped += 1
            continue
        try:
            result = segmenter.predict(image)
        except torch.OutOfMemoryError:
            raise ConfigError(f"{path}: out of memory on {segmenter.trained.device} for a {image.shape[2]}x"
                              f"{image.shape[1]} image; lower --max-size/--tile (sliding window) or use --amp bf16"
                              ) from None
        save_mask(result.labels, out / f"{stem}_mask.png")
        save_overlay(image, result.labels, out / f"{stem}_overlay.png", args.alpha)
        mode = f"  [{result.tiles} tiles]" if result.tiles > 1 else ""
        print(f"{path.name}  {image.shape[2]}x{image.shape[1]}  {time.perf_counter() - start:.2f}s  "
              f"{describe(result.labels, segmenter.names)}{mode}", flush=True)
    if skipped:
        print(f"warning: {skipped} of {len(images)} image(s) could not be read", file=sys.stderr)
    return 1 if skipped else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; ``error: ...`` on stderr and status 2 for user errors."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
