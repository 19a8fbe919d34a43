"""The one predictor: a trained model's prototypes, unseen mask, sigma(s), calibration,
precision, window and excluded classes, from normalised images to distances and labels.

Evaluation and ``--test`` (``trainer/evaluate.py``), the Segmenter behind ``predict.py`` and
the figures, and the benchmark harness all build a :class:`Predictor`, so one checkpoint gives
one answer whatever the entry point. Prototypes (:func:`class_prototypes`), the unseen mask
(:func:`class_mask`) and the turn from distances to labels (:meth:`Predictor.calibrated`) are
computed here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from model.inference import GroupNearest, calibrate
from model.segment import MAX_ELEMENTS, pixel_distances
from utils.schema import CALIBRATIONS, SlidingWindow


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


@dataclass
class Predictor:
    """Calibrated nearest-prototype inference of one model.

    ``model``: anything with ``features(images)`` (the visual encoder); ``prototypes`` K x C;
    ``unseen_mask`` [K] bool; ``sigma``: one value (labels N x H x W) or several (S x N x H x W,
    all from one distance computation); ``calibration``: "top2" (official) or "all";
    ``amp``/``channels_last``: how the encoder runs; ``window``: the sliding window for large
    images; ``excluded``: classes never predicted (an ignored background)."""

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
        self.sigmas = torch.as_tensor(self.sigma, dtype=torch.float32, device=self.prototypes.device)

    @classmethod
    def build(cls, model: object, semantic_encoder: torch.nn.Module, embeddings: torch.Tensor,
              unseen: Sequence[int], sigma: float | Sequence[float], **options) -> "Predictor":
        """The predictor of ``model`` for classes with these ``embeddings`` (K x D), ``unseen``
        indices calibrated (options: see the class)."""
        prototypes = class_prototypes(semantic_encoder, embeddings)
        return cls(model, prototypes, class_mask(len(prototypes), unseen, prototypes.device), sigma, **options)

    @property
    def sigma_list(self) -> list[float]:
        """The sigma(s) as given, a list."""
        return [float(s) for s in (self.sigma if isinstance(self.sigma, (list, tuple)) else [self.sigma])]

    def distances(self, images: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """Squared distances of every pixel of ``images`` (N x 3 x H x W, normalised, one size) to
        every prototype, in bands of rows ``(rows, N x K x len(rows) x W)``; excluded classes at
        infinity. Call under ``torch.inference_mode()``."""
        return pixel_distances(self.model, images, self.prototypes, amp=self.amp, channels_last=self.channels_last,
                               window=self.window, excluded=self.excluded, max_elements=self.max_elements)

    def calibrated(self, distances: torch.Tensor) -> torch.Tensor:
        """Labels of a band of distances at every sigma (the one turn from distances to labels)."""
        return calibrate(distances, self.unseen_mask, self.sigmas, self.calibration)

    def nearest_groups(self, distances: torch.Tensor) -> GroupNearest:
        """Each pixel's nearest seen and nearest unseen class (the sweep's ends, calibrated stacking)."""
        return GroupNearest(distances, self.unseen_mask)

    @torch.inference_mode()
    def labels(self, images: torch.Tensor) -> torch.Tensor:
        """Labels (int64) of normalised images N x 3 x H x W: N x H x W for one sigma, S x N x H x W
        for S sigmas."""
        n, _, height, width = images.shape
        shape = (n, height, width) if self.sigmas.dim() == 0 else (len(self.sigmas), n, height, width)
        labels = torch.empty(shape, dtype=torch.long, device=images.device)
        for rows, band in self.distances(images):
            labels[..., rows, :] = self.calibrated(band)
        return labels


def segment(model: torch.nn.Module, images: torch.Tensor, prototypes: torch.Tensor, unseen_mask: torch.Tensor,
            sigma: float | Sequence[float] | torch.Tensor, *, calibration: str = "top2",
            amp: str | bool | None = None, channels_last: bool = False, window: SlidingWindow | None = None,
            excluded: Sequence[int] = (), max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Calibrated nearest-prototype labels of normalised images (see :meth:`Predictor.labels`);
    a thin wrapper kept for the public API."""
    sigma = sigma.tolist() if isinstance(sigma, torch.Tensor) else sigma
    return Predictor(model, prototypes, unseen_mask, sigma, calibration, amp, channels_last, window, excluded,
                     max_elements).labels(images)
