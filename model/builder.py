"""The one builder of the two encoders from the checked settings (training, test, predict, benchmarks),
the ImageNet backbone weights, and checkpoint weights."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from model.kernels import apply_kernels
from model.semantic_encoder import SemanticEncoder
from model.visual_encoder import DeepLabV3Plus
from utils.checkpoint import load_checkpoint, load_state
from utils.errors import ConfigError
from utils.parse_config import construct
from utils.schema import EncoderSection
from utils.settings import Settings

VISUAL_ENCODERS = {"DeepLabV3Plus": DeepLabV3Plus}
SEMANTIC_ENCODERS = {"SemanticEncoder": SemanticEncoder}
PRETRAINED_KEY = "pretrained_backbone"   # model.args: the ImageNet backbone file, loaded here


def build_encoders(settings: Settings, num_classes: int, embed_dim: int,
                   pretrained: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The configured visual encoder (``model``) for ``num_classes`` classes, with the ImageNet
    backbone file of ``model.args.pretrained_backbone`` (unless ``pretrained`` is false: the weights
    come from a checkpoint) and the ``trainer.cpu_kernels``; and the semantic encoder
    (``semantic_encoder``) from ``embed_dim``-d embeddings to the visual feature size."""
    if "num_classes" in settings.model.args:
        raise ConfigError("config key model.args.num_classes: set by the class list, remove it")
    args = dict(settings.model.args)
    backbone_file = args.pop(PRETRAINED_KEY, None)
    visual = construct(VISUAL_ENCODERS, EncoderSection(settings.model.type, args), "model", num_classes=num_classes)
    if pretrained and backbone_file:
        load_pretrained_backbone(visual.backbone, backbone_file)
    apply_kernels(visual, settings.trainer.cpu_kernels)
    semantic = construct(SEMANTIC_ENCODERS, settings.semantic_encoder, "semantic_encoder", embed_dim=embed_dim,
                         feature_dim=visual.decoder.pred_conv.in_channels)
    return visual, semantic


def load_pretrained_backbone(backbone: torch.nn.Module, path: str | Path) -> None:
    """Load ImageNet weights into the backbone: a torchvision ResNet ``state_dict`` (its ``fc.*``
    ignored), or a whole-model file such as an official JoEm release (``{"state_dict": ...}``, keys
    ``backbone.*``, ``module.`` prefixes removed). Every backbone tensor must be there and nothing
    else: a one-line ConfigError names the missing and unexpected keys."""
    where = f"model.args.{PRETRAINED_KEY}: {path}"
    try:
        state = load_checkpoint(path)
    except ConfigError as err:
        raise ConfigError(f"model.args.{PRETRAINED_KEY}: {err}") from None
    state = state.get("state_dict", state)
    if not isinstance(state, dict):
        raise ConfigError(f"{where}: does not hold a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    wanted = backbone.state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    shapes = [k for k in set(wanted) & set(state) if tuple(wanted[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        def listed(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "") if keys else "none"
        raise ConfigError(f"{where}: does not match the backbone: missing keys: {listed(missing)}; unexpected keys: "
                          f"{listed(unexpected)}; other shapes: {listed(sorted(shapes))}")
    backbone.load_state_dict(state, strict=True)


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
