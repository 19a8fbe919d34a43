"""On-disk dataset layouts: where a split's list file, images and labels are under ``data.root``.

A split is a list-file name (resolved with the layout's pattern) or a path to a list file
(relative to the root). Each list line is either a file stem (``2007_000032``) or an
``image label`` pair of root-relative paths (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``,
as in the augmented VOC ``train_aug`` list).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.serialization import safe_globals

from data_loader.dataset import LabelDict, LabelFiles, Sample
from utils.util import ConfigError

# Folder conventions of each layout; every entry can be overridden by the same key in ``data``.
LAYOUTS: dict[str, dict] = {
    "voc": {"image_dir": "JPEGImages", "image_ext": ".jpg", "label_dir": "SegmentationClass",
            "label_ext": ".png", "list_dir": "ImageSets/Segmentation", "list_name": "{split}.txt",
            "label_classes": None},
    "context-official": {"image_dir": "JPEGImages", "image_ext": ".jpg", "label_file": "59_labels.pth",
                         "list_dir": ".", "list_name": "pascal_context_{split}.txt", "label_classes": None},
    "context-png": {"image_dir": "JPEGImages", "image_ext": ".jpg", "label_dir": "SegmentationClassContext",
                    "label_ext": ".png", "list_dir": "ImageSets/SegmentationContext", "list_name": "{split}.txt",
                    "label_classes": "context-png"},
    # What data_loader.synthetic writes: the VOC layout with lossless PNG images.
    "synthetic": {"image_dir": "JPEGImages", "image_ext": ".png", "label_dir": "SegmentationClass",
                  "label_ext": ".png", "list_dir": "ImageSets/Segmentation", "list_name": "{split}.txt",
                  "label_classes": None},
}
OVERRIDABLE = ("image_dir", "image_ext", "label_dir", "label_ext", "label_file", "label_classes")
CONTEXT_LAYOUTS = ("official", "png")


def layout_settings(data_cfg: dict, source: str = "config") -> dict:
    """The layout conventions for ``data.type`` (and ``data.layout``), with config overrides."""
    kind = data_cfg.get("type")
    if kind == "Context":
        layout = data_cfg.get("layout", "official")
        if layout not in CONTEXT_LAYOUTS:
            raise ConfigError(f"data.layout: unknown {layout!r} (file {source}); valid: {', '.join(CONTEXT_LAYOUTS)}")
        name = f"context-{layout}"
    else:
        name = str(kind).lower()
    settings = dict(LAYOUTS[name])
    for key in OVERRIDABLE:
        if key in data_cfg:
            if key not in settings:
                raise ConfigError(f"data.{key}: not used by the {name} layout (file {source})")
            settings[key] = data_cfg[key]
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
            stem = tokens[0]
            image = root / settings["image_dir"] / f"{stem}{settings['image_ext']}"
            label_path = root / settings["label_dir"] / f"{stem}{settings['label_ext']}" \
                if "label_dir" in settings else None
        else:
            image, label_path = root / tokens[0].lstrip("/"), root / tokens[1].lstrip("/")
            stem = image.stem
        samples.append(Sample(stem, image, stem if "label_file" in settings else label_path))
    if not samples:
        raise ConfigError(f"{path}: list file is empty")
    return samples


def _load_label_dict(path: Path) -> dict:
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
    return labels


def label_source(root: Path, settings: dict) -> LabelFiles | LabelDict:
    """How the layout stores labels: PNG files, or one dictionary file loaded once."""
    if "label_file" in settings:
        path = root / settings["label_file"]
        return LabelDict(path, _load_label_dict(path))
    return LabelFiles()
