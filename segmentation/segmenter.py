"""The Python segmenter: a trained JoEm model, any class list, images in, label maps out.

    from segmentation.segmenter import Segmenter
    segmenter = Segmenter.from_checkpoint("saved/synthetic_zs3/<run>")   # a run folder or a .pth
    labels = segmenter("photo.jpg")                     # H x W int64 class indices
    segmenter.names                                     # class of each index

Classes missing from the checkpoint take their embedding from a file (rows named by its
``X.classes.txt`` sidecar) and their prototype from the semantic encoder: no retraining.
Images go through :class:`model.predictor.Predictor`, the path ``--test`` uses, so the same
checkpoint, image, sigma, calibration and precision give the same labels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_loader.classes import canonical_name, load_class_names, match_names, resolve_indices
from data_loader.dataset import read_image
from data_loader.embeddings import classes_sidecar, embedding_row_names, load_class_embeddings, normalize_embeddings
from data_loader.transforms import to_model_input
from model.predictor import Predictor
from segmentation.trained import TrainedModel, load_trained_model
from utils.amp import resolve_precision
from utils.checkpoint import run_checkpoint
from utils.distributed import resolve_device
from utils.errors import ConfigError
from utils.schema import CALIBRATIONS, InferenceSettings, SlidingWindow
from utils.sections import parse_section

ImageLike = str | Path | np.ndarray | torch.Tensor | Any   # Any: a PIL image


@dataclass
class Prediction:
    """One image's result: labels (H x W int64, CPU), optionally the squared distance of every
    pixel to every class (K x H x W float32, CPU), and how many tiles the encoder saw."""

    labels: torch.Tensor
    distances: torch.Tensor | None = None
    tiles: int = 1


@dataclass
class ClassChoice:
    """A class list: names (label i = names[i]), embeddings, calibrated (unseen) indices, and
    the indices whose embedding came from an extra embedding file."""

    names: list[str]
    embeddings: torch.Tensor
    unseen: list[int]
    extra: list[int]


def image_tensor(image: ImageLike) -> torch.Tensor:
    """A uint8 3 x H x W tensor from a path (EXIF orientation applied), a PIL image, an
    H x W x 3 uint8 array, or a 3 x H x W tensor (uint8, or float in [0, 1])."""
    if isinstance(image, (str, Path)):
        return read_image(Path(image), exif_transpose=True)
    if hasattr(image, "convert") and hasattr(image, "size"):          # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ConfigError(f"image array: expected H x W x 3 uint8, got {image.shape} {image.dtype}")
        return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ConfigError(f"image tensor: expected 3 x H x W, got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image
        if image.is_floating_point() and image.numel() and 0 <= float(image.min()) and float(image.max()) <= 1:
            return (image.float() * 255).round().to(torch.uint8)
        raise ConfigError("image tensor: expected uint8, or float values in [0, 1]")
    raise ConfigError(f"image: expected a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}")


def read_extra_embeddings(path: str | Path, names_spec: Any, normalize: str | None,
                          dim: int) -> tuple[list[str], torch.Tensor]:
    """An embedding file's row names and rows (normalised as asked). Row names come from
    ``names_spec`` (list, comma string or file) or the file's ``.classes.txt`` sidecar."""
    file = Path(path)
    table = normalize_embeddings(load_class_embeddings(file), normalize)
    names, _ = embedding_row_names(file, names_spec, None, "embedding classes")
    if names is None:
        raise ConfigError(f"{file}: no names for its rows: give the embedding classes or write "
                          f"{classes_sidecar(file).name} beside it (one class name a line)")
    if len(names) != table.shape[0]:
        raise ConfigError(f"{file}: has {table.shape[0]} rows but {len(names)} class names are given")
    if table.shape[1] != dim:
        raise ConfigError(f"{file}: embeddings have {table.shape[1]} dims, the checkpoint's have {dim}")
    return list(names), table


def choose_classes(trained: TrainedModel, classes: Any = None, embeddings: str | Path | None = None,
                   embedding_classes: Any = None, unseen: Any = None, normalize: str | None = None) -> ClassChoice:
    """Resolve a class list, its embeddings and which classes are calibrated as unseen.

    Names match case-insensitively, ignoring spaces, ``_`` and ``-`` (and the usual aliases
    such as tv/tvmonitor). A class of the checkpoint keeps the checkpoint's embedding; any
    other comes from ``embeddings`` and is unseen unless ``unseen`` says otherwise.
    ``normalize``: none (default), l2, max_norm, or "checkpoint" (the training config's mode).
    """
    ckpt_names = list(trained.split.names)
    if normalize == "checkpoint":
        normalize = trained.settings.data.embeddings.normalize
    extra_names, extra_table = ([], None) if not embeddings else read_extra_embeddings(
        embeddings, embedding_classes, normalize, trained.embeddings.shape[1])
    wanted = ckpt_names if classes is None else list(load_class_names(classes, "classes", None))
    names, rows, extra = [], [], []
    for name, ckpt_row, extra_row in zip(wanted, match_names(wanted, ckpt_names), match_names(wanted, extra_names)):
        if ckpt_row is not None:
            names.append(ckpt_names[ckpt_row])
            rows.append(trained.embeddings[ckpt_row])
        elif extra_row is not None:
            extra.append(len(names))
            names.append(extra_names[extra_row])
            rows.append(extra_table[extra_row])
        else:
            message = f"classes: unknown class {name!r}; checkpoint classes: {', '.join(ckpt_names)}"
            message += (f"; in {embeddings}: {', '.join(extra_names)}" if embeddings
                        else "; other classes need an embedding file")
            raise ConfigError(message)
    chosen = ClassChoice(names, torch.stack(rows).float(), [], extra)
    chosen.unseen = _unseen_indices(chosen, unseen, {canonical_name(ckpt_names[i]) for i in trained.split.unseen})
    return chosen


def _unseen_indices(chosen: ClassChoice, unseen: Any, ckpt_unseen: set[str]) -> list[int]:
    """Exactly ``unseen`` when given ("none" or [] for no calibration), else the checkpoint's
    unseen classes among the chosen ones plus every extra class."""
    if unseen is None:
        return sorted({i for i, name in enumerate(chosen.names) if canonical_name(name) in ckpt_unseen}
                      | set(chosen.extra))
    if (isinstance(unseen, str) and unseen.strip().lower() in ("", "none")) or (
            isinstance(unseen, (list, tuple)) and not unseen):
        return []
    return sorted(resolve_indices(
        load_class_names(unseen, "unseen", None), chosen.names, out_of_range=None,
        unknown=lambda name: f"unseen: {name!r} is not among the classes of this run: {', '.join(chosen.names)}",
        duplicate=lambda name, i: f"unseen: duplicate class {name!r} ({chosen.names[i]})"))


class Segmenter:
    """Segment images with a trained model and any class list.

    Args:
        trained: a loaded model (see :meth:`from_checkpoint`).
        classes: class names (list, comma string or file; default: the checkpoint's classes).
        embeddings: embedding file for classes the checkpoint does not know; its rows are named by
            ``embedding_classes`` or by the sidecar ``X.classes.txt``; ``normalize`` its rows.
        unseen: classes to calibrate (default: the checkpoint's unseen ones plus the new ones).
        sigma, calibration: Apollonius calibration (default: the checkpoint's config; when the
            config lists several sigmas, the best sigma of the validation that chose the checkpoint).
        amp, channels_last, window: precision (``"auto"``: what the device runs natively, see
            utils.amp), memory format and sliding window (default: as the checkpoint's config evaluates).
    """

    def __init__(self, trained: TrainedModel, classes: Any = None, *, embeddings: str | Path | None = None,
                 embedding_classes: Any = None, normalize: str | None = None, unseen: Any = None,
                 sigma: float | None = None, calibration: str | None = None, amp: str | bool | None = None,
                 channels_last: bool | None = None, window: SlidingWindow | dict | None = None):
        self.trained = trained
        settings: InferenceSettings = trained.settings.inference
        self.classes = choose_classes(trained, classes, embeddings, embedding_classes, unseen, normalize)
        self.sigma = float(sigma if sigma is not None else self._default_sigma(settings))
        if not self.sigma > 0:
            raise ConfigError(f"sigma: must be positive, got {self.sigma}")
        self.calibration = calibration or settings.calibration
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration: {self.calibration!r}; valid: {', '.join(CALIBRATIONS)}")
        # "auto" resolved for the model's device; .precision.warning says when the choice is slow here
        self.precision = resolve_precision(trained.settings.trainer.amp if amp is None else amp, trained.device)
        if isinstance(window, dict):
            window = parse_section(SlidingWindow, {**asdict(settings.window), **window}, "window", "the window options")
        never = {canonical_name(trained.split.names[i]) for i in trained.split.never_predicted}
        excluded = [i for i, name in enumerate(self.names) if canonical_name(name) in never]
        self.predictor = Predictor.from_settings(
            trained.model, trained.semantic_encoder, self.classes.embeddings, trained.settings, self.classes.unseen,
            excluded, sigma=self.sigma, calibration=self.calibration, amp=self.precision.amp,
            channels_last=channels_last, window=window)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, config: dict | str | Path | None = None,
                        device: str | torch.device | None = None, **options) -> "Segmenter":
        """Load a checkpoint of this project (or a run folder: the checkpoint ``--test`` evaluates, see
        ``utils.checkpoint.run_checkpoint``; ``.checkpoint`` and ``.checkpoint_note`` say which), or an official JoEm
        ``*_fe.pth`` (with its ``*_gen.pth`` beside it and ``config``, a dict or a config file, naming
        classes, split and embeddings)."""
        note = None
        if Path(checkpoint).is_dir():
            checkpoint, note = run_checkpoint(checkpoint)
        source = "config"
        if isinstance(config, (str, Path)):
            from utils.parse_config import load_config
            source, config = str(config), load_config(config)
        trained = load_trained_model(checkpoint, resolve_device(device), config=config, config_source=source)
        segmenter = cls(trained, **options)
        segmenter.checkpoint, segmenter.checkpoint_note = Path(checkpoint), note
        return segmenter

    def _default_sigma(self, settings: InferenceSettings) -> float:
        if settings.sigma is not None:
            return settings.sigma
        if self.trained.best_sigma is not None:
            return self.trained.best_sigma
        raise ConfigError(f"the checkpoint's inference.sigma is a sweep {list(settings.sweep)} and it records no "
                          "best sigma: give sigma explicitly")

    @property
    def names(self) -> list[str]:
        return self.classes.names

    @property
    def unseen(self) -> list[int]:
        return self.classes.unseen

    def __call__(self, image: ImageLike) -> torch.Tensor:
        """Labels (H x W int64, CPU) of one image."""
        return self.predict(image).labels

    @torch.inference_mode()
    def predict(self, image: ImageLike, distances: bool = False) -> Prediction:
        """Labels of one image and, with ``distances``, every pixel's squared distance to each class."""
        return self.predict_input(to_model_input(image_tensor(image)), distances)

    @torch.inference_mode()
    def predict_input(self, inputs: torch.Tensor, distances: bool = False) -> Prediction:
        """:meth:`predict` of an image already normalised for the model (3 x H x W float, as a
        dataset gives it)."""
        inputs = inputs[None].to(self.trained.device)
        height, width = inputs.shape[-2:]
        labels = torch.empty(height, width, dtype=torch.long)
        table = torch.empty(len(self.names), height, width) if distances else None
        for band in self.predictor.bands(inputs):
            labels[band.rows] = band.labels[0, 0].cpu()
            if table is not None:
                table[:, band.rows] = band.distances[0].cpu()
        return Prediction(labels, table, self.predictor.tiles(height, width))
