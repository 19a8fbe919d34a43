"""A trained model for inference: both encoders, class split and embeddings from a checkpoint."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from data_loader import load_split_and_embeddings
from data_loader.classes import ClassSplit
from model.builder import build_encoders, load_encoder_weights, place
from model.inference import InferenceSettings
from model.official import convert_official, is_official
from utils.amp import AUTO
from utils.checkpoint import FORMAT, load_checkpoint
from utils.util import ConfigError


def read_model_checkpoint(path: str | Path, config: Mapping | None = None, source: str = "config") -> dict:
    """A checkpoint of this project, or an official JoEm fe_/gen_ pair converted with ``config``
    (which names the classes, split and embeddings an official file does not hold)."""
    return as_project_checkpoint(load_checkpoint(path), path, config, source)


def as_project_checkpoint(checkpoint: dict, path: str | Path, config: Mapping | None = None,
                          source: str = "config") -> dict:
    """A checkpoint file's content in this project's format (see :func:`read_model_checkpoint`)."""
    if is_official(checkpoint):
        if config is None:
            raise ConfigError(f"{path}: an official JoEm checkpoint holds no class list or split; "
                              "give the config (-c)")
        checkpoint = convert_official(path, dict(config), source, visual=checkpoint)
    if checkpoint.get("format") != FORMAT or "visual_encoder" not in checkpoint:
        raise ConfigError(f"{path}: not a checkpoint of this project (no '{FORMAT}' tag or no weights)")
    return checkpoint


@dataclass
class TrainedModel:
    """Everything inference needs: encoders (eval mode, on their device), class split, class
    embeddings, the training config and the precision it was evaluated in."""

    model: torch.nn.Module
    semantic_encoder: torch.nn.Module
    split: ClassSplit
    embeddings: torch.Tensor
    config: dict
    epoch: int
    best_sigma: float | None = None   # the best sigma of the validation that chose this checkpoint

    @property
    def device(self) -> torch.device:
        return next(self.semantic_encoder.parameters()).device

    @property
    def inference(self) -> InferenceSettings:
        return InferenceSettings.from_config(self.config.get("inference"), "the checkpoint's config")

    @property
    def amp(self) -> str | bool:
        return (self.config.get("trainer") or {}).get("amp", AUTO)

    @property
    def channels_last(self) -> bool:
        return bool((self.config.get("trainer") or {}).get("channels_last", False))

    @torch.inference_mode()
    def prototypes(self, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Prototypes (K x 256) of the given embeddings (default: the checkpoint's classes)."""
        table = self.embeddings if embeddings is None else embeddings
        return self.semantic_encoder(table.to(self.device).float()).float()


def load_trained_model(path: str | Path, device: torch.device | str = "cpu", config: Mapping | None = None,
                       config_source: str = "config", checkpoint: Mapping | None = None) -> TrainedModel:
    """Build the encoders a checkpoint describes, load its weights, put them on ``device`` in
    eval mode (channels_last as the checkpoint's config trains and evaluates).

    Official JoEm files (``model_best_fe.pth`` with ``model_best_gen.pth`` beside it) are
    converted on the fly and need ``config``. ``checkpoint``: its content, when already read."""
    if checkpoint is None:
        checkpoint = read_model_checkpoint(path, config, config_source)
    saved_config = dict(checkpoint["config"])
    split = ClassSplit.from_dict(checkpoint["class_split"])
    embeddings = checkpoint.get("embeddings")
    if embeddings is None:
        embeddings = load_split_and_embeddings(saved_config["data"], str(path))[1]
    model, semantic_encoder = build_encoders(saved_config, split.num_classes, embeddings.shape[1], pretrained=False)
    load_encoder_weights(model, semantic_encoder, checkpoint, path)
    best_sigma = checkpoint.get("best_sigma")
    trained = TrainedModel(model.eval(), semantic_encoder.eval(), split, embeddings.float(), saved_config,
                           int(checkpoint.get("epoch", 0)), None if best_sigma is None else float(best_sigma))
    place(model, semantic_encoder, device, trained.channels_last)
    return trained
