"""From a config's ``data`` section to a class split, embeddings and train/val datasets."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from data_loader.classes import ClassSplit, canonical_name, load_class_names, parse_class_split, resolve_indices
from data_loader.dataset import LabelDict, LabelFiles, SegmentationDataset, ignore_table, remap_table
from data_loader.embeddings import class_embeddings
from data_loader.layouts import label_source, layout_settings, split_label, split_samples
from data_loader.scan import SampleCheck, check_exists, scan
from data_loader.synthetic import SyntheticParams, ensure_synthetic
from data_loader.transforms import train_transform, val_transform
from utils.errors import ConfigError, DataError
from utils.logger import progress_enabled
from utils.schema import DATA_KEYS, DATASET_TYPES

log = logging.getLogger(__name__)

def require(cfg: dict, key: str, source: str, kind: type | tuple[type, ...] = object) -> Any:
    """``cfg[key]`` checked for presence and type; ConfigError naming ``data.<key>`` otherwise."""
    if key not in cfg:
        raise ConfigError(f"data.{key}: missing (file {source})")
    value = cfg[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind not in (bool, object)):
        raise ConfigError(f"data.{key}: invalid value {value!r} (file {source})")
    return value


def flag(cfg: dict, key: str, default: bool, source: str) -> bool:
    """A boolean option of ``data`` (``default`` when absent)."""
    return require(cfg, key, source, bool) if key in cfg else default


@dataclass
class DataSource:
    """A resolved ``data`` section: root folder, layout conventions and the class split."""

    cfg: dict
    source: str
    root: Path
    settings: dict
    split: ClassSplit
    remap: np.ndarray  # raw label value -> class index (see dataset.remap_table)
    label_names: tuple[str, ...] = ()  # names of the raw label values (index = value)
    ignored_values: tuple[int, ...] = ()  # raw values mapped to 255 (data.ignore_labels)

    @cached_property
    def labels(self) -> LabelFiles | LabelDict:
        return label_source(self.root, self.settings)

    def embeddings(self) -> torch.Tensor:
        return class_embeddings(require(self.cfg, "embeddings", self.source, dict), self.split.names, self.source)

    def dataset(self, split_key: str, train: bool) -> SegmentationDataset:
        """Every sample listed for ``data.<split_key>``, with train or val transforms."""
        cfg, source = self.cfg, self.source
        samples = split_samples(self.root, require(cfg, split_key, source, (str, dict)), self.settings,
                                f"data.{split_key}", source)
        ignored = [0] if self.split.ignore_bg else []
        if train and flag(cfg, "ignore_unseen", False, source):
            ignored += list(self.split.unseen)
        if train:
            scale = require(cfg, "scale_range", source, list)
            if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
                raise ConfigError(f"data.scale_range: expected [low, high] with 0 < low <= high, got {scale} "
                                  f"(file {source})")
            sizes = [require(cfg, key, source, int) for key in ("base_size", "crop_size")]
            if min(sizes) < 1:
                raise ConfigError(f"data.base_size/crop_size: must be positive, got {sizes} (file {source})")
            transform = train_transform(*sizes, scale, hflip=flag(cfg, "hflip", True, source))
        else:
            transform = val_transform()
        return SegmentationDataset(samples, self.labels, self.remap, ignore_table(ignored), transform,
                                   flag(cfg, "skip_bad_samples", False, source))


def resolve(data_cfg: dict, source: str = "config", progress: bool = True) -> DataSource:
    """Check the ``data`` keys, generate the synthetic data if needed, parse the class split."""
    for key in data_cfg:
        if key not in DATA_KEYS:
            raise ConfigError(f"data.{key}: unknown key (file {source}); valid: {', '.join(DATA_KEYS)}")
    kind = require(data_cfg, "type", source, str)
    if kind not in DATASET_TYPES:
        raise ConfigError(f"data.type: unknown {kind!r} (file {source}); valid: {', '.join(DATASET_TYPES)}")
    cfg = dict(data_cfg)
    if kind == "Synthetic":
        if "root" in cfg:
            raise ConfigError(f"data.root: not used by Synthetic, set data.synthetic.cache_dir (file {source})")
        root = ensure_synthetic(SyntheticParams.from_config(cfg.get("synthetic"), source), progress and progress_enabled())
        cfg.setdefault("classes", str(root / "classes.txt"))
        cfg["embeddings"] = {"paths": [str(root / "embeddings.npy")], **(cfg.get("embeddings") or {})}
    else:
        if "synthetic" in cfg:
            raise ConfigError(f"data.synthetic: only used by type Synthetic (file {source})")
        root = Path(require(cfg, "root", source, str))
        if not root.is_dir():
            raise ConfigError(f"data.root: folder {root} not found (file {source})")
    settings, split = layout_settings(cfg, source), parse_class_split(cfg, source)
    spec = settings.get("label_classes")
    label_names = split.names if spec is None else load_class_names(spec, "data.label_classes", source)
    ignored = ignored_values(cfg.get("ignore_labels", []), label_names, split.names, source)
    remap = remap_table(label_names, split.names, f"data.label_classes (file {source})", ignored)
    return DataSource(cfg, source, root, settings, split, remap, tuple(label_names), ignored)


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


def _filtered(ds: DataSource, split_key: str, train: bool, logger: logging.Logger) -> SegmentationDataset:
    dataset = ds.dataset(split_key, train)
    remove = train and flag(ds.cfg, "remove_unseen_images", True, ds.source) and bool(ds.split.unseen)
    label = split_label(ds.cfg[split_key])
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
    logger.info("data.%s %r: %d listed, %d bad%s, %d used", split_key, label, counts.total,
                len(counts.bad), removed, len(dataset))
    if not len(dataset):
        raise ConfigError(f"data.{split_key}: no usable sample left (file {ds.source})")
    return dataset


@dataclass
class DataBundle:
    """What training needs from the data side."""

    split: ClassSplit
    embeddings: torch.Tensor
    train_set: Dataset | None
    val_set: Dataset | None


def load_split_and_embeddings(data_cfg: dict, source: str = "config") -> tuple[ClassSplit, torch.Tensor]:
    """The class split and class embeddings alone: no dataset folder is needed (except that
    the synthetic benchmark is generated, since its class list and embeddings come from it)."""
    if data_cfg.get("type") == "Synthetic":
        ds = resolve(data_cfg, source)
        return ds.split, ds.embeddings()
    split = parse_class_split(data_cfg, source)
    return split, class_embeddings(require(data_cfg, "embeddings", source, dict), split.names, source)


def prepare_data(data_cfg: dict, *, train: bool = True, val: bool = True, source: str = "config",
                 logger: logging.Logger | None = None) -> DataBundle:
    """Resolve the class split, load the class embeddings and build the requested datasets.

    The training split drops images with unseen-class pixels (``remove_unseen_images``,
    default true); missing files fail here with an error naming the file (or are skipped
    with ``skip_bad_samples``). Synthetic data is generated into its cache on first use.
    """
    logger = logger or log
    ds = resolve(data_cfg, source)
    embeddings = ds.embeddings()
    logger.info("classes: %d (%s unseen: %s), embeddings %s", ds.split.num_classes, len(ds.split.unseen),
                ", ".join(ds.split.unseen_names), tuple(embeddings.shape))
    train_set = _filtered(ds, "train_split", True, logger) if train else None
    val_set = _filtered(ds, "val_split", False, logger) if val else None
    return DataBundle(ds.split, embeddings, train_set, val_set)
