"""On-disk dataset layouts: where a split's list file, images and labels are under ``data.root``.

A split is a list-file name (the layout's pattern) or a root-relative list-file path, whose lines
are stems (``2007_000032``) or ``image label`` path pairs (VOC ``train_aug``, CamVid); a Custom
split may also be two folders, ``{"images": "train", "labels": "trainannot"}``, paired by stem.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.serialization import safe_globals

from data_loader.dataset import LabelDict, LabelFiles, Sample
from utils.errors import ConfigError
from utils.schema import LAYOUT_KEYS, DataSection

# Folder conventions of each layout; every entry can be overridden by the same key in ``data``.
_VOC = {"image_dir": "JPEGImages", "image_ext": ".jpg", "label_dir": "SegmentationClass", "label_ext": ".png",
        "list_dir": "ImageSets/Segmentation", "list_name": "{split}.txt", "label_classes": None}
LAYOUTS: dict[str, dict] = {
    "voc": _VOC,
    "context-official": {"image_dir": "JPEGImages", "image_ext": ".jpg", "label_file": "59_labels.pth",
                         "list_dir": ".", "list_name": "pascal_context_{split}.txt", "label_classes": None},
    "context-png": {**_VOC, "label_dir": "SegmentationClassContext", "list_dir": "ImageSets/SegmentationContext",
                    "label_classes": "context-png"},
    "synthetic": {**_VOC, "image_ext": ".png"},   # what data_loader.synthetic writes: lossless images
    # Custom: a split is a root-relative list file or two folders; an extension None: any of
    # IMAGE_EXTENSIONS / LABEL_EXTENSIONS in folders, .jpg/.png for stem lines (which need both dirs).
    "custom": {"image_dir": None, "image_ext": None, "label_dir": None, "label_ext": None, "list_dir": ".",
               "list_name": "{split}", "label_classes": None, "folder_splits": True},
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")  # lossless only: a JPEG label would be corrupt


def layout_settings(data: DataSection, source: str = "config") -> dict:
    """The layout conventions for ``data.type`` (and ``data.layout``), with the config's overrides."""
    name = f"context-{data.layout or 'official'}" if data.type == "Context" else data.type.lower()
    settings = dict(LAYOUTS[name])
    for key in LAYOUT_KEYS:
        value = getattr(data, key)
        if value is not None:
            if key not in settings:
                raise ConfigError(f"data.{key}: not used by the {name} layout (file {source})")
            settings[key] = value
    return settings


def split_list_path(root: Path, split: str, settings: dict) -> Path:
    """The list file of ``split``: a file name pattern of the layout, or a root-relative path."""
    if "/" in split or split.endswith(".txt"):
        return root / split
    return root / settings["list_dir"] / settings["list_name"].format(split=split)


def list_samples(root: Path, split: str, settings: dict, key: str, source: str = "config") -> list[Sample]:
    """Parse a split's list file into samples (paths are not checked here)."""
    path = split_list_path(root, split, settings)
    if not path.is_file():
        raise ConfigError(f"{key}: list file {path} not found for split {split!r} (file {source})")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) > 2:
            raise ConfigError(f"{path}:{number}: expected 'stem' or 'image label', got {line.strip()!r}")
        if len(tokens) == 1:
            if settings.get("image_dir") is None or ("label_file" not in settings and not settings.get("label_dir")):
                raise ConfigError(f"{path}:{number}: a stem line ({tokens[0]!r}) needs data.image_dir and "
                                  f"data.label_dir; or write 'image label' path pairs (file {source})")
            stem = tokens[0]
            image = root / settings["image_dir"] / f"{stem}{settings['image_ext'] or '.jpg'}"
            label_path = root / settings["label_dir"] / f"{stem}{settings['label_ext'] or '.png'}" \
                if "label_dir" in settings else None
        else:
            image, label_path = root / tokens[0].lstrip("/"), root / tokens[1].lstrip("/")
            stem = image.stem
        samples.append(Sample(stem, image, stem if "label_file" in settings else label_path))
    if not samples:
        raise ConfigError(f"{path}: list file is empty")
    return samples


def folder_samples(root: Path, spec: dict, settings: dict, key: str, source: str = "config") -> list[Sample]:
    """Samples of a two-folder split ``{"images": dir, "labels": dir}`` (root-relative), paired
    by file stem; an image without label or a label without image is a ConfigError naming it."""
    if set(spec) != {"images", "labels"} or not all(isinstance(v, str) and v for v in spec.values()):
        raise ConfigError(f"{key}: expected {{\"images\": \"folder\", \"labels\": \"folder\"}} or a list file, "
                          f"got {spec!r} (file {source})")
    found: dict[str, dict[str, Path]] = {}
    for part, what, default in (("images", "image", IMAGE_EXTENSIONS), ("labels", "label", LABEL_EXTENSIONS)):
        folder = root / spec[part]
        if not folder.is_dir():
            raise ConfigError(f"{key}.{part}: folder {folder} not found (file {source})")
        ext = settings.get(f"{what}_ext")
        extensions = default if ext is None else (str(ext).lower(),)
        by_stem = found[part] = {}
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in extensions:
                continue
            if path.stem in by_stem:
                raise ConfigError(f"{key}: two {what} files with stem {path.stem!r}: {by_stem[path.stem]} and {path}")
            by_stem[path.stem] = path
        if not by_stem:
            raise ConfigError(f"{key}.{part}: no {'/'.join(extensions)} files in {folder} (file {source})")
    images, labels = found["images"], found["labels"]
    lonely = [f"image {images[s]} has no label in {root / spec['labels']}" for s in images if s not in labels]
    lonely += [f"label {labels[s]} has no image in {root / spec['images']}" for s in labels if s not in images]
    if lonely:
        more = f" (and {len(lonely) - 1} more)" if len(lonely) > 1 else ""
        raise ConfigError(f"{key}: {lonely[0]}{more} (file {source})")
    return [Sample(stem, images[stem], labels[stem]) for stem in images]


def split_samples(root: Path, split: str | dict, settings: dict, key: str, source: str = "config") -> list[Sample]:
    """The samples of a split: a list file (see :func:`list_samples`) or, for the Custom
    layout, two folders (see :func:`folder_samples`)."""
    folders = settings.get("folder_splits", False)
    if isinstance(split, dict) and folders:
        return folder_samples(root, split, settings, key, source)
    if not isinstance(split, str) or not split:
        kinds = "a list file or {\"images\": ..., \"labels\": ...}" if folders else "a split name or a list file"
        raise ConfigError(f"{key}: expected {kinds}, got {split!r} (file {source})")
    return list_samples(root, split, settings, key, source)


def split_label(split: str | dict) -> str:
    """How a split is named in tables and ``data.expected_counts``: the list name, or the images folder."""
    return split.get("images", "?") if isinstance(split, dict) else str(split)


def label_source(root: Path, settings: dict) -> LabelFiles | LabelDict:
    """How the layout stores labels: PNG files, or one dictionary file (stem -> label) loaded once."""
    if "label_file" not in settings:
        return LabelFiles()
    path = root / settings["label_file"]
    if not path.is_file():
        raise ConfigError(f"{path}: label file not found (data.label_file)")
    allowed = [np._core.multiarray._reconstruct, (np._core.multiarray._reconstruct,
               "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, np.dtypes.UInt8DType,
               np.dtypes.Int16DType, np.dtypes.UInt16DType, np.dtypes.Int32DType, np.dtypes.Int64DType]
    try:
        with safe_globals(allowed):
            labels = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - one line naming the file
        raise ConfigError(f"{path}: cannot read the label dictionary ({type(err).__name__})") from None
    if not isinstance(labels, dict):
        raise ConfigError(f"{path}: expected a dict from file stem to label, got {type(labels).__name__}")
    return LabelDict(path, labels)
