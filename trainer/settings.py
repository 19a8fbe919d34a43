"""Every config section checked before any work: types, ranges, unknown keys (one-line errors).

The dataclasses here are the schema of the config: their fields are the valid keys (and the
keys ``-o section.key=value`` may set), their defaults the values used when a key is absent.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

from data_loader.build import DATA_KEYS
from model.inference import InferenceSettings, SlidingWindow, InferenceSection
from trainer.step import LossSection, StepSettings
from utils.amp import Precision, check_amp
from utils.parse_config import FREE
from utils.sections import parse_section, section_keys
from utils.util import ConfigError


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
    """``optimizer`` / ``optimizer_gen``: a torch.optim class and its arguments."""

    type: str
    args: dict
    head_lr_mult: float = 10.0


@dataclass(frozen=True)
class EncoderSection:
    """``model`` / ``semantic_encoder``: a class of the project and its arguments."""

    type: str
    args: dict


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


@dataclass(frozen=True)
class RunSettings:
    """A config's sections, parsed and checked."""

    seed: int
    trainer: TrainerSection
    loader: LoaderSection
    scheduler: SchedulerSection
    inference: InferenceSettings
    step: StepSettings
    precision: dict | None = None   # Precision.record() once trainer.amp is resolved for the device

    def with_precision(self, precision: Precision) -> "RunSettings":
        """These settings with ``trainer.amp`` (and the step's) resolved for the run's device."""
        return replace(self, trainer=replace(self.trainer, amp=precision.amp),
                       step=replace(self.step, amp=precision.amp), precision=precision.record())


def check_config(config: Mapping, source: str = "config") -> RunSettings:
    """Parse and check every non-data section (the data section is checked by
    :func:`data_loader.prepare_data`); the first problem is a one-line ConfigError."""
    unknown = [key for key in config if key not in TOP_LEVEL and key != RESOLVED_KEY]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown top-level config key (file {source}); valid: {', '.join(TOP_LEVEL)}")
    seed = config.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed: expected a non-negative integer, got {seed!r} (file {source})")
    for key in ("model", "semantic_encoder"):
        parse_section(EncoderSection, {"args": {}, **(config.get(key) or {})}, key, source)
    parse_section(OptimizerSection, {"args": {}, **(config.get("optimizer") or {})}, "optimizer", source)
    gen = {"args": {}, **(config.get("optimizer_gen") or {})}
    if "head_lr_mult" in gen:
        raise ConfigError(f"optimizer_gen.head_lr_mult: unknown key (file {source}); valid: type, args")
    parse_section(OptimizerSection, gen, "optimizer_gen", source)
    return RunSettings(
        seed=seed,
        trainer=parse_section(TrainerSection, config.get("trainer"), "trainer", source),
        loader=parse_section(LoaderSection, config.get("data_loader"), "data_loader", source),
        scheduler=parse_section(SchedulerSection, config.get("lr_scheduler"), "lr_scheduler", source),
        inference=InferenceSettings.from_config(config.get("inference"), source),
        step=StepSettings.from_config(config, source),
    )
