"""Checkpoint files (both encoders, optimizers, schedule, split and config): written atomically,
read weights-only; every failure is a one-line :class:`ConfigError` naming the file."""
from __future__ import annotations

import pickle
import random
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.errors import ConfigError, first_line
from utils.run_dir import BEST_NAME, CONFIG_NAME, epoch_checkpoints
from utils.settings import Settings
from utils.util import atomic_torch_save, read_json

FORMAT = "joem-checkpoint"
VERSION = 1
# Model options that change the architecture (and so the state_dict); others may differ.
_ARCH_KEYS = {"model": ("type", "backbone", "output_stride", "global_avg_pool_bn", "feature_dim"),
              "semantic_encoder": ("type", "hidden_size")}


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states in weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       *(v.item() if hasattr(v, "item") else v for v in np_state[2:])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def architecture(settings: Settings) -> dict:
    """The settings' encoder entries that determine the checkpoint's tensor shapes."""
    arch = {}
    for section, keys in _ARCH_KEYS.items():
        spec = getattr(settings, section)
        merged = {"type": spec.type, **spec.args}
        arch[section] = {k: merged.get(k) for k in keys if k in merged}
    return arch


def run_checkpoint(folder: str | Path) -> tuple[Path, str]:
    """The checkpoint a run folder stands for, with a note saying which: ``model_best.pth`` when the
    run chose it on a model-selection split of its own, else its last epoch's (the official protocol)."""
    folder = Path(folder)
    best, config = folder / BEST_NAME, folder / CONFIG_NAME
    if best.is_file() and config.is_file():
        try:
            settings = Settings.of_trained(read_json(config), str(config))
        except ConfigError:   # an unreadable config: its final weights
            settings = None
        if settings and settings.selects_checkpoint:
            return best, "the run's checkpoint chosen on its selection split"
    epochs = epoch_checkpoints(folder)
    if not epochs:
        raise ConfigError(f"{folder}: no checkpoint-epochN.pth (the final weights) in this run folder")
    last = max(epochs)
    return epochs[last], f"the run's final weights (epoch {last})"


def save_checkpoint(path: str | Path, **content: Any) -> None:
    """Atomically write a checkpoint dict (plus format tag and RNG states)."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, "rng": rng_state(), **content}, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely (weights only); clear errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(f"{path}: refused: not a weights-only checkpoint ({first_line(err, 200)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, struct.error) as err:
        raise ConfigError(f"{path}: corrupted or truncated checkpoint ({first_line(err, 200)})") from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"{path}: not a checkpoint (holds a {type(checkpoint).__name__})")
    return checkpoint


def check_compatible(checkpoint: dict, path: str | Path, settings: Settings, split_dict: dict) -> None:
    """Refuse a checkpoint whose class list, unseen split or architecture differs from the settings'."""
    if checkpoint.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a checkpoint of this project (no '{FORMAT}' tag)")
    saved = {"names": [], "unseen": [], "has_background": True, **checkpoint.get("class_split", {})}
    names, background = split_dict["names"], split_dict.get("has_background", True)
    if list(saved["names"]) != list(names):
        raise ConfigError(f"{path}: class list differs from the config's ({len(saved['names'])} vs {len(names)} "
                          "classes)")
    if list(saved["unseen"]) != list(split_dict["unseen"]):
        raise ConfigError(f"{path}: trained with unseen classes {[names[i] for i in saved['unseen']]}, but the "
                          f"config's split is {[names[i] for i in split_dict['unseen']]}")
    if bool(saved["has_background"]) != bool(background):
        raise ConfigError(f"{path}: trained with has_background {saved['has_background']}, the config's split has "
                          f"{background}")
    saved_arch, wanted_arch = checkpoint.get("architecture", {}), architecture(settings)
    for section, spec in wanted_arch.items():
        for key, value in spec.items():
            if key in saved_arch.get(section, {}) and saved_arch[section][key] != value:
                raise ConfigError(f"{path}: architecture differs: {section}.{key} is {saved_arch[section][key]!r} "
                                  f"in the checkpoint, {value!r} in the config")


def load_state(module: torch.nn.Module, state: dict, path: str | Path, what: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]   # the first names the class
        raise ConfigError(f"{path}: {what} weights do not fit the model: {' '.join(lines[1:3])[:300]}") from None
