"""A trained model for inference: both encoders, class split and embeddings from a checkpoint."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from data_loader import load_split_and_embeddings
from data_loader.classes import ClassSplit
from model.builder import build_encoders, load_encoder_weights, place
from segmentation.official import convert_official, is_official
from utils.checkpoint import FORMAT, load_checkpoint
from utils.errors import ConfigError
from utils.settings import Settings, as_settings


def as_project_checkpoint(checkpoint: dict, path: str | Path, config: Settings | Mapping | None = None,
                          source: str = "config") -> dict:
    """A checkpoint file's content in this project's format: an official JoEm fe_/gen_ pair is converted
    with ``config`` (settings or a config dict naming the classes, split and embeddings it does not hold)."""
    if is_official(checkpoint):
        if config is None:
            raise ConfigError(f"{path}: an official JoEm checkpoint holds no class list or split; "
                              "give the config (-c)")
        checkpoint = convert_official(path, as_settings(config, source), visual=checkpoint)
    if checkpoint.get("format") != FORMAT or "visual_encoder" not in checkpoint:
        raise ConfigError(f"{path}: not a checkpoint of this project (no '{FORMAT}' tag or no weights)")
    return checkpoint


@dataclass
class TrainedModel:
    """Everything inference needs: encoders (eval mode, on their device), class split, class
    embeddings, the settings of the training config (inference section, precision, memory format)."""

    model: torch.nn.Module
    semantic_encoder: torch.nn.Module
    split: ClassSplit
    embeddings: torch.Tensor
    settings: Settings
    epoch: int
    best_sigma: float | None = None   # the best sigma of the validation that chose this checkpoint

    @property
    def device(self) -> torch.device:
        return next(self.semantic_encoder.parameters()).device


def load_trained_model(path: str | Path, device: torch.device | str = "cpu", config: Settings | Mapping | None = None,
                       config_source: str = "config", checkpoint: Mapping | None = None) -> TrainedModel:
    """Build the encoders a checkpoint describes, load its weights, put them on ``device`` in
    eval mode (channels_last as the checkpoint's config trains and evaluates).

    Official JoEm files (``model_best_fe.pth`` with ``model_best_gen.pth`` beside it) are
    converted on the fly and need ``config`` (settings or a config dict). ``checkpoint``: its
    content, when already read."""
    if checkpoint is None:
        checkpoint = as_project_checkpoint(load_checkpoint(path), path, config, config_source)
    settings = Settings.of_trained(checkpoint["config"], f"{path} (its config)")
    split = ClassSplit.from_dict(checkpoint["class_split"])
    embeddings = checkpoint.get("embeddings")
    if embeddings is None:
        embeddings = load_split_and_embeddings(settings.data, str(path))[1]
    model, semantic_encoder = build_encoders(settings, split.num_classes, embeddings.shape[1], pretrained=False)
    load_encoder_weights(model, semantic_encoder, checkpoint, path)
    best_sigma = checkpoint.get("best_sigma")
    trained = TrainedModel(model.eval(), semantic_encoder.eval(), split, embeddings.float(), settings,
                           int(checkpoint.get("epoch", 0)), None if best_sigma is None else float(best_sigma))
    place(model, semantic_encoder, device, settings.trainer.channels_last)
    return trained
