"""The one builder of the two encoders from the checked settings (training, test, predict, benchmarks)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import torch

from model.semantic_encoder import SemanticEncoder
from model.visual_encoder import DeepLabV3Plus
from utils.checkpoint import load_state
from utils.errors import ConfigError
from utils.parse_config import construct
from utils.settings import Settings

VISUAL_ENCODERS = {"DeepLabV3Plus": DeepLabV3Plus}
SEMANTIC_ENCODERS = {"SemanticEncoder": SemanticEncoder}


def build_encoders(settings: Settings, num_classes: int, embed_dim: int,
                   pretrained: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The configured visual encoder (``model``) for ``num_classes`` classes and semantic encoder
    (``semantic_encoder``) from ``embed_dim``-d embeddings to the visual feature size.

    ``pretrained=False`` skips the ImageNet backbone file (the weights come from a checkpoint)."""
    if "num_classes" in settings.model.args:
        raise ConfigError("config key model.args.num_classes: set by the class list, remove it")
    extra = {} if pretrained else {"pretrained_backbone": None}
    spec = settings.model if pretrained else dataclasses.replace(
        settings.model, args={k: v for k, v in settings.model.args.items() if k != "pretrained_backbone"})
    visual = construct(VISUAL_ENCODERS, spec, "model", num_classes=num_classes, **extra)
    semantic = construct(SEMANTIC_ENCODERS, settings.semantic_encoder, "semantic_encoder", embed_dim=embed_dim,
                         feature_dim=visual.decoder.pred_conv.in_channels)
    return visual, semantic


def load_encoder_weights(visual: torch.nn.Module, semantic: torch.nn.Module, checkpoint: Mapping,
                         path: str | Path) -> None:
    """Both encoders' weights from a checkpoint of this project (strict; errors name the file)."""
    load_state(visual, checkpoint["visual_encoder"], path, "visual encoder")
    load_state(semantic, checkpoint["semantic_encoder"], path, "semantic encoder")


def place(visual: torch.nn.Module, semantic: torch.nn.Module, device: torch.device | str,
          channels_last: bool = False) -> None:
    """Move both encoders to ``device`` (the visual one channels_last when asked)."""
    visual.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    semantic.to(device)
