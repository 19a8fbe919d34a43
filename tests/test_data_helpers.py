"""Builders of tiny VOC / Context trees for the data tests (no tests here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data_loader.classes import VOC_CLASSES

# A distinct colour per class value, so an image pixel tells which label it sits on.
CLASS_COLOURS = np.array([[(37 * v) % 256, (91 * v + 40) % 256, (53 * v + 90) % 256] for v in range(256)],
                         dtype=np.uint8)


def image_for(label: np.ndarray) -> np.ndarray:
    """An RGB image whose colour encodes the label value at each pixel."""
    return CLASS_COLOURS[label]


def write_label(path: Path, label: np.ndarray, palette: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    label = label.astype(np.uint8)
    if palette:
        img = Image.frombytes("P", label.shape[::-1], label.tobytes())
        img.putpalette(CLASS_COLOURS.ravel().tolist())
    else:
        img = Image.fromarray(label)
    img.save(path)


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def blank_label(height: int = 24, width: int = 32, objects: dict[int, tuple[slice, slice]] | None = None):
    """A background label with rectangles of the given class values."""
    label = np.zeros((height, width), dtype=np.uint8)
    for value, (rows, cols) in (objects or {}).items():
        label[rows, cols] = value
    return label


def make_voc(root: Path, splits: dict[str, dict[str, np.ndarray]], image_ext: str = ".jpg",
             label_dir: str = "SegmentationClass") -> Path:
    """Write ``JPEGImages``, ``<label_dir>`` and ``ImageSets/Segmentation/<split>.txt`` stems."""
    for split, labels in splits.items():
        for stem, label in labels.items():
            write_image(root / "JPEGImages" / f"{stem}{image_ext}", image_for(label))
            write_label(root / label_dir / f"{stem}.png", label)
        lists = root / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("".join(f"{stem}\n" for stem in labels))
    return root


def write_embeddings(path: Path, rows: int, dim: int = 8, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32))
    return str(path)


def voc_cfg(root: Path, embeddings: str, **overrides) -> dict:
    """A complete ``data`` section for a tiny VOC tree."""
    cfg = {
        "type": "VOC", "root": str(root), "classes": "voc", "unseen_classes": "zs3-2",
        "embeddings": {"paths": [embeddings], "normalize": "max_norm"},
        "train_split": "train", "val_split": "val",
        "base_size": 24, "crop_size": 24, "scale_range": [0.5, 1.5],
        "remove_unseen_images": True, "ignore_bg": False, "ignore_unseen": False, "skip_bad_samples": False,
    }
    cfg.update(overrides)
    return cfg


COW, MOTORBIKE, SHEEP = VOC_CLASSES.index("cow"), VOC_CLASSES.index("motorbike"), VOC_CLASSES.index("sheep")


def standard_voc(tmp_path: Path, image_ext: str = ".jpg") -> tuple[Path, str]:
    """train: 5 images (one with cow, one with motorbike); val: 3 images (one with cow)."""
    box = (slice(4, 12), slice(6, 20))
    train = {
        "t0": blank_label(objects={SHEEP: box}),
        "t1": blank_label(objects={COW: box}),
        "t2": blank_label(objects={MOTORBIKE: box, 15: (slice(14, 20), slice(0, 8))}),
        "t3": blank_label(objects={15: box}),
        "t4": blank_label(),
    }
    val = {"v0": blank_label(objects={COW: box}), "v1": blank_label(objects={SHEEP: box}),
           "v2": blank_label(30, 20, objects={1: box})}
    root = make_voc(tmp_path / "VOC2012", {"train": train, "val": val}, image_ext)
    return root, write_embeddings(tmp_path / "emb.npy", len(VOC_CLASSES))
