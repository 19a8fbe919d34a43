"""Walking a dataset's files: existence checks, full reads, and which classes each label holds."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from data_loader.dataset import SegmentationDataset
from utils.errors import DataError
from utils.logger import progress_enabled
from utils.schema import IGNORE_INDEX


@dataclass(frozen=True)
class SampleCheck:
    """Classes present in a sample's label (before ignoring) and its raw label values, or the
    error that made it bad."""

    present: frozenset[int] = frozenset()
    error: str | None = None
    values: frozenset[int] = frozenset()


def _present(label: np.ndarray, keep_ignore: bool = False) -> frozenset[int]:
    counts = np.bincount(label.ravel(), minlength=256)
    if not keep_ignore:
        counts[IGNORE_INDEX] = 0
    return frozenset(np.flatnonzero(counts).tolist())


def check_sample(dataset: SegmentationDataset, index: int, read_image: bool) -> SampleCheck:
    """Read sample ``index`` (its label, and its image when ``read_image``) and report."""
    try:
        if read_image:
            _, label, raw = dataset.read_with_raw(index)
        else:
            missing = dataset.missing(index)
            if missing:
                return SampleCheck(error=missing)
            raw = dataset.read_raw_label(index)
            label = dataset.remap_label(index, raw)
    except DataError as err:
        return SampleCheck(error=str(err))
    return SampleCheck(_present(label), values=_present(raw, keep_ignore=True))


def check_exists(dataset: SegmentationDataset) -> list[SampleCheck]:
    """Only check that every image and label exists (fast: no decoding)."""
    return [SampleCheck(error=dataset.missing(index)) for index in range(len(dataset))]


def scan(dataset: SegmentationDataset, read_image: bool = False, desc: str | None = None) -> list[SampleCheck]:
    """Check every sample in a thread pool (decoding releases the GIL); a tqdm bar when ``desc``."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        results = pool.map(lambda i: check_sample(dataset, i, read_image), range(len(dataset)))
        return list(tqdm(results, total=len(dataset), desc=desc, disable=desc is None or not progress_enabled(),
                         leave=False))
