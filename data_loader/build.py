"""From a config's ``data`` section to a class split, embeddings and the train / selection / test datasets."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data_loader.classes import ClassSplit, canonical_name, load_class_names, parse_class_split, resolve_indices
from data_loader.dataset import LabelDict, LabelFiles, SegmentationDataset, ignore_table, remap_table
from data_loader.embeddings import class_embeddings
from data_loader.layouts import label_source, layout_settings, split_label, split_list_path, split_samples
from data_loader.scan import SampleCheck, check_exists, scan
from data_loader.synthetic import ensure_synthetic
from data_loader.transforms import train_transform, val_transform
from utils.errors import ConfigError, DataError
from utils.logger import progress_enabled
from utils.schema import DataSection, SyntheticSection, as_data_section

log = logging.getLogger(__name__)


@dataclass
class DataSource:
    """A resolved ``data`` section: root folder, layout conventions and the class split."""

    data: DataSection
    source: str
    root: Path
    layout: dict
    split: ClassSplit
    remap: np.ndarray  # raw label value -> class index (see dataset.remap_table)
    label_names: tuple[str, ...] = ()  # names of the raw label values (index = value)
    ignored_values: tuple[int, ...] = ()  # raw values mapped to 255 (data.ignore_labels)

    @cached_property
    def labels(self) -> LabelFiles | LabelDict:
        return label_source(self.root, self.layout)

    def embeddings(self) -> torch.Tensor:
        return class_embeddings(self.data.embeddings, self.split.names, self.source)

    def dataset(self, split: Any, key: str, train: bool) -> SegmentationDataset:
        """Every sample listed for ``split`` (the config's ``data.<key>``), with train or val transforms."""
        data = self.data
        if split is None:
            raise ConfigError(f"data.{key}: missing (file {self.source})")
        samples = split_samples(self.root, split, self.layout, f"data.{key}", self.source)
        ignored = [0] if self.split.ignore_bg else []
        if train and data.ignore_unseen:
            ignored += list(self.split.unseen)
        transform = train_transform(data.base_size, data.crop_size, data.scale_range, data.hflip) if train \
            else val_transform()
        return SegmentationDataset(samples, self.labels, self.remap, ignore_table(ignored), transform,
                                   data.skip_bad_samples)


def resolve(data: DataSection | Mapping, source: str = "config", progress: bool = True,
            training: bool = False) -> DataSource:
    """Check the section (for training too with ``training``), generate the synthetic data if needed,
    parse the class split."""
    data = as_data_section(data, source)
    problem = data.missing(training)
    if problem:
        raise ConfigError(f"{problem} (file {source})")
    layout = layout_settings(data, source)
    if data.type == "Synthetic":
        root = ensure_synthetic(data.synthetic or SyntheticSection(), progress and progress_enabled())
        data = data.resolved(root)
    else:
        root = Path(data.root)
        if not root.is_dir():
            raise ConfigError(f"data.root: folder {root} not found (file {source})")
    split = parse_class_split(data, source)
    spec = layout.get("label_classes")
    label_names = split.names if spec is None else load_class_names(spec, "data.label_classes", source)
    ignored = ignored_values(data.ignore_labels, label_names, split.names, source)
    remap = remap_table(label_names, split.names, f"data.label_classes (file {source})", ignored)
    chosen, reported = data.selection_split, data.val_split
    if isinstance(chosen, str) and isinstance(reported, str) and \
            split_list_path(root, chosen, layout).resolve() == split_list_path(root, reported, layout).resolve():
        raise ConfigError(f"data.selection_split: {data.selection_split!r} lists the same images as the reported "
                          f"split {data.val_split!r}; a checkpoint is never chosen on the split that is reported "
                          f"(file {source})")
    return DataSource(data, source, root, layout, split, remap, tuple(label_names), ignored)


def ignored_values(spec: Any, label_names: Sequence[str], class_names: Sequence[str],
                   source: str = "config") -> tuple[int, ...]:
    """``data.ignore_labels``: raw label values (0..254) and/or names of raw label classes
    (``data.label_classes``) whose pixels become 255. A class of ``data.classes`` cannot be
    ignored (it would never be learned); leave it out of ``classes`` instead."""
    classes = {canonical_name(name) for name in class_names}

    def learned(item: Any, value: int) -> str | None:
        if value < len(label_names) and canonical_name(label_names[value]) in classes:
            return (f"data.ignore_labels: {item!r} is the class {label_names[value]!r} of data.classes; to ignore it, "
                    f"name the label values in data.label_classes and leave it out of data.classes (file {source})")
        return None
    return tuple(sorted(resolve_indices(
        spec if isinstance(spec, (list, tuple)) else [spec], label_names, limit=255, check=learned,
        out_of_range=lambda item: f"data.ignore_labels: value {item} out of range 0..254 (255 is always ignored) "
                                  f"(file {source})",
        unknown=lambda item: f"data.ignore_labels: {item!r} is neither a label value nor a label class "
                             f"({', '.join(label_names)}) (file {source})",
        duplicate=lambda item, value: f"data.ignore_labels: {item!r} is listed twice (file {source})")))


@dataclass
class SplitCounts:
    """Per-split counts: listed, bad, containing unseen pixels, and the kept sample indices."""

    total: int
    bad: list[str] = field(default_factory=list)
    with_unseen: int = 0
    kept: list[int] = field(default_factory=list)


def count(checks: Sequence[SampleCheck], unseen: Sequence[int], remove_unseen: bool) -> SplitCounts:
    """Tally sample checks; kept = good samples (without unseen pixels when ``remove_unseen``)."""
    counts, unseen = SplitCounts(len(checks)), set(unseen)
    for index, check in enumerate(checks):
        if check.error is not None:
            counts.bad.append(check.error)
            continue
        has_unseen = bool(check.present & unseen)
        counts.with_unseen += has_unseen
        if not (remove_unseen and has_unseen):
            counts.kept.append(index)
    return counts


def carve(names: Sequence[str], holdout: dict) -> list[int]:
    """The indices (sorted) of ``holdout["holdout"]`` samples drawn from ``holdout["seed"]`` alone."""
    if holdout["holdout"] >= len(names):
        raise ConfigError(f"data.selection_split: holdout {holdout['holdout']} leaves no training image of "
                          f"{len(names)}")
    generator = torch.Generator().manual_seed(holdout["seed"])
    return sorted(torch.randperm(len(names), generator=generator)[:holdout["holdout"]].tolist())


def _checked(ds: DataSource, dataset: SegmentationDataset, label: str, key: str, train: bool,
             logger: logging.Logger) -> SegmentationDataset:
    """The dataset without its bad samples (an error unless skipped) and, for training, without the
    images holding unseen pixels (``remove_unseen_images``)."""
    remove = train and ds.data.remove_unseen_images and bool(ds.split.unseen)
    if train:   # labels read when unseen images are removed, else only existence (images are read each epoch)
        checks = scan(dataset, desc=f"scanning {label} labels") if remove else check_exists(dataset)
    else:       # evaluation reads each file once: check every image and label now, before any training
        checks = scan(dataset, read_image=True, desc=f"checking {label}")
    counts = count(checks, ds.split.unseen, remove)
    if counts.bad:
        if not dataset.skip_bad_samples:
            more = f" (and {len(counts.bad) - 1} more; list them with python -m data_loader.verify)" \
                if len(counts.bad) > 1 else ""
            raise DataError(counts.bad[0] + more)
        for error in counts.bad:
            logger.warning("skipping bad sample: %s", error)
    dataset.samples = [dataset.samples[i] for i in counts.kept]
    removed = f", {counts.with_unseen} with unseen-class pixels removed" if remove else ""
    logger.info("data.%s %r: %d listed, %d bad%s, %d used", key, label, counts.total, len(counts.bad), removed,
                len(dataset))
    if not len(dataset):
        raise ConfigError(f"data.{key}: no usable sample left (file {ds.source})")
    return dataset


@dataclass
class DataBundle:
    """What a run needs from the data side: the split, the embeddings, the training set, the
    model-selection set (None: the last epoch's weights are tested) and the reported (test) set."""

    split: ClassSplit
    embeddings: torch.Tensor
    train_set: Dataset | None
    val_set: Dataset | None
    selection_set: Dataset | None = None
    selection: str = "none (the final weights are tested)"   # how the selection set was made, for the banner

    @property
    def selection_names(self) -> list[str]:
        return [sample.name for sample in self.selection_set.samples] if self.selection_set is not None else []


def load_split_and_embeddings(data: DataSection | Mapping, source: str = "config") -> tuple[ClassSplit, torch.Tensor]:
    """The class split and class embeddings alone: no dataset folder is needed (except that
    the synthetic benchmark is generated, since its class list and embeddings come from it)."""
    data = as_data_section(data, source)
    if data.type == "Synthetic":
        ds = resolve(data, source)
        return ds.split, ds.embeddings()
    split = parse_class_split(data, source)
    return split, class_embeddings(data.embeddings, split.names, source)


def prepare_data(data: DataSection | Mapping, *, train: bool = True, val: bool = True, source: str = "config",
                 logger: logging.Logger | None = None) -> DataBundle:
    """The class split, the class embeddings and the requested datasets, every setting checked first;
    the training split loses its images with unseen pixels (``remove_unseen_images``) and its
    ``{"holdout": N}`` selection images; bad files fail here (or are skipped: ``skip_bad_samples``)."""
    logger = logger or log
    ds = resolve(data, source, training=train)
    data = ds.data
    embeddings = ds.embeddings()
    logger.info("classes: %d (%s unseen: %s), embeddings %s", ds.split.num_classes, len(ds.split.unseen),
                ", ".join(ds.split.unseen_names), tuple(embeddings.shape))
    bundle = DataBundle(ds.split, embeddings, None, None)
    if train:
        train_set = ds.dataset(data.train_split, "train_split", train=True)
        label = split_label(data.train_split)
        if data.holdout is not None:
            chosen = set(carve([s.name for s in train_set.samples], data.holdout))
            held = ds.dataset(data.train_split, "train_split", train=False)
            held.samples = [s for i, s in enumerate(train_set.samples) if i in chosen]
            train_set.samples = [s for i, s in enumerate(train_set.samples) if i not in chosen]
            bundle.selection_set = _checked(ds, held, f"{label} holdout", "selection_split", False, logger)
            bundle.selection = (f"{len(chosen)} images carved from {label!r} (seed {data.holdout['seed']}; "
                                "not trained on)")
        elif data.selection_split is not None:
            selection = ds.dataset(data.selection_split, "selection_split", train=False)
            bundle.selection_set = _checked(ds, selection, split_label(data.selection_split), "selection_split",
                                            False, logger)
            bundle.selection = f"the split {split_label(data.selection_split)!r}"
        bundle.train_set = _checked(ds, train_set, label, "train_split", True, logger)
    if val:
        bundle.val_set = _checked(ds, ds.dataset(data.val_split, "val_split", train=False),
                                  split_label(data.val_split), "val_split", False, logger)
    return bundle
