"""Build the encoders, optimizers and LR schedule from a config."""
from __future__ import annotations

import torch

from model import SEMANTIC_ENCODERS, VISUAL_ENCODERS
from utils.parse_config import ConfigParser, call_with_config_args, lookup_type
from utils.util import ConfigError


def build_visual_encoder(config: ConfigParser, num_classes: int, load_pretrained: bool = True) -> torch.nn.Module:
    """The configured visual encoder (``model`` section) for ``num_classes`` classes.

    ``load_pretrained=False`` skips the ImageNet file (weights come from a checkpoint)."""
    spec = config["model"]
    args = dict(spec.get("args", {}))
    if "num_classes" in args:
        raise ConfigError("config key model.args.num_classes: set by the class list, remove it")
    if not load_pretrained:
        args["pretrained_backbone"] = None
    return call_with_config_args(lookup_type(VISUAL_ENCODERS, spec, "model"), "model", num_classes=num_classes, **args)


def build_semantic_encoder(config: ConfigParser, embed_dim: int, feature_dim: int = 256) -> torch.nn.Module:
    return config.init_obj("semantic_encoder", SEMANTIC_ENCODERS, embed_dim=embed_dim, feature_dim=feature_dim)


def build_optimizers(config: ConfigParser, model: torch.nn.Module, semantic_encoder: torch.nn.Module):
    """SGD-style optimizer for the visual encoder (1x backbone, ``head_lr_mult`` x ASPP+decoder)
    and the semantic encoder's optimizer (``optimizer_gen``, constant LR as official)."""
    spec = config["optimizer"]
    lr = float(spec.get("args", {}).get("lr", 0.01))
    groups = model.param_groups(lr, float(spec.get("head_lr_mult", 10.0)))
    optimizer = config.init_obj("optimizer", torch.optim, groups)
    optimizer_gen = config.init_obj("optimizer_gen", torch.optim, semantic_encoder.parameters())
    return optimizer, optimizer_gen


def build_scheduler(config: ConfigParser, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Poly LR (``interval`` "epoch": stepped once per epoch, epoch 1 at the base LR, as the
    official code; "step": every iteration) or ``"constant"``. Returns (scheduler, interval)."""
    spec = config.get("lr_scheduler", {"type": "poly"})
    kind = str(spec.get("type", "poly")).lower()
    interval = spec.get("interval", "epoch")
    if interval not in ("epoch", "step"):
        raise ConfigError(f"lr_scheduler.interval: must be \"epoch\" or \"step\", got {interval!r}")
    epochs = int(config["trainer"]["epochs"])
    if kind == "constant":
        return None, interval
    if kind != "poly":
        raise ConfigError(f"lr_scheduler.type: unknown {spec.get('type')!r}; valid: poly, constant")
    total = epochs if interval == "epoch" else epochs * max(1, steps_per_epoch)
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total,
                                                 power=float(spec.get("power", 0.9))), interval
