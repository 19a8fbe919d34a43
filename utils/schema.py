"""Every config section's schema, in one place: the keys each section accepts, their types,
defaults and ranges (dataclasses checked by :func:`utils.sections.parse_section`), the keys of
the free-form ``data`` section, and :data:`CONFIG_SCHEMA`, what ``-o KEY=VALUE`` may set.

:class:`utils.settings.Settings` is built from these once per run; builders read that object.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from utils.amp import check_amp
from utils.errors import ConfigError
from utils.parse_config import FREE
from utils.sections import parse_section, section_keys

# ----------------------------------------------------------------------------- inference
CALIBRATIONS = ("top2", "all")


def sigma_values(spec: Any, key: str = "inference.sigma") -> list[float]:
    """Sigmas from a number, a list, a ``"0.3,0.5"`` string, or ``{"log_range": [lo, hi], "num": n}``."""
    if spec is None:
        return []
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        values = [float(spec)]
    elif isinstance(spec, str):
        try:
            values = [float(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"{key}: expected numbers like 0.3,0.5,0.7, got {spec!r}") from None
    elif isinstance(spec, (list, tuple)):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
            raise ConfigError(f"{key}: expected a list of numbers, got {spec!r}")
        values = [float(v) for v in spec]
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
        raise ConfigError(f"{key}: expected a number, a list, or {{\"log_range\": [lo, hi], \"num\": n}}; got {spec!r}")
    if not values or any(v <= 0 or not math.isfinite(v) for v in values):
        raise ConfigError(f"{key}: sigma values must be positive, got {spec!r}")
    return [round(v, 6) for v in values]


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
        if self.max_size < 0:
            return f"max_size: must be >= 0, got {self.max_size}"
        if self.tile < 16 or self.tile % 16:
            return f"tile: must be a positive multiple of 16, got {self.tile}"
        if self.overlap < 0 or self.overlap % 4 or self.overlap >= self.tile:
            return f"overlap: must be a multiple of 4 in [0, tile), got {self.overlap}"
        if self.batch < 1:
            return f"batch: must be >= 1, got {self.batch}"
        return None

    def applies(self, height: int, width: int) -> bool:
        return self.max_size > 0 and max(height, width) > self.max_size


@dataclass(frozen=True)
class InferenceSection:
    sigma: Any
    calibration: str = "top2"
    sweep: Any = None
    window: dict = field(default_factory=dict)
    save_predictions: bool = False

    def check(self) -> str | None:
        if self.calibration not in CALIBRATIONS:
            return f"calibration: {self.calibration!r}; valid: {', '.join(CALIBRATIONS)}"
        return None


@dataclass(frozen=True)
class InferenceSettings:
    """The resolved ``inference`` section.

    ``sigma``: the configured calibration factor, or None when ``inference.sigma`` lists
    several (a sweep whose best harmonic mIoU is the headline); ``sweep``: the other sigmas
    evaluated in the same pass; ``calibration``: "top2" (official) or "all"."""

    sigma: float | None
    sweep: tuple[float, ...]
    calibration: str = "top2"
    window: SlidingWindow = SlidingWindow()
    save_predictions: bool = False

    @property
    def sigmas(self) -> list[float]:
        """Every sigma an evaluation computes, the headline first."""
        return ([self.sigma] if self.sigma is not None else []) + list(self.sweep)

    @classmethod
    def from_config(cls, section: dict | None, source: str = "config") -> "InferenceSettings":
        raw = parse_section(InferenceSection, section, "inference", source)
        sigmas = sigma_values(raw.sigma)
        if not sigmas:
            raise ConfigError(f"inference.sigma: missing (file {source})")
        extra = sigma_values(raw.sweep, "inference.sweep")
        sigma = sigmas[0] if len(sigmas) == 1 else None
        sweep = sigmas if sigma is None else [s for s in extra if s != sigma]
        window = parse_section(SlidingWindow, raw.window, "inference.window", source)
        return cls(sigma, tuple(sweep), raw.calibration, window, raw.save_predictions)


# ----------------------------------------------------------------------------- data
DATASET_TYPES = ("VOC", "Context", "Synthetic", "Custom")
# Layout keys a config may set over its layout's conventions (data_loader.layouts).
LAYOUT_KEYS = ("image_dir", "image_ext", "label_dir", "label_ext", "label_file", "label_classes")
# The ``data`` section's keys; their values are checked by data_loader.build.resolve (they need the files).
DATA_KEYS = (
    "type", "root", "classes", "unseen_classes", "background", "embeddings", "train_split", "val_split",
    "base_size", "crop_size", "scale_range", "hflip", "remove_unseen_images", "ignore_bg", "ignore_unseen",
    "skip_bad_samples", "layout", "synthetic", "expected_counts", "ignore_labels", *LAYOUT_KEYS,
)
EMBEDDING_KEYS = ("paths", "normalize", "names", "aliases")
IGNORE_INDEX = 255   # the label value never learned nor scored (void, data.ignore_labels, ignored classes)


# ----------------------------------------------------------------------------- training
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
    tensorboard: bool = False
    tensorboard_images: int = 4
    log_step: int = 50
    test_after_train: bool = True

    def check(self) -> str | None:
        for key in ("epochs", "save_period", "val_period", "log_step"):
            if getattr(self, key) < 1:
                return f"{key}: must be >= 1, got {getattr(self, key)}"
        for key in ("early_stop", "tensorboard_images"):
            if getattr(self, key) < 0:
                return f"{key}: must be >= 0, got {getattr(self, key)}"
        parts = self.monitor.split()
        if self.monitor != "off" and (len(parts) != 2 or parts[0] not in ("min", "max")):
            return f"monitor: expected 'max <metric>', 'min <metric>' or 'off', got {self.monitor!r}"
        try:
            check_amp(self.amp)
        except ConfigError as err:
            return str(err)
        return None


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
        for key in ("batch_size", "val_batch_size"):
            if getattr(self, key) < 1:
                return f"{key}: must be >= 1, got {getattr(self, key)}"
        if self.num_workers < 0:
            return f"num_workers: must be >= 0, got {self.num_workers}"
        return None


@dataclass(frozen=True)
class SchedulerSection:
    """The ``lr_scheduler`` section: poly (stepped per epoch as official, or per step) or constant."""

    type: str = "poly"
    power: float = 0.9
    interval: str = "epoch"

    def check(self) -> str | None:
        if self.type.lower() not in ("poly", "constant"):
            return f"type: unknown {self.type!r}; valid: poly, constant"
        if self.interval not in ("epoch", "step"):
            return f"interval: must be \"epoch\" or \"step\", got {self.interval!r}"
        return None


@dataclass(frozen=True)
class OptimizerSection:
    """``optimizer`` / ``optimizer_gen``: a torch.optim class and its arguments; the visual
    encoder's head (ASPP + decoder) learns at ``head_lr_mult`` x the base ``args.lr``."""

    type: str
    args: dict
    head_lr_mult: float = 10.0

    @property
    def lr(self) -> float:
        """The base learning rate (``args.lr``; 0.01 when absent, torch's SGD has no default)."""
        return float(self.args.get("lr", 0.01))


@dataclass(frozen=True)
class EncoderSection:
    """``model`` / ``semantic_encoder``: a class of the project and its arguments."""

    type: str
    args: dict


@dataclass(frozen=True)
class LossSection:
    """The ``loss`` section: BAR ratio, SC temperature and weight, and the loss weights."""

    ratio: float
    temperature: float
    alpha: float
    sc_divide_by_num_classes: bool = False
    ce_weight: float = 1.0
    bar_weight: float = 1.0
    bar_detach_features: bool = False  # ablation: BAR trains only the semantic encoder

    def check(self) -> str | None:
        if not 0 < self.ratio <= 1:
            return f"ratio: must be in (0, 1], got {self.ratio}"
        return None


TOP_LEVEL = ("name", "seed", "data", "data_loader", "model", "semantic_encoder", "optimizer", "optimizer_gen",
             "lr_scheduler", "loss", "inference", "trainer")
# Written by a run into its config.json (what ``auto`` resolved to on that machine); ignored when read.
RESOLVED_KEY = "resolved"
_FREE_DATA = ("synthetic", "embeddings", "expected_counts")

# What ``-o`` may set: {section: {key: None (a value) | FREE (anything below) | nested schema}}.
CONFIG_SCHEMA: dict[str, Any] = {
    "name": None, "seed": None,
    "data": {key: FREE if key in _FREE_DATA else None for key in DATA_KEYS},
    "data_loader": section_keys(LoaderSection),
    "model": {"type": None, "args": FREE},
    "semantic_encoder": {"type": None, "args": FREE},
    "optimizer": {"type": None, "args": FREE, "head_lr_mult": None},
    "optimizer_gen": {"type": None, "args": FREE},
    "lr_scheduler": section_keys(SchedulerSection),
    "loss": section_keys(LossSection),
    "inference": {**section_keys(InferenceSection), "sweep": FREE, "window": section_keys(SlidingWindow)},
    "trainer": section_keys(TrainerSection),
}


