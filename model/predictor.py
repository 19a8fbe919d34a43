"""The one prediction path: a trained model's prototypes, unseen mask, sigma(s), calibration,
precision, window and excluded classes, from normalised images to squared distances and labels.

``--test`` and validation (``trainer/evaluate.py``), the Segmenter behind ``predict.py`` and the
figures, and the benchmark harness all build their :class:`Predictor` with
:meth:`Predictor.from_settings` and read it through :meth:`Predictor.bands`, so one checkpoint
gives one answer whatever the entry point.

Whole-image mode (the default, as the official test): the image goes through the visual encoder
at its own size (any size, no padding), the stride-4 features are upsampled bilinearly to full
resolution and each pixel takes its calibrated nearest prototype. Sliding-window mode (images
whose longer side exceeds ``inference.window.max_size``): the image is padded to a multiple of
4 and encoded in overlapping tiles whose features are averaged over the overlaps; this is an
approximation of the whole-image features (the network sees less context near tile borders).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from model.inference import GroupNearest, calibrate, distance_bands
from utils.amp import autocast_context, resolve_precision
from utils.schema import CALIBRATIONS, SlidingWindow
from utils.settings import Settings

FEATURE_STRIDE = 4
MAX_ELEMENTS = 1 << 26   # distance-map elements per band (256 MB in float32)


def class_mask(num_classes: int, indices: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Bool tensor ``[num_classes]``, True at ``indices`` (the unseen classes)."""
    mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    mask[list(indices)] = True
    return mask


@torch.inference_mode()
def class_prototypes(semantic_encoder: torch.nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
    """Prototypes K x C (float32) of class embeddings K x D, on the semantic encoder's device
    (the encoder is put in eval mode)."""
    semantic_encoder.eval()
    device = next(semantic_encoder.parameters()).device
    return semantic_encoder(embeddings.to(device).float()).float()


def encode(model: torch.nn.Module, images: torch.Tensor, amp: str | bool | None = None,
           channels_last: bool = False) -> torch.Tensor:
    """The visual encoder's stride-4 features (``model.features``) under autocast, as float32."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_context(images.device, amp):
        features = model.features(images)
    return features.float()


def tile_starts(length: int, tile: int, step: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` every ``step`` pixels.

    The last tile ends exactly at ``length``; a side not longer than ``tile`` is one span.
    """
    starts = list(range(0, max(length - tile, 0) + 1, step))
    return starts if starts[-1] >= length - tile else [*starts, length - tile]


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles ``(top, left, tile_height, tile_width)`` covering a ``height x width`` image."""
    step = tile - overlap
    th, tw = min(tile, height), min(tile, width)
    return [(top, left, th, tw) for top in tile_starts(height, tile, step) for left in tile_starts(width, tile, step)]


def sliding_window_features(model: torch.nn.Module, images: torch.Tensor, window: SlidingWindow,
                            amp: str | bool | None = None, channels_last: bool = False) -> torch.Tensor:
    """Stride-4 features of N x 3 x H x W images (H, W multiples of 4) from overlapping tiles,
    each feature cell the mean of what every covering tile computed for it (float32)."""
    n, _, height, width = images.shape
    s = FEATURE_STRIDE
    if height % s or width % s:
        raise ValueError(f"sliding window: image sides {height}x{width} must be multiples of {s} (pad first)")
    boxes = tile_boxes(height, width, window.tile, window.overlap)
    total = count = None
    for start in range(0, len(boxes), window.batch):
        group = boxes[start:start + window.batch]
        crops = torch.cat([images[:, :, top:top + th, left:left + tw] for top, left, th, tw in group])
        features = encode(model, crops, amp, channels_last)
        th, tw = group[0][2], group[0][3]
        if tuple(features.shape[-2:]) != (th // s, tw // s):
            raise ValueError(f"sliding window: a {th}x{tw} tile gave {tuple(features.shape[-2:])} features, "
                             f"expected {(th // s, tw // s)} (feature stride {s})")
        if total is None:
            total = features.new_zeros(n, features.shape[1], height // s, width // s)
            count = features.new_zeros(1, 1, height // s, width // s)
        for index, (top, left, th, tw) in enumerate(group):
            rows, cols = slice(top // s, (top + th) // s), slice(left // s, (left + tw) // s)
            total[:, :, rows, cols] += features[index * n:(index + 1) * n]
            count[:, :, rows, cols] += 1
    return total / count


@dataclass
class Band:
    """A band of rows of the images a predictor reads: ``distances`` N x K x rows x W (squared, an
    excluded class at infinity) and ``labels`` S x N x rows x W (int64) at each of the S sigmas."""

    rows: slice
    distances: torch.Tensor
    labels: torch.Tensor


@dataclass
class Predictor:
    """Calibrated nearest-prototype inference of one model.

    ``model``: anything with ``features(images)`` (the visual encoder); ``prototypes`` K x C;
    ``unseen_mask`` [K] bool; ``sigma``: one value or several (every band holds the labels at each,
    all from one distance computation); ``calibration``: "top2" (official) or "all";
    ``amp``/``channels_last``: how the encoder runs (a resolved precision); ``window``: the sliding
    window for large images; ``excluded``: classes never predicted (an ignored background)."""

    model: object
    prototypes: torch.Tensor
    unseen_mask: torch.Tensor
    sigma: float | Sequence[float]
    calibration: str = "top2"
    amp: str | bool | None = None
    channels_last: bool = False
    window: SlidingWindow | None = None
    excluded: Sequence[int] = ()
    max_elements: int = MAX_ELEMENTS

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration mode must be one of {CALIBRATIONS}, got {self.calibration!r}")
        self.prototypes = self.prototypes.float()
        self.unseen_mask = self.unseen_mask.to(device=self.prototypes.device, dtype=torch.bool)
        self.sigma_list = [float(s) for s in (self.sigma if isinstance(self.sigma, (list, tuple)) else [self.sigma])]
        self.sigmas = torch.tensor(self.sigma_list, dtype=torch.float32, device=self.prototypes.device)

    @classmethod
    def from_settings(cls, model: object, semantic_encoder: torch.nn.Module, embeddings: torch.Tensor,
                      settings: Settings, unseen: Sequence[int], excluded: Sequence[int], *,
                      sigma: float | Sequence[float] | None = None, calibration: str | None = None,
                      amp: str | bool | None = None, channels_last: bool | None = None,
                      window: SlidingWindow | None = None) -> "Predictor":
        """The one factory: the predictor of ``model`` for classes with these ``embeddings`` (K x D),
        ``unseen`` calibrated and ``excluded`` never predicted; every option not given comes from
        ``settings`` (``inference``: every sigma, calibration, window; ``trainer``: precision, resolved
        for the encoders' device when it is ``"auto"``, and memory format)."""
        prototypes = class_prototypes(semantic_encoder, embeddings)
        inference, trainer = settings.inference, settings.trainer
        amp = resolve_precision(trainer.amp if amp is None else amp, prototypes.device).amp
        return cls(model, prototypes, class_mask(len(prototypes), unseen, prototypes.device),
                   inference.sigmas if sigma is None else sigma, calibration or inference.calibration, amp,
                   trainer.channels_last if channels_last is None else channels_last, window or inference.window,
                   tuple(excluded))

    def tiles(self, height: int, width: int) -> int:
        """How many tiles an image of this size is encoded in (1: the whole image)."""
        if self.window is None or not self.window.applies(height, width):
            return 1
        return len(tile_boxes(height + -height % FEATURE_STRIDE, width + -width % FEATURE_STRIDE, self.window.tile,
                              self.window.overlap))

    def bands(self, images: torch.Tensor) -> Iterator[Band]:
        """Distances and labels of every pixel of ``images`` (N x 3 x H x W, normalised, one size),
        band of rows by band of rows (the one turn from features to labels). Call under
        ``torch.inference_mode()``."""
        height, width = images.shape[-2:]
        if self.window is not None and self.window.applies(height, width):
            pad_h, pad_w = height + -height % FEATURE_STRIDE, width + -width % FEATURE_STRIDE
            padded = F.pad(images, (0, pad_w - width, 0, pad_h - height))  # zeros: the mean colour
            features = sliding_window_features(self.model, padded, self.window, self.amp, self.channels_last)
            size = (pad_h, pad_w)
        else:
            features, size = encode(self.model, images, self.amp, self.channels_last), (height, width)
        allowed = None
        if len(self.excluded):
            allowed = torch.ones(self.prototypes.shape[0], dtype=torch.bool, device=self.prototypes.device)
            allowed[list(self.excluded)] = False
        for rows, distances in distance_bands(features, self.prototypes, size, self.max_elements):
            if rows.start >= height:
                break
            rows = slice(rows.start, min(rows.stop, height))
            distances = distances[:, :, :rows.stop - rows.start, :width]
            if allowed is not None:
                distances = distances.masked_fill(~allowed[None, :, None, None], float("inf"))
            yield Band(rows, distances, calibrate(distances, self.unseen_mask, self.sigmas, self.calibration))

    def nearest_groups(self, distances: torch.Tensor) -> GroupNearest:
        """Each pixel's nearest seen and nearest unseen class (the sweep's ends, calibrated stacking)."""
        return GroupNearest(distances, self.unseen_mask)

    @torch.inference_mode()
    def labels(self, images: torch.Tensor) -> torch.Tensor:
        """Labels (int64) of normalised images N x 3 x H x W: S x N x H x W at the S sigmas."""
        n, _, height, width = images.shape
        labels = torch.empty(len(self.sigma_list), n, height, width, dtype=torch.long, device=images.device)
        for band in self.bands(images):
            labels[..., band.rows, :] = band.labels
        return labels
