"""Load a trained model (both encoders, class split, embeddings) from a checkpoint for inference."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from data_loader.classes import ClassSplit
from trainer.builders import build_semantic_encoder, build_visual_encoder
from trainer.official import convert_official, is_official
from utils.checkpoint import FORMAT, load_checkpoint, load_state
from utils.parse_config import ConfigParser
from utils.util import ConfigError


@dataclass
class TrainedModel:
    """Everything inference needs: encoders (eval mode), class split, class embeddings."""

    model: torch.nn.Module
    semantic_encoder: torch.nn.Module
    split: ClassSplit
    embeddings: torch.Tensor
    config: dict
    epoch: int

    @torch.inference_mode()
    def prototypes(self, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Prototypes (K x 256) of the given embeddings (default: the checkpoint's classes)."""
        table = self.embeddings if embeddings is None else embeddings
        device = next(self.semantic_encoder.parameters()).device
        return self.semantic_encoder(table.to(device).float()).float()


def load_trained_model(path: str | Path, device: torch.device | str = "cpu", config: dict | None = None,
                       config_source: str = "config") -> TrainedModel:
    """Build the encoders described by a checkpoint and load its weights.

    Official JoEm files (``model_best_fe.pth`` with ``model_best_gen.pth`` beside it) are
    converted on the fly and need ``config`` for the class list, split and embeddings.
    """
    checkpoint = load_checkpoint(path)
    if is_official(checkpoint):
        if config is None:
            raise ConfigError(f"{path}: an official JoEm checkpoint holds no class list; give the config (-c)")
        checkpoint = convert_official(path, config, config_source)
    if checkpoint.get("format") != FORMAT or "visual_encoder" not in checkpoint:
        raise ConfigError(f"{path}: not a checkpoint of this project")
    config = ConfigParser(checkpoint["config"], create_dirs=False)
    split = ClassSplit.from_dict(checkpoint["class_split"])
    embeddings = checkpoint.get("embeddings")
    if embeddings is None:
        from data_loader import prepare_data
        embeddings = prepare_data(config["data"], train=False, val=False, source=str(path)).embeddings
    model = build_visual_encoder(config, split.num_classes, load_pretrained=False)
    semantic_encoder = build_semantic_encoder(config, embeddings.shape[1], model.decoder.pred_conv.in_channels)
    load_state(model, checkpoint["visual_encoder"], path, "visual encoder")
    load_state(semantic_encoder, checkpoint["semantic_encoder"], path, "semantic encoder")
    model.to(device).eval()
    semantic_encoder.to(device).eval()
    return TrainedModel(model, semantic_encoder, split, embeddings.float(), checkpoint["config"],
                        int(checkpoint.get("epoch", 0)))
