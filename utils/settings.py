"""The one checked settings object of a run, built once from the merged config and the overrides.

Every builder (encoders, optimizers, schedule, data, inference, Segmenter, benchmarks) takes a
:class:`Settings`; none reads the config dict. ``Settings.config`` is the resolved dict itself,
kept only to be recorded (``config.json``, checkpoints) and compared on resume.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Mapping

from utils.amp import Precision
from utils.errors import ConfigError
from utils.parse_config import BASE_KEY, set_by_path
from utils.schema import (
    CONFIG_SCHEMA,
    RESOLVED_KEY,
    SECTIONS,
    TOP_LEVEL,
    DataSection,
    EncoderSection,
    InferenceSettings,
    LoaderSection,
    LossSection,
    OptimizerSection,
    SchedulerSection,
    TrainerSection,
)
from utils.sections import parse_section

TRAINING_ONLY = ("data_loader", "optimizer", "optimizer_gen", "lr_scheduler", "loss")
_ATTRIBUTES = {"data_loader": "loader", "lr_scheduler": "scheduler"}   # config key -> Settings field


@dataclass(frozen=True)
class Settings:
    """A config's sections, parsed and checked (see :mod:`utils.schema`).

    ``data`` is the checked ``data`` section (what needs the files, such as class names, is
    checked by :func:`data_loader.prepare_data` before it reads any); the training-only sections
    (``loader``, ``optimizer``, ``optimizer_gen``, ``scheduler``, ``loss``) are None for a
    trained model's settings (:meth:`of_trained`) whose config left them out."""

    config: dict
    source: str
    name: str
    seed: int
    data: DataSection
    model: EncoderSection
    semantic_encoder: EncoderSection
    inference: InferenceSettings
    trainer: TrainerSection
    loader: LoaderSection | None = None
    optimizer: OptimizerSection | None = None
    optimizer_gen: EncoderSection | None = None
    scheduler: SchedulerSection | None = None
    loss: LossSection | None = None
    precision: dict | None = None   # Precision.record() once trainer.amp is resolved for the device

    @classmethod
    def from_config(cls, config: Mapping, source: str = "config", overrides: Mapping | None = None, *,
                    recorded: bool = False, training: bool = True) -> "Settings":
        """Check ``config`` (``_base_`` merged) with ``overrides`` (``{"a.b": value}``) applied; the first
        problem is a one-line ConfigError naming the key and ``source``. ``recorded``: a checkpoint's
        config (a key older runs carried without effect is dropped, not refused); ``training``:
        false for a trained model's settings (:meth:`of_trained`)."""
        config = copy.deepcopy(dict(config))
        config.pop(BASE_KEY, None)
        config.pop(RESOLVED_KEY, None)   # a run's config.json: what "auto" resolved to there
        for key, value in (overrides or {}).items():
            set_by_path(config, key, value, CONFIG_SCHEMA)
        _check_semantic_dropout(config, source, recorded)
        unknown = [key for key in config if key not in TOP_LEVEL]
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown top-level config key (file {source}); "
                              f"valid: {', '.join(TOP_LEVEL)}")
        seed = config.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, got {seed!r} (file {source})")
        sections = {}
        for key, kind in SECTIONS.items():
            if key in TRAINING_ONLY and not training and "optimizer" not in config:
                continue
            values = config.get(key)
            if key == "trainer" and not training and isinstance(values, (Mapping, type(None))):
                values = {"epochs": 1, **(values or {})}   # a trained model's length does not matter to inference
            sections[_ATTRIBUTES.get(key, key)] = (InferenceSettings.from_config(values, source) if key == "inference"
                                                   else parse_section(kind, values, key, source))
        data, trainer = sections["data"], sections["trainer"]
        problem = data.missing(training)
        if problem:
            raise ConfigError(f"{problem} (file {source})")
        if training and trainer.monitor != "off" and data.selection_split is None:   # see selects_checkpoint
            raise ConfigError(f"trainer.monitor: {trainer.monitor!r} chooses a checkpoint, which needs "
                              "data.selection_split (a split other than the reported data.val_split); use \"off\" "
                              f"to test the last epoch's weights, as the official code (file {source})")
        return cls(config=config, source=source, name=str(config.get("name", "run")), seed=seed, **sections)

    @classmethod
    def of_trained(cls, config: Mapping, source: str = "the checkpoint's config") -> "Settings":
        """The settings of a trained model's recorded config, for inference: the encoders, the
        ``inference`` section and how the ``trainer`` section evaluates (precision, memory format)."""
        return cls.from_config(config, source, recorded=True, training=False)

    @property
    def selects_checkpoint(self) -> bool:
        """Whether the run chooses its checkpoint (``trainer.monitor``) on a selection split of its own."""
        return self.data.selection_split is not None and self.trainer.monitor != "off"

    def with_precision(self, precision: Precision) -> "Settings":
        """These settings with ``trainer.amp`` resolved for the run's device."""
        return replace(self, trainer=replace(self.trainer, amp=precision.amp), precision=precision.record())

    def record(self) -> dict:
        """The resolved config as recorded in ``config.json`` and checkpoints (plain JSON values)."""
        return copy.deepcopy(self.config)


def _check_semantic_dropout(config: dict, source: str, recorded: bool) -> None:
    """``semantic_encoder.args.dropout`` acts only inside the hidden layer: with ``hidden_size`` 0
    (a linear encoder) it is refused, or dropped from a recorded config (older runs carried it)."""
    encoder = config.get("semantic_encoder")
    args = encoder.get("args") if isinstance(encoder, dict) else None
    if not isinstance(args, dict) or "dropout" not in args or args.get("hidden_size", 0):
        return
    if recorded:
        del args["dropout"]
        return
    raise ConfigError(f"semantic_encoder.args.dropout: does nothing when hidden_size is 0 (a linear encoder has no "
                      f"dropout); remove it (file {source})")


def as_settings(config: "Settings | Mapping", source: str = "config") -> "Settings":
    """``config`` itself when it is settings already, else a config dict checked into settings."""
    return config if isinstance(config, Settings) else Settings.from_config(config, source)
