"""Segment images with a trained JoEm model and any class list (see docs/predict.md).

    python predict.py -r model_best.pth --images a.jpg photos/ --out preds/ \\
        [--classes "background,cat,dog,zebra" --embeddings extra.npy] [--sigma 0.5]

Writes ``<stem>_mask.png`` (palette PNG of class indices), ``<stem>_overlay.png``,
``legend.png`` and ``classes.txt`` into ``--out``. Classes missing from the checkpoint get
their prototype from the semantic encoder applied to their embedding: no retraining.
Exit status: 0 success, 1 some images could not be read (skipped with a warning),
2 usage or configuration error (``error: ...`` on stderr).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from data_loader.classes import canonical_name, class_index, load_class_names
from model.sliding_window import (full_resolution_labels, model_features, sliding_window_features,
                                  tile_boxes)
from trainer.loading import TrainedModel, load_trained_model
from utils.embeddings import load_class_embeddings, normalize_embeddings
from utils.amp import AMP_DTYPES
from utils.util import ConfigError, read_json
from utils.visualization import IMAGENET_MEAN, IMAGENET_STD, colorize, palette

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PAD_MULTIPLE = 16          # image sides are padded (not resized) to a multiple of this
MAX_CLASSES = 256          # mask values must fit a palette PNG
OUTPUT_SUFFIXES = ("_mask.png", "_overlay.png")
RUN_FILES = ("legend.png", "classes.txt")


class ImageReadError(Exception):
    """An input image that cannot be decoded (the image is skipped with a warning)."""


@dataclass
class ClassChoice:
    """The class list of a run: names (mask value i = names[i]), embeddings, unseen indices."""

    names: list[str]
    embeddings: torch.Tensor
    unseen: list[int]
    extra: list[int]  # indices whose embedding came from --embeddings

    def unseen_mask(self) -> torch.Tensor:
        mask = torch.zeros(len(self.names), dtype=torch.bool)
        mask[self.unseen] = True
        return mask


# ----------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description="Segment images with a trained JoEm model and any class list.",
        epilog="Exit status: 0 ok, 1 some images were unreadable (skipped), 2 usage/config error.")
    parser.add_argument("-r", "--resume", "--checkpoint", dest="checkpoint", required=True,
                        help="checkpoint of this project (model_best.pth, checkpoint-epochN.pth) or an official "
                             "JoEm model_best_fe.pth / fe_checkpoint-epochN.pth (its gen_ file beside it; needs -c)")
    parser.add_argument("-c", "--config", default=None,
                        help="config naming classes, split and embeddings (only for official JoEm checkpoints)")
    parser.add_argument("--images", nargs="+", required=True,
                        help="image files and/or folders (folders: *.jpg/jpeg/png/bmp/webp, sorted, not recursive)")
    parser.add_argument("--out", required=True, help="output folder (created; same-name outputs are overwritten)")
    parser.add_argument("--classes", help="class list: comma-separated names or a file with one name a line "
                                          "(default: the checkpoint's classes)")
    parser.add_argument("--embeddings", help="embedding file (.npy/.pt/.pkl, classes x dims) for classes "
                                             "missing from the checkpoint")
    parser.add_argument("--embedding-classes",
                        help="names of the rows of --embeddings: comma list or file (default: the sidecar "
                             "<stem>.classes.txt beside the embedding file)")
    parser.add_argument("--normalize", nargs="?", const="checkpoint", choices=("checkpoint", "none", "l2", "max_norm"),
                        help="normalise --embeddings rows; alone: the checkpoint config's "
                             "data.embeddings.normalize mode (default: no normalisation)")
    parser.add_argument("--unseen", help="classes to calibrate, comma list or file ('none' for no calibration); "
                                         "default: the checkpoint's unseen classes plus every extra class")
    parser.add_argument("--sigma", type=float, help="Apollonius calibration factor for unseen classes "
                                                    "(default: the checkpoint config's inference.sigma)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), help="run the visual encoder in bf16 or fp16")
    parser.add_argument("--max-size", type=int, default=1024,
                        help="longer image side above which the sliding window is used (default 1024)")
    parser.add_argument("--tile", type=int, default=512, help="sliding-window tile side, multiple of 16 (default 512)")
    parser.add_argument("--overlap", type=int, default=128,
                        help="sliding-window overlap, multiple of 4 and < --tile (default 128)")
    parser.add_argument("--tile-batch", type=int, default=4, help="tiles per forward pass (default 4)")
    parser.add_argument("--alpha", type=float, default=0.5, help="colour weight in the overlays (default 0.5)")
    return parser


def check_options(args: argparse.Namespace) -> None:
    """Range checks that argparse cannot express."""
    if args.max_size <= 0:
        raise ConfigError(f"--max-size: must be positive, got {args.max_size}")
    if args.tile < PAD_MULTIPLE or args.tile % PAD_MULTIPLE:
        raise ConfigError(f"--tile: must be a positive multiple of {PAD_MULTIPLE}, got {args.tile}")
    if args.overlap < 0 or args.overlap % 4 or args.overlap >= args.tile:
        raise ConfigError(f"--overlap: must be a multiple of 4 in [0, --tile), got {args.overlap}")
    if args.tile_batch < 1:
        raise ConfigError(f"--tile-batch: must be >= 1, got {args.tile_batch}")
    if args.sigma is not None and not args.sigma >= 0:
        raise ConfigError(f"--sigma: must be >= 0, got {args.sigma}")
    if not 0 <= args.alpha <= 1:
        raise ConfigError(f"--alpha: must be in [0, 1], got {args.alpha}")
    if args.embedding_classes and not args.embeddings:
        raise ConfigError("--embedding-classes needs --embeddings FILE")
    if args.normalize and not args.embeddings:
        raise ConfigError("--normalize applies to --embeddings FILE, which is missing")


def resolve_device(spec: str | None) -> torch.device:
    """``--device`` to a torch device; CUDA must exist when asked for."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: invalid device {spec!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ConfigError(f"--device: unsupported device {spec!r}; use cpu, cuda or cuda:N")
    return device


# ----------------------------------------------------------------------------- inputs

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


def read_names(spec: str, option: str) -> list[str]:
    """A name list from a comma-separated string or a file (one name a line, or a JSON list)."""
    path = Path(spec)
    if "," not in spec and path.is_file():
        return list(load_class_names(path, option, str(path)))
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"{option}: no class names in {spec!r}")
    seen: dict[str, str] = {}
    for name in names:
        if canonical_name(name) in seen:
            raise ConfigError(f"{option}: duplicate class {name!r} (same as {seen[canonical_name(name)]!r})")
        seen[canonical_name(name)] = name
    return names


def sidecar_names_path(embeddings_path: Path) -> Path:
    """``X.npy`` -> ``X.classes.txt`` beside it (the convention of build_embeddings.py)."""
    return embeddings_path.with_name(embeddings_path.stem + ".classes.txt")


def read_extra_embeddings(path: str, names_spec: str | None, normalize: str | None,
                          dim: int) -> dict[str, tuple[str, torch.Tensor]]:
    """The rows of an embedding file, keyed by canonical class name: ``{key: (name, vector)}``."""
    file = Path(path)
    table = load_class_embeddings(file)
    if names_spec is None:
        sidecar = sidecar_names_path(file)
        if not sidecar.is_file():
            raise ConfigError(f"{file}: no names for its rows: give --embedding-classes or write {sidecar.name} "
                              f"beside it (one class name a line)")
        names_spec = str(sidecar)
    names = read_names(names_spec, "--embedding-classes")
    if len(names) != table.shape[0]:
        raise ConfigError(f"{file}: has {table.shape[0]} rows but {len(names)} class names are given")
    if table.shape[1] != dim:
        raise ConfigError(f"{file}: embeddings have {table.shape[1]} dims, the checkpoint's have {dim}")
    table = normalize_embeddings(table, normalize)
    return {canonical_name(name): (name, table[row]) for row, name in enumerate(names)}


def normalize_mode(option: str | None, config: dict) -> str | None:
    """The normalisation for --embeddings: none unless asked; "checkpoint" reads the config."""
    if option in (None, "none"):
        return None
    if option == "checkpoint":
        mode = ((config.get("data") or {}).get("embeddings") or {}).get("normalize")
        return None if mode in (None, "none") else mode
    return option


def choose_classes(trained: TrainedModel, classes: str | None = None, embeddings: str | None = None,
                   embedding_classes: str | None = None, unseen: str | None = None,
                   normalize: str | None = None) -> ClassChoice:
    """Resolve the run's classes, their embeddings and which ones are calibrated as unseen.

    Names are matched case-insensitively, ignoring spaces, ``_`` and ``-`` (and the usual
    aliases such as tv/tvmonitor). A name of the checkpoint uses the checkpoint's embedding;
    any other comes from ``--embeddings`` and is unseen by definition.
    """
    ckpt_names = list(trained.split.names)
    ckpt_index = class_index(ckpt_names)
    dim = trained.embeddings.shape[1]
    extra_table = (read_extra_embeddings(embeddings, embedding_classes, normalize_mode(normalize, trained.config), dim)
                   if embeddings else {})
    if classes is None:
        if extra_table:
            print("warning: --embeddings given without --classes: using the checkpoint's classes only; "
                  "name the extra classes in --classes", file=sys.stderr)
        wanted = ckpt_names
    else:
        wanted = read_names(classes, "--classes")
    if len(wanted) > MAX_CLASSES:
        raise ConfigError(f"--classes: {len(wanted)} classes, at most {MAX_CLASSES} fit a palette mask")
    names, rows, extra = [], [], []
    for name in wanted:
        key = canonical_name(name)
        if key in ckpt_index:
            names.append(ckpt_names[ckpt_index[key]])
            rows.append(trained.embeddings[ckpt_index[key]])
        elif key in extra_table:
            extra.append(len(names))
            names.append(extra_table[key][0])
            rows.append(extra_table[key][1])
        else:
            raise ConfigError(unknown_class_message(name, ckpt_names, [n for n, _ in extra_table.values()], embeddings))
    chosen = ClassChoice(names, torch.stack(rows).float(), [], extra)
    chosen.unseen = resolve_unseen(chosen, unseen, {canonical_name(ckpt_names[i]) for i in trained.split.unseen})
    return chosen


def unknown_class_message(name: str, ckpt_names: Sequence[str], extra_names: Sequence[str],
                          embeddings: str | None) -> str:
    """One-line error for a class found neither in the checkpoint nor in --embeddings."""
    message = f"--classes: unknown class {name!r}; checkpoint classes: {', '.join(ckpt_names)}"
    if embeddings:
        message += f"; in {embeddings}: {', '.join(extra_names)}"
    else:
        message += "; other classes need an embedding: add --embeddings FILE"
    return message


def resolve_unseen(chosen: ClassChoice, unseen: str | None, ckpt_unseen: set[str]) -> list[int]:
    """Indices to calibrate: exactly ``--unseen`` when given, else the checkpoint's unseen
    classes among the chosen ones plus every extra class."""
    if unseen is None:
        return sorted({i for i, name in enumerate(chosen.names) if canonical_name(name) in ckpt_unseen}
                      | set(chosen.extra))
    if unseen.strip().lower() in ("", "none"):
        return []
    index = class_index(chosen.names)
    resolved = []
    for name in read_names(unseen, "--unseen"):
        if canonical_name(name) not in index:
            raise ConfigError(f"--unseen: {name!r} is not among the classes of this run: {', '.join(chosen.names)}")
        resolved.append(index[canonical_name(name)])
    return sorted(resolved)


# ----------------------------------------------------------------------------- inference

def load_image(path: Path) -> Image.Image:
    """An RGB image, rotated as its EXIF orientation says; ImageReadError when unreadable."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> 1 x 3 x H x W float, ImageNet-normalised."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    tensor = data.view(image.height, image.width, 3).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((tensor - mean) / std)[None]


def pad_to_multiple(images: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Pad bottom/right with zeros (the mean colour after normalisation) to a multiple of ``multiple``."""
    height, width = images.shape[-2:]
    return F.pad(images, (0, -width % multiple, 0, -height % multiple))


@torch.inference_mode()
def segment(model: torch.nn.Module, image: torch.Tensor, prototypes: torch.Tensor, unseen_mask: torch.Tensor,
            sigma: float, max_size: int = 1024, tile: int = 512, overlap: int = 128,
            amp: str | None = None, tile_batch: int = 4, calibration: str = "top2") -> tuple[torch.Tensor, int]:
    """Labels (H x W, int64, CPU) of one normalised 1 x 3 x H x W image at full resolution.

    The padded image goes through the encoder whole, or in tiles when its longer side
    exceeds ``max_size``; returns the labels and the number of tiles (1 = whole image).
    """
    height, width = image.shape[-2:]
    padded = pad_to_multiple(image)
    if max(height, width) > max_size:
        features = sliding_window_features(model, padded, tile, overlap, amp, batch_size=tile_batch)
        tiles = len(tile_boxes(padded.shape[-2], padded.shape[-1], tile, overlap))
    else:
        features = model_features(model, padded, amp)
        tiles = 1
    labels = full_resolution_labels(features, prototypes, unseen_mask, sigma, tuple(padded.shape[-2:]),
                                    crop=(height, width), mode=calibration)
    return labels[0].cpu(), tiles


# ----------------------------------------------------------------------------- outputs

def save_mask(labels: torch.Tensor, path: Path) -> None:
    """Palette-mode PNG of class indices with the VOC colours."""
    mask = Image.fromarray(labels.to(torch.uint8).numpy())
    mask.putpalette(palette().flatten().tolist())
    mask.save(path)


def save_overlay(image: Image.Image, labels: torch.Tensor, path: Path, alpha: float = 0.5) -> None:
    """The image blended with the class colours (``alpha`` = colour weight)."""
    colours = Image.fromarray(colorize(labels).permute(1, 2, 0).numpy())
    Image.blend(image, colours, alpha).save(path)


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
    width = margin * 3 + swatch + text_w
    height = margin * 2 + row * (len(labels) + len(footer))
    legend = Image.new("RGB", (width, height), "white")
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


def check_outputs(images: Sequence[Path], stems: Sequence[str], out: Path) -> None:
    """Refuse to run when an output file would overwrite one of the input images."""
    inputs = {p.resolve() for p in images}
    planned = [out / f"{stem}{suffix}" for stem in stems for suffix in OUTPUT_SUFFIXES] + [out / f for f in RUN_FILES]
    clash = [p for p in planned if p.resolve() in inputs]
    if clash:
        raise ConfigError(f"--out: writing {clash[0]} would overwrite an input image; choose another --out")


# ----------------------------------------------------------------------------- driver

def run(args: argparse.Namespace) -> int:
    """Segment every image; returns the exit status (0, or 1 when some images were skipped)."""
    check_options(args)
    out = Path(args.out)
    images = collect_images(args.images, skip_dir=out)
    stems = output_stems(images)
    check_outputs(images, stems, out)
    device = resolve_device(args.device)
    config = read_json(args.config) if args.config else None
    trained = load_trained_model(args.checkpoint, device, config=config, config_source=args.config or "config")
    chosen = choose_classes(trained, args.classes, args.embeddings, args.embedding_classes, args.unseen, args.normalize)
    sigma = args.sigma if args.sigma is not None else float((trained.config.get("inference") or {}).get("sigma", 1.0))
    prototypes = trained.prototypes(chosen.embeddings.to(device))
    unseen_mask = chosen.unseen_mask().to(device)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "classes.txt").write_text("".join(f"{name}\n" for name in chosen.names))
        save_legend(chosen.names, chosen.unseen, sigma, out / "legend.png")
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write ({err.strerror or err})") from None
    unseen_names = ", ".join(chosen.names[i] for i in chosen.unseen) or "none"
    print(f"{len(images)} image(s), {len(chosen.names)} classes (unseen: {unseen_names}; sigma {sigma:g}), "
          f"device {device}{', ' + args.amp if args.amp else ''} -> {out}")
    skipped = 0
    for path, stem in zip(images, stems):
        start = time.perf_counter()
        try:
            image = load_image(path)
        except ImageReadError as err:
            print(f"warning: {err}; skipped", file=sys.stderr)
            skipped += 1
            continue
        try:
            labels, tiles = segment(trained.model, image_to_tensor(image).to(device), prototypes, unseen_mask, sigma,
                                    args.max_size, args.tile, args.overlap, args.amp, args.tile_batch,
                                    trained.config.get("inference", {}).get("calibration", "top2"))
        except torch.OutOfMemoryError:
            raise ConfigError(f"{path}: out of memory on {device} for a {image.width}x{image.height} image; "
                              f"lower --max-size/--tile (sliding window) or use --amp bf16") from None
        save_mask(labels, out / f"{stem}_mask.png")
        save_overlay(image, labels, out / f"{stem}_overlay.png", args.alpha)
        mode = f"  [{tiles} tiles]" if tiles > 1 else ""
        print(f"{path.name}  {image.width}x{image.height}  {time.perf_counter() - start:.2f}s  "
              f"{describe(labels, chosen.names)}{mode}", flush=True)
    if skipped:
        print(f"warning: {skipped} of {len(images)} image(s) could not be read", file=sys.stderr)
    return 1 if skipped else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; ``error: ...`` on stderr and status 2 for user errors."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
