"""Every config section's schema, in one place: the keys each section accepts, their types,
defaults and ranges (dataclasses checked by :func:`utils.sections.parse_section`), and
:data:`CONFIG_SCHEMA`, what ``-o KEY=VALUE`` may set. :class:`utils.settings.Settings` holds them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from utils.amp import check_amp
from utils.errors import ConfigError
from utils.parse_config import FREE
from utils.sections import parse_section, section_keys


def _least(section: Any, least: int, *keys: str) -> str | None:
    """The problem of the first of ``keys`` set below ``least``; None when there is none."""
    key = next((key for key in keys if getattr(section, key) is not None and getattr(section, key) < least), None)
    return None if key is None else f"{key}: must be >= {least}, got {getattr(section, key)}"


def _unknown(key: str, value: Any, valid: tuple[str, ...]) -> str | None:
    """The problem of ``value`` when it is not one of ``valid``; None when it is."""
    return None if value in valid else f"{key}: unknown {value!r}; valid: {', '.join(valid)}"


# ----------------------------------------------------------------------------- inference
CALIBRATIONS = ("top2", "all")


def sigma_values(spec: Any, key: str = "inference.sigma") -> list[float]:
    """Sigmas from a number, a list, a ``"0.3,0.5"`` string, or ``{"log_range": [lo, hi], "num": n}``."""
    if spec is None:
        return []
    if isinstance(spec, str):
        try:
            values = [float(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"{key}: expected numbers like 0.3,0.5,0.7, got {spec!r}") from None
    elif isinstance(spec, dict) and "log_range" in spec:
        try:
            low, high = map(float, spec["log_range"])
            num = int(spec.get("num", 25))
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: log_range needs two numbers and num an integer, got {dict(spec)}") from None
        if not 0 < low < high or num < 2:
            raise ConfigError(f"{key}: log_range needs 0 < low < high and num >= 2, got {dict(spec)}")
        values = [math.exp(math.log(low) + i * (math.log(high) - math.log(low)) / (num - 1)) for i in range(num)]
    else:
        values = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{key}: expected a number, a list of numbers, or "
                              f"{{\"log_range\": [lo, hi], \"num\": n}}; got {spec!r}")
    if not values or any(v <= 0 or not math.isfinite(v) for v in values):
        raise ConfigError(f"{key}: sigma values must be positive, got {spec!r}")
    return [round(float(v), 6) for v in values]


@dataclass(frozen=True)
class SlidingWindow:
    """``inference.window``: images whose longer side exceeds ``max_size`` are encoded in
    ``tile`` x ``tile`` tiles overlapping by ``overlap`` pixels, ``batch`` tiles per forward pass
    (``max_size: 0`` never tiles). Tiled features approximate whole-image features."""

    max_size: int = 1024
    tile: int = 512
    overlap: int = 128
    batch: int = 4

    def check(self) -> str | None:
        if self.tile < 16 or self.tile % 16:
            return f"tile: must be a positive multiple of 16, got {self.tile}"
        if self.overlap < 0 or self.overlap % 4 or self.overlap >= self.tile:
            return f"overlap: must be a multiple of 4 in [0, tile), got {self.overlap}"
        return _least(self, 0, "max_size") or _least(self, 1, "batch")

    def applies(self, height: int, width: int) -> bool:
        return self.max_size > 0 and max(height, width) > self.max_size


@dataclass(frozen=True)
class InferenceSettings:
    """The ``inference`` section, resolved by :meth:`from_config`: ``sigma`` the calibration factor,
    or None when ``inference.sigma`` lists several (a sweep whose best harmonic mIoU is the
    headline); ``sweep`` the other sigmas evaluated in the same pass; ``calibration`` "top2"
    (official) or "all". As configured, ``sigma`` and ``sweep`` are :func:`sigma_values` specs."""

    sigma: Any
    sweep: Any = None
    calibration: str = "top2"
    window: SlidingWindow = SlidingWindow()
    save_predictions: bool = False

    @property
    def sigmas(self) -> list[float]:
        """Every sigma an evaluation computes, the headline first."""
        return ([self.sigma] if self.sigma is not None else []) + list(self.sweep)

    def check(self) -> str | None:
        return _unknown("calibration", self.calibration, CALIBRATIONS)

    @classmethod
    def from_config(cls, section: dict | None, source: str = "config") -> "InferenceSettings":
        raw = parse_section(cls, section, "inference", source)
        sigmas = sigma_values(raw.sigma)
        if not sigmas:
            raise ConfigError(f"inference.sigma: missing (file {source})")
        sigma = sigmas[0] if len(sigmas) == 1 else None
        sweep = sigmas if sigma is None else [s for s in sigma_values(raw.sweep, "inference.sweep") if s != sigma]
        return replace(raw, sigma=sigma, sweep=tuple(sweep))


# ----------------------------------------------------------------------------- data
DATASET_TYPES = ("VOC", "Context", "Synthetic", "Custom")
CONTEXT_LAYOUTS = ("official", "png")
NORMALIZATIONS = ("none", "l2", "max_norm")
IGNORE_INDEX = 255   # the label value never learned nor scored (void, data.ignore_labels, ignored classes)
UNSEEN_KEY = "data.unseen_classes"   # named by the class-split errors (data_loader.classes)
SPLIT_IGNORE_BG = "ignore_bg"   # the key of an ignored background in a checkpoint's recorded class split
# Layout conventions a config may override (data_loader.layouts).
LAYOUT_KEYS = ("image_dir", "image_ext", "label_dir", "label_ext", "label_file", "label_classes")


@dataclass(frozen=True)
class EmbeddingsSection:
    """``data.embeddings``: embedding files (concatenated along the feature axis), the
    normalisation of each whole file, the names of their rows and ``{class: row name}`` aliases."""

    normalize: str | None
    paths: str | list[str] | None = None
    names: Any = None
    aliases: dict | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """``paths`` as a tuple (one path or a list)."""
        return () if self.paths is None else (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)

    def check(self) -> str | None:
        if self.paths is not None and (not self.files or not all(isinstance(p, str) and p for p in self.files)):
            return f"paths: expected a file or a list of files, got {self.paths!r}"
        return None if self.normalize is None else _unknown("normalize", self.normalize, NORMALIZATIONS)


@dataclass(frozen=True)
class SyntheticSection:
    """``data.synthetic``: the built-in colour x texture benchmark's generator (data_loader.synthetic).
    Everything but ``cache_dir`` decides the generated data."""

    seed: int = 0
    num_train: int = 2000
    num_val: int = 300
    image_size: int = 64
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    textures: tuple[str, ...] = ("solid", "hstripe", "vstripe", "checker")
    stripe_period: int = 6
    objects_per_image: tuple[int, int] = (1, 3)
    object_radius: tuple[float, float] = (0.15, 0.3)
    colour_jitter: float = 0.12
    noise_std: float = 8.0
    embed_dim: int = 300
    embed_noise: float = 0.05
    cache_dir: str = ".cache/synthetic"

    def __post_init__(self) -> None:
        for key in ("colours", "textures", "objects_per_image", "object_radius"):
            object.__setattr__(self, key, tuple(getattr(self, key)))

    def check(self) -> str | None:
        for key in ("colours", "textures"):
            values = getattr(self, key)
            if not values or len(set(values)) != len(values) or not all(isinstance(v, str) for v in values):
                return f"{key}: {values!r} must be distinct names"
        if len(self.colours) * len(self.textures) > 254:
            return "colours: x textures gives more than 254 classes"
        if len(self.objects_per_image) != 2 or not 1 <= self.objects_per_image[0] <= self.objects_per_image[1]:
            return f"objects_per_image: {self.objects_per_image!r} must be [min, max] with 1 <= min <= max"
        if len(self.object_radius) != 2 or not 0 < self.object_radius[0] <= self.object_radius[1] < 1:
            return f"object_radius: {self.object_radius!r} must be [min, max] fractions of the image size in (0, 1)"
        return (_least(self, 16, "image_size") or _least(self, 2, "stripe_period")
                or _least(self, 1, "num_train", "num_val"))


@dataclass(frozen=True)
class DataSection:
    """The ``data`` section: dataset type and place, class list and unseen classes, embeddings,
    the training split (``train_split``), the reported split (``val_split``, tested with the final
    weights) and the optional model-selection split (``selection_split``: a named split that is
    not the reported one, or ``{"holdout": N, "seed": S}`` images carved from the training list),
    training augmentation and the data-side options (see docs/datasets.md)."""

    type: str
    embeddings: EmbeddingsSection | None = None
    classes: Any = None
    unseen_classes: Any = ()
    root: str | None = None
    train_split: Any = None
    val_split: Any = None
    selection_split: Any = None
    background: bool | None = None
    base_size: int | None = None
    crop_size: int | None = None
    scale_range: tuple[float, float] | None = None
    hflip: bool = True
    remove_unseen_images: bool = True
    ignore_bg: bool = False
    ignore_unseen: bool = False
    skip_bad_samples: bool = False
    ignore_labels: Any = ()
    layout: str | None = None
    synthetic: SyntheticSection | None = None
    expected_counts: dict = field(default_factory=dict)
    image_dir: str | None = None
    image_ext: str | None = None
    label_dir: str | None = None
    label_ext: str | None = None
    label_file: str | None = None
    label_classes: Any = None

    @property
    def holdout(self) -> dict | None:
        """``selection_split`` when it carves images from the training list (``{"holdout", "seed"}``)."""
        spec = self.selection_split
        return {"seed": 0, **spec} if isinstance(spec, Mapping) and "holdout" in spec else None

    def check(self) -> str | None:
        synthetic = self.type == "Synthetic"
        if self.type not in DATASET_TYPES:
            return _unknown("type", self.type, DATASET_TYPES)
        if synthetic and self.root is not None:
            return "root: not used by Synthetic, set data.synthetic.cache_dir"
        if not synthetic and (self.synthetic is not None or (self.layout is not None and self.type != "Context")):
            return f"{'synthetic' if self.synthetic is not None else 'layout'}: not used by type {self.type}"
        if self.scale_range is not None and (len(self.scale_range) != 2 or not all(
                isinstance(v, (int, float)) for v in self.scale_range) or not 0 < self.scale_range[0]
                                              <= self.scale_range[1]):
            return f"scale_range: expected [low, high] with 0 < low <= high, got {list(self.scale_range)}"
        if not isinstance(self.unseen_classes, (str, list, tuple)):
            return f"unseen_classes: expected a preset name or a list, got {self.unseen_classes!r}"
        return (_least(self, 1, "base_size", "crop_size")
                or (self.layout is not None and _unknown("layout", self.layout, CONTEXT_LAYOUTS))
                or self._check_selection())

    def _check_selection(self) -> str | None:
        spec = self.selection_split
        if isinstance(spec, Mapping) and "holdout" in spec:
            count, seed = spec["holdout"], spec.get("seed", 0)
            if set(spec) - {"holdout", "seed"} or not all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in (count, seed)) or count < 1 or seed < 0:
                return (f"selection_split: expected {{\"holdout\": N, \"seed\": S}} (N >= 1 images carved from the "
                        f"training list), got {dict(spec)!r}")
        elif spec is not None and spec == self.val_split:
            return (f"selection_split: {spec!r} is the reported split (data.val_split); a checkpoint is never "
                    "chosen on the split that is reported")
        return None

    def background_problem(self, first_class: str) -> str | None:
        """The error of an ignored background when the class list has none (class 0 is ``first_class``)."""
        return (f"data.ignore_bg: true needs a background class, but data.background is false (class 0 is "
                f"{first_class!r})") if self.ignore_bg else None

    def missing(self, training: bool = False) -> str | None:
        """The first key a dataset (and, with ``training``, a training run) needs and this section
        lacks, as ``data.<key>: missing``; None when nothing is missing."""
        synthetic = self.type == "Synthetic"
        needed = {"embeddings": self.embeddings, "root": self.root if not synthetic else "",
                  "classes": self.classes if not synthetic else "",
                  "embeddings.paths": "" if synthetic or self.embeddings is None else self.embeddings.paths}
        if training:
            needed.update(train_split=self.train_split, base_size=self.base_size, crop_size=self.crop_size,
                          scale_range=self.scale_range)
        key = next((key for key, value in needed.items() if value is None), None)
        return None if key is None else f"data.{key}: missing{' (needed for training)' if training else ''}"

    def resolved(self, root: Any) -> "DataSection":
        """A Synthetic section completed by its generated folder ``root`` (its class list and embeddings)."""
        return replace(self, classes=self.classes or str(root / "classes.txt"),
                       embeddings=replace(self.embeddings, paths=self.embeddings.paths or
                                          [str(root / "embeddings.npy")]))


def as_data_section(data: "DataSection | Mapping", source: str = "config") -> DataSection:
    """``data`` itself when it is a checked section, else a ``data`` config object checked into one."""
    return data if isinstance(data, DataSection) else parse_section(DataSection, data, "data", source)


# ----------------------------------------------------------------------------- training
CPU_KERNELS = ("taps", "bn_fold", "dropout", "layout")   # model.kernels; all on by default


@dataclass(frozen=True)
class TrainerSection:
    """The ``trainer`` section."""

    epochs: int
    save_dir: str = "saved"
    save_period: int = 1
    val_period: int = 1
    monitor: str = "off"
    early_stop: int = 0
    amp: str | bool | None = "auto"
    channels_last: bool = False
    compile: bool = False
    cpu_kernels: tuple[str, ...] = CPU_KERNELS
    tensorboard: bool = False
    tensorboard_images: int = 4
    log_step: int = 50
    test_after_train: bool = True

    def check(self) -> str | None:
        parts = self.monitor.split()
        if self.monitor != "off" and (len(parts) != 2 or parts[0] not in ("min", "max")):
            return f"monitor: expected 'max <metric>', 'min <metric>' or 'off', got {self.monitor!r}"
        try:
            check_amp(self.amp)
        except ConfigError as err:
            return str(err)
        return (_least(self, 1, "epochs", "save_period", "val_period", "log_step")
                or _least(self, 0, "early_stop", "tensorboard_images")
                or next(filter(None, (_unknown("cpu_kernels", k, CPU_KERNELS) for k in self.cpu_kernels)), None))


@dataclass(frozen=True)
class LoaderSection:
    """The ``data_loader`` section (``batch_size``: the effective batch over all processes)."""

    batch_size: int
    val_batch_size: int = 1
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    shuffle: bool = True

    def check(self) -> str | None:
        return _least(self, 1, "batch_size", "val_batch_size") or _least(self, 0, "num_workers")


@dataclass(frozen=True)
class SchedulerSection:
    """The ``lr_scheduler`` section: poly (stepped per epoch as official, or per step) or constant."""

    type: str = "poly"
    power: float = 0.9
    interval: str = "epoch"

    def check(self) -> str | None:
        return (_unknown("type", self.type.lower(), ("poly", "constant"))
                or _unknown("interval", self.interval, ("epoch", "step")))


@dataclass(frozen=True)
class EncoderSection:
    """``model``, ``semantic_encoder`` and ``optimizer_gen``: a class and its arguments."""

    type: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerSection(EncoderSection):
    """``optimizer``: a torch.optim class and its arguments; the visual encoder's head (ASPP +
    decoder) learns at ``head_lr_mult`` x the base ``args.lr``."""

    head_lr_mult: float = 10.0

    @property
    def lr(self) -> float:
        """The base learning rate (``args.lr``; 0.01 when absent, torch's SGD has no default)."""
        return float(self.args.get("lr", 0.01))


@dataclass(frozen=True)
class LossSection:
    """The ``loss`` section: BAR ratio, SC temperature and weight, and the loss weights."""

    ratio: float
    temperature: float
    alpha: float
    sc_divide_by_num_classes: bool = False
    sc_distance_epsilon: float = 0.0   # > 0: sqrt(sum of squares + eps), the official Context trainer's
    ce_weight: float = 1.0
    bar_weight: float = 1.0
    bar_detach_features: bool = False  # ablation: BAR trains only the semantic encoder

    def check(self) -> str | None:
        if not 0 < self.ratio <= 1:
            return f"ratio: must be in (0, 1], got {self.ratio}"
        return _least(self, 0, "sc_distance_epsilon")


# The config's sections by key (the other top-level keys, ``name`` and ``seed``, are plain values).
SECTIONS: dict[str, type] = {"data": DataSection, "data_loader": LoaderSection, "model": EncoderSection,
                             "semantic_encoder": EncoderSection, "optimizer": OptimizerSection,
                             "optimizer_gen": EncoderSection, "lr_scheduler": SchedulerSection, "loss": LossSection,
                             "inference": InferenceSettings, "trainer": TrainerSection}
TOP_LEVEL = ("name", "seed", *SECTIONS)
# Written by a run into its config.json (what ``auto`` resolved to on that machine); ignored when read.
RESOLVED_KEY = "resolved"

# What ``-o`` may set: {section: {key: None (a value) | NULLABLE | FREE (anything below) | nested schema}}.
CONFIG_SCHEMA: dict[str, Any] = {"name": None, "seed": None, **{key: section_keys(kind)
                                                                for key, kind in SECTIONS.items()}}
CONFIG_SCHEMA["data"]["selection_split"] = CONFIG_SCHEMA["inference"]["sweep"] = FREE
