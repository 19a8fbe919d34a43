"""The segmentation dataset: reads an image and its label, checks them, remaps and transforms.

A missing or unreadable file, a label value that is neither a class, ignored nor 255, and an
image/label size mismatch are a :class:`DataError` naming the file (logged and skipped with
``skip_bad_samples``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from data_loader.classes import canonical_name, class_index
from data_loader.transforms import apply
from utils.errors import ConfigError, DataError, first_line
from utils.schema import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image and where its label is: a PNG path, or a key into a label dictionary."""

    name: str
    image: Path
    label: Path | str


def read_image(path: Path, exif_transpose: bool = False) -> torch.Tensor:
    """Decode an RGB image file to a uint8 tensor 3xHxW; DataError naming the file on failure.

    ``exif_transpose`` turns the image as its EXIF orientation says (photos to segment; not for
    datasets, whose label maps follow the stored pixel grid)."""
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img) if exif_transpose else img
            array = np.array(img if img.mode == "RGB" else img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({first_line(err)})") from None
    return torch.from_numpy(array).permute(2, 0, 1)


class LabelFiles:
    """Labels stored as one PNG per image (``Sample.label`` is the path)."""

    def read(self, sample: Sample) -> np.ndarray:
        """The single-channel class-index PNG (grayscale or palette) as an integer array."""
        path = Path(sample.label)
        try:
            with Image.open(path) as img:
                mode, array = img.mode, np.asarray(img)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DataError(f"{path}: cannot read label ({first_line(err)})") from None
        if mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"{path}: label must be a single-channel class-index PNG (grayscale or palette), "
                            f"got mode {mode}")
        return array

    def describe(self, sample: Sample) -> str:
        return str(sample.label)

    def missing(self, sample: Sample) -> str | None:
        """An error line when the label file does not exist, else None."""
        return None if Path(sample.label).is_file() else f"{sample.label}: label file not found"


class LabelDict:
    """Labels stored in one dictionary file, file stem -> HxW label (``Sample.label`` is the key)."""

    def __init__(self, path: Path, labels: Mapping[str, Any]):
        self.path = Path(path)
        self.labels = labels

    def read(self, sample: Sample) -> np.ndarray:
        label = self.labels[sample.label]
        array = label.numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
        if array.ndim != 2:
            raise DataError(f"{self.describe(sample)}: label must be 2-D, got shape {tuple(array.shape)}")
        return array

    def describe(self, sample: Sample) -> str:
        return f"{self.path}[{sample.label!r}]"

    def missing(self, sample: Sample) -> str | None:
        """An error line when the dictionary has no label for the sample, else None."""
        return None if sample.label in self.labels else f"{self.describe(sample)}: no label for this image"


def remap_table(label_names: Sequence[str], target_names: Sequence[str], where: str,
                ignored: Sequence[int] = ()) -> np.ndarray:
    """Lookup table raw value -> class index in ``target_names`` (matched by name), the
    ``ignored`` raw values and 255 -> 255, anything else -> -1 (invalid). Every label class
    that is not ignored must exist in the target list."""
    table = np.full(256, -1, dtype=np.int16)
    target = class_index(target_names)
    ignored = set(ignored)
    for raw, name in enumerate(label_names):
        if raw in ignored:
            continue
        if canonical_name(name) not in target:
            raise ConfigError(f"{where}: label class {name!r} is not in the class list "
                              f"({', '.join(target_names)}); to ignore its pixels, add it to data.ignore_labels")
        table[raw] = target[canonical_name(name)]
    table[sorted(ignored | {IGNORE_INDEX})] = IGNORE_INDEX
    return table


def value_ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 7, 255]`` -> ``"0..3, 7, 255"``."""
    runs = [[value for _, value in run]   # consecutive values: equal value - position
            for _, run in groupby(enumerate(sorted(set(map(int, values)))), lambda pair: pair[1] - pair[0])]
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}..{run[-1]}" for run in runs)


def ignore_table(ignored: Sequence[int]) -> np.ndarray:
    """Lookup table class index -> itself, or 255 for the ``ignored`` classes."""
    table = np.arange(256, dtype=np.uint8)
    table[list(ignored)] = IGNORE_INDEX
    return table


class SegmentationDataset(Dataset):
    """Items ``{"image": float32 3xHxW, "label": int64 HxW (255 = ignore), "name": str}``; ``remap``
    (:func:`remap_table`) and ``ignore`` (:func:`ignore_table`) map raw label values to targets."""

    def __init__(self, samples: Sequence[Sample], labels: LabelFiles | LabelDict, remap: np.ndarray,
                 ignore: np.ndarray, transform: Callable, skip_bad_samples: bool = False):
        self.samples = list(samples)
        self.labels = labels
        self.remap = remap
        self.ignore = ignore
        self.transform = transform
        self.skip_bad_samples = skip_bad_samples

    def __len__(self) -> int:
        return len(self.samples)

    def missing(self, index: int) -> str | None:
        """An error line when the image or label of sample ``index`` does not exist, else None."""
        sample = self.samples[index]
        if not sample.image.is_file():
            return f"{sample.image}: image file not found"
        return self.labels.missing(sample)

    def read_raw_label(self, index: int) -> np.ndarray:
        """The label of sample ``index`` as stored (values 0..255), before remapping."""
        sample = self.samples[index]
        error = self.labels.missing(sample)
        if error:
            raise DataError(error)
        raw = self.labels.read(sample)
        if raw.dtype != np.uint8:
            raw = raw.astype(np.int64)
            if raw.size and (raw.min() < 0 or raw.max() > 255):
                bad = np.unique(raw[(raw < 0) | (raw > 255)])[:5].tolist()
                raise DataError(f"{self.labels.describe(sample)}: label values {bad} are neither class "
                                f"indices nor {IGNORE_INDEX}")
        return raw

    def remap_label(self, index: int, raw: np.ndarray) -> np.ndarray:
        """Raw label values of sample ``index`` -> class indices (uint8, 255 = ignore); DataError
        naming the file for a value that is neither a class, ignored, nor 255."""
        mapped = self.remap[raw]
        if (mapped < 0).any():
            bad = np.unique(raw[mapped < 0])[:5].tolist()
            valid = value_ranges(np.flatnonzero(self.remap[:IGNORE_INDEX] >= 0).tolist())
            raise DataError(f"{self.labels.describe(self.samples[index])}: label values {bad} are neither class "
                            f"indices {valid} nor {IGNORE_INDEX}")
        return mapped.astype(np.uint8)

    def read_label(self, index: int) -> np.ndarray:
        """The label of sample ``index`` as class indices (uint8, 255 = ignore), before ignoring."""
        return self.remap_label(index, self.read_raw_label(index))

    def read_with_raw(self, index: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """Checked uint8 image (3xHxW), class-index label (HxW) and raw label of sample ``index``."""
        sample = self.samples[index]
        image = read_image(sample.image)
        raw = self.read_raw_label(index)
        label = self.remap_label(index, raw)
        if tuple(image.shape[1:]) != label.shape:
            raise DataError(f"{self.labels.describe(sample)}: label size {label.shape[1]}x{label.shape[0]} "
                            f"differs from image {sample.image} size {image.shape[2]}x{image.shape[1]}")
        return image, label, raw

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Sample ``key``: an index, or ``(index, seed)`` from the training sampler, in which case
        the random augmentation draws from ``seed`` alone (the global RNG is left untouched)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        for attempt in range(len(self.samples)):
            current = (index + attempt) % len(self.samples)
            try:
                image, label, _ = self.read_with_raw(current)
                break
            except DataError as err:
                if not self.skip_bad_samples:
                    raise
                log.warning("skipping bad sample: %s", err)
        else:
            raise DataError("every sample of the dataset is bad (see the warnings above)")
        target = torch.from_numpy(self.ignore[label])
        if seed is None:
            image, target = apply(self.transform, image, target)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image, target = apply(self.transform, image, target)
        return {"image": image, "label": target, "name": self.samples[current].name}
