"""Official JoEm checkpoints: recognise the fe_/gen_ file pair and convert it to this project's format.

The official code saves the visual encoder as ``fe_checkpoint-epochN.pth`` /
``model_best_fe.pth`` and the semantic encoder beside it as ``gen_checkpoint-epochN.pth`` /
``model_best_gen.pth``, each ``{'arch', 'epoch', 'state_dict', 'optimizer', 'monitor_best'}``.
They hold no class list, split or embeddings, so a config supplies them.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from data_loader import load_split_and_embeddings
from utils.checkpoint import FORMAT, VERSION, architecture, load_checkpoint
from utils.errors import ConfigError
from utils.settings import Settings

logger = logging.getLogger("joem")


def is_official(checkpoint: dict) -> bool:
    """True for an official JoEm file (a bare ``state_dict`` dict, not this project's format)."""
    return isinstance(checkpoint, dict) and "state_dict" in checkpoint and checkpoint.get("format") != FORMAT


def semantic_encoder_path(visual_path: str | Path) -> Path:
    """``fe_checkpoint-epochN.pth`` -> ``gen_checkpoint-epochN.pth``; ``model_best_fe.pth`` ->
    ``model_best_gen.pth`` (same folder)."""
    path = Path(visual_path)
    name = path.name
    if re.fullmatch(r"fe_.+", name):
        return path.with_name("gen_" + name[3:])
    if name.endswith("_fe.pth"):
        return path.with_name(name[: -len("_fe.pth")] + "_gen.pth")
    raise ConfigError(f"{path}: not an official visual-encoder file name (fe_*.pth or *_fe.pth)")


def _state_dict(checkpoint: dict, path: Path) -> dict:
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: official checkpoint without a state_dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def convert_official(visual_path: str | Path, settings: Settings, visual: dict | None = None) -> dict:
    """This project's checkpoint content (weights, split, embeddings, config; no optimizer)
    from an official fe_/gen_ pair and the settings of the config that names the classes and
    split (``visual``: the visual-encoder file's content when it has been read already)."""
    visual_path = Path(visual_path)
    semantic_path = semantic_encoder_path(visual_path)
    if not semantic_path.is_file():
        raise ConfigError(f"{visual_path}: the official semantic-encoder file {semantic_path.name} is missing "
                          "beside it")
    visual = load_checkpoint(visual_path) if visual is None else visual
    semantic = load_checkpoint(semantic_path)
    for path, checkpoint in ((visual_path, visual), (semantic_path, semantic)):
        if not is_official(checkpoint):
            raise ConfigError(f"{path}: not an official JoEm checkpoint (no state_dict)")
    split, embeddings = load_split_and_embeddings(settings.data, settings.source)
    converted = {"format": FORMAT, "version": VERSION, "epoch": int(visual.get("epoch", 0) or 0),
                 "visual_encoder": _state_dict(visual, visual_path),
                 "semantic_encoder": _state_dict(semantic, semantic_path),
                 "config": settings.record(), "class_split": split.to_dict(), "embeddings": embeddings,
                 "architecture": architecture(settings), "converted_from": [str(visual_path), str(semantic_path)]}
    logger.info("converted official JoEm checkpoint %s + %s (epoch %d) to this project's format",
                visual_path, semantic_path.name, converted["epoch"])
    return converted
