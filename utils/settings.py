"""The one checked settings object of a run, built once from the merged config and the overrides.

Every builder (encoders, optimizers, schedule, data, inference, Segmenter, benchmarks) takes a
:class:`Settings`; none reads the config dict. ``Settings.config`` is the resolved dict itself,
kept only to be recorded (``config.json``, checkpoints) and compared on resume.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Mapping

from utils.amp import Precision
from utils.errors import ConfigError
from utils.parse_config import BASE_KEY, set_by_path
from utils.schema import (
    CONFIG_SCHEMA,
    RESOLVED_KEY,
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
    optimizer_gen: OptimizerSection | None = None
    scheduler: SchedulerSection | None = None
    loss: LossSection | None = None
    precision: dict | None = None   # Precision.record() once trainer.amp is resolved for the device

    @classmethod
    def from_config(cls, config: Mapping, source: str = "config", overrides: Mapping | None = None, *,
                    recorded: bool = False) -> "Settings":
        """Check ``config`` (``_base_`` already merged) with ``overrides`` (``{"a.b": value}``, checked
        against :data:`utils.schema.CONFIG_SCHEMA`) applied; the first problem is a one-line
        ConfigError naming the key and ``source``. ``recorded``: the config a checkpoint recorded
        (a key older runs carried without effect is dropped instead of refused)."""
        resolved = copy.deepcopy(dict(config))
        resolved.pop(BASE_KEY, None)
        resolved.pop(RESOLVED_KEY, None)   # a run's config.json: what "auto" resolved to there
        for key, value in (overrides or {}).items():
            set_by_path(resolved, key, value, CONFIG_SCHEMA)
        _check_semantic_dropout(resolved, source, recorded)
        return cls._parse(resolved, source, training=True)

    @classmethod
    def of_trained(cls, config: Mapping, source: str = "the checkpoint's config") -> "Settings":
        """The settings of a trained model's recorded config, for inference: the encoders, the
        ``inference`` section and how the ``trainer`` section evaluates (precision, memory format)."""
        resolved = copy.deepcopy(dict(config))
        resolved.pop(RESOLVED_KEY, None)
        _check_semantic_dropout(resolved, source, recorded=True)
        return cls._parse(resolved, source, training=False)

    @classmethod
    def _parse(cls, config: dict, source: str, training: bool) -> "Settings":
        unknown = [key for key in config if key not in TOP_LEVEL]
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown top-level config key (file {source}); "
                              f"valid: {', '.join(TOP_LEVEL)}")
        seed = config.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, got {seed!r} (file {source})")
        trainer = config.get("trainer") or {}
        if not training:   # a trained model's length does not matter to inference
            trainer = {"epochs": 1, **trainer}
        sections: dict[str, Any] = {}
        if training or "optimizer" in config:
            sections["optimizer"] = _optimizer(config, "optimizer", source)
            sections["optimizer_gen"] = _optimizer(config, "optimizer_gen", source)
            sections["loader"] = parse_section(LoaderSection, config.get("data_loader"), "data_loader", source)
            sections["scheduler"] = parse_section(SchedulerSection, config.get("lr_scheduler"), "lr_scheduler",
                                                  source)
            sections["loss"] = parse_section(LossSection, config.get("loss"), "loss", source)
        data = DataSection.parse(config.get("data"), source)
        problem = data.missing(training)
        if problem:
            raise ConfigError(f"{problem} (file {source})")
        trainer_section = parse_section(TrainerSection, trainer, "trainer", source)
        if training and trainer_section.monitor != "off" and data.selection_split is None:
            raise ConfigError(f"trainer.monitor: {trainer_section.monitor!r} chooses a checkpoint, which needs "
                              "data.selection_split (a split other than the reported data.val_split); use \"off\" "
                              f"to test the last epoch's weights, as the official code (file {source})")
        return cls(config=config, source=source, name=str(config.get("name", "run")), seed=seed, data=data,
                   model=_encoder(config, "model", source),
                   semantic_encoder=_encoder(config, "semantic_encoder", source),
                   inference=InferenceSettings.from_config(config.get("inference"), source),
                   trainer=trainer_section, **sections)

    def with_precision(self, precision: Precision) -> "Settings":
        """These settings with ``trainer.amp`` resolved for the run's device."""
        return replace(self, trainer=replace(self.trainer, amp=precision.amp), precision=precision.record())

    def record(self) -> dict:
        """The resolved config as recorded in ``config.json`` and checkpoints (plain JSON values)."""
        return copy.deepcopy(self.config)


def _section(config: Mapping, key: str, source: str) -> dict:
    """``config[key]`` as an object with ``args`` (a non-object is a one-line error naming the key)."""
    values = config.get(key)
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"{key}: expected an object, got {values!r} (file {source})")
    return {"args": {}, **(values or {})}


def _encoder(config: Mapping, key: str, source: str) -> EncoderSection:
    return parse_section(EncoderSection, _section(config, key, source), key, source)


def _optimizer(config: Mapping, key: str, source: str) -> OptimizerSection:
    spec = _section(config, key, source)
    if key == "optimizer_gen" and "head_lr_mult" in spec:
        raise ConfigError(f"optimizer_gen.head_lr_mult: unknown key (file {source}); valid: type, args")
    return parse_section(OptimizerSection, spec, key, source)


def _check_semantic_dropout(config: dict, source: str, recorded: bool) -> None:
    """``semantic_encoder.args.dropout`` acts only inside the hidden layer: with ``hidden_size`` 0
    (a linear encoder) it is refused, or dropped from a recorded config (older runs carried it)."""
    args = (config.get("semantic_encoder") or {}).get("args")
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
