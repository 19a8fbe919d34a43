"""A tiny synthetic config for fast CPU runs of the full command line."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"type": "Synthetic", "unseen_classes": ["red checker", "green vstripe"],
             "embeddings": {"normalize": "max_norm"},
             "synthetic": {"seed": 0, "num_train": 40, "num_val": 6, "image_size": 32,
                           "colours": ["red", "green", "blue"], "textures": ["solid", "vstripe", "checker"]},
             "train_split": "train", "val_split": "val", "selection_split": {"holdout": 6, "seed": 0},
             "base_size": 32, "crop_size": 32,
             "scale_range": [0.75, 1.25], "remove_unseen_images": True, "ignore_bg": False, "ignore_unseen": False},
    "data_loader": {"batch_size": 4, "val_batch_size": 3, "num_workers": 0},
    "model": {"type": "DeepLabV3Plus", "args": {"backbone": 18, "output_stride": 16, "freeze_backbone_bn": False}},
    "semantic_encoder": {"type": "SemanticEncoder", "args": {"hidden_size": 0}},
    "optimizer": {"type": "Adam", "args": {"lr": 1e-3}, "head_lr_mult": 1},
    "optimizer_gen": {"type": "Adam", "args": {"lr": 1e-3}},
    "lr_scheduler": {"type": "poly", "power": 0.9, "interval": "epoch"},
    "loss": {"ratio": 0.25, "temperature": 5, "alpha": 0.1},
    "inference": {"sigma": 0.5},
    "trainer": {"epochs": 2, "save_period": 1, "monitor": "max mIoU_harmonic", "amp": False,
                "channels_last": False, "tensorboard": False},
}


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        tree = tree[key]
    tree[keys[-1]] = value


def write_tiny_config(tmp_path: Path, cache: Path, **overrides) -> Path:
    """Write the tiny config into ``tmp_path`` (runs under ``tmp_path/saved``); dotted overrides."""
    config = copy.deepcopy(TINY)
    config["data"]["synthetic"]["cache_dir"] = str(cache)
    config["trainer"]["save_dir"] = str(tmp_path / "saved")
    for key, value in overrides.items():
        _set(config, key.replace("__", "."), value)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fit_prototypes(model: torch.nn.Module, image: torch.Tensor, num_classes: int, dim: int = 8):
    """For an untrained visual encoder: a linear semantic encoder onto the ``dim`` main directions
    of ``image``'s features and ``num_classes`` class embeddings at k-means centres of its pixels,
    so that predictions use several classes (random prototypes give one class everywhere).
    Returns (semantic encoder, embeddings)."""
    from model import SemanticEncoder
    encoder = SemanticEncoder(dim, 256, 0)
    with torch.no_grad():
        pixels = model.features(image).permute(0, 2, 3, 1).reshape(-1, 256)
        mean = pixels.mean(0)
        _, singular, directions = torch.pca_lowrank(pixels - mean, q=dim, center=False)
        scale = singular / len(pixels) ** 0.5
        encoder.model.weight.copy_(directions * scale)
        encoder.model.bias.copy_(mean)
        coords = (pixels - mean) @ directions / scale
        centres = coords[torch.linspace(0, len(coords) - 1, num_classes).long()]
        for _ in range(10):
            nearest = torch.cdist(coords, centres).argmin(1)
            centres = torch.stack([coords[nearest == k].mean(0) if (nearest == k).any() else centres[k]
                                   for k in range(num_classes)])
    return encoder, centres
