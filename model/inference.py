"""Calibrated nearest-prototype inference (Apollonius calibration)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def squared_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances N x K x H x W between pixel features N x C x H x W and prototypes K x C."""
    features = features.float()
    prototypes = prototypes.float()
    cross = torch.einsum("nchw,kc->nkhw", features, prototypes)
    return (features.pow(2).sum(1, keepdim=True) - 2 * cross
            + prototypes.pow(2).sum(1)[None, :, None, None])


CALIBRATIONS = ("top2", "all")


def calibrate(distances: torch.Tensor, unseen_mask: torch.Tensor, sigma: float | torch.Tensor,
              mode: str = "top2") -> torch.Tensor:
    """Apollonius calibration of squared distances N x K x H x W -> class indices.

    ``mode="top2"`` (official): among each pixel's two nearest classes, unseen classes' squared
    distances are multiplied by ``sigma`` before choosing. ``mode="all"``: calibrated stacking
    over every class (an unseen class ranked third or lower may win too). A float ``sigma``
    gives N x H x W; a 1-D tensor of S values gives S x N x H x W from the same distances.
    """
    if mode not in CALIBRATIONS:
        raise ValueError(f"calibration mode must be one of {CALIBRATIONS}, got {mode!r}")
    unseen_mask = unseen_mask.to(device=distances.device, dtype=torch.bool)
    sigmas = torch.as_tensor(sigma, dtype=distances.dtype, device=distances.device)
    single = sigmas.dim() == 0
    sigmas = sigmas.reshape(-1)
    if mode == "all":
        pred = torch.stack([stacked_nearest(distances, unseen_mask, float(s)) for s in sigmas])
        return pred[0] if single else pred
    if distances.shape[1] < 2:
        pred = distances.argmin(1)
        return pred if single else pred.expand(len(sigmas), *pred.shape).clone()
    values, indices = distances.topk(2, dim=1, largest=False)        # N x 2 x H x W
    is_unseen = unseen_mask[indices]
    scale = torch.where(is_unseen[None], sigmas[:, None, None, None, None], 1.0)  # S x N x 2 x H x W
    choice = (values[None] * scale).argmin(2, keepdim=True)           # S x N x 1 x H x W
    pred = indices[None].expand_as(scale).gather(2, choice)[:, :, 0]
    return pred[0] if single else pred


def stacked_nearest(distances: torch.Tensor, unseen_mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Calibrated stacking over *all* classes (Chao et al., 2016): unseen squared distances times
    ``sigma``, then the nearest class. Its limits are the sweep's ends (sigma -> 0: every pixel
    to an unseen class; sigma -> inf: to a seen class); used for AUSUC."""
    unseen_mask = unseen_mask.to(device=distances.device, dtype=torch.bool)
    scale = torch.where(unseen_mask, sigma, 1.0).to(distances.dtype)
    return (distances * scale[None, :, None, None]).argmin(1)


def restricted_nearest(distances: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Nearest class among ``allowed`` (bool K) only: the ends of a calibration sweep
    (every pixel to a seen class, or every pixel to an unseen class)."""
    allowed = allowed.to(device=distances.device, dtype=torch.bool)
    return distances.masked_fill(~allowed[None, :, None, None], float("inf")).argmin(1)


def upsample_features(features: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Bilinear upsampling (``align_corners=False``, official test) to ``size`` when given."""
    if size is not None and tuple(features.shape[-2:]) != tuple(size):
        return F.interpolate(features.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return features


def calibrated_nearest_prototype(features: torch.Tensor, prototypes: torch.Tensor, unseen_mask: torch.Tensor,
                                 sigma: float | torch.Tensor, size: tuple[int, int] | None = None,
                                 mode: str = "top2") -> torch.Tensor:
    """Class index per pixel by the nearest prototype, with Apollonius calibration.

    Among each pixel's two nearest classes, the *squared* distances of unseen classes are
    multiplied by ``sigma`` before choosing (official). ``features`` (N x C x h x w) are first
    upsampled bilinearly (``align_corners=False``) to ``size`` when given. ``sigma`` may be a
    float (returns N x H x W) or a 1-D tensor of S values (returns S x N x H x W), all from
    one distance computation. ``mode="all"`` calibrates over every class (see :func:`calibrate`).
    """
    distances = squared_distances(upsample_features(features, size), prototypes)
    return calibrate(distances, unseen_mask, sigma, mode)
