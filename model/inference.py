"""Calibrated nearest-prototype inference (Apollonius calibration)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def squared_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances N x K x H x W between pixel features N x C x H x W and prototypes K x C.

    The result is channels-last in memory (class index fastest), so the per-pixel reductions
    over classes (argmin, top-2) read contiguous memory."""
    pixels = features.float().permute(0, 2, 3, 1)                      # N x H x W x C
    prototypes = prototypes.float()
    distances = pixels.pow(2).sum(-1, keepdim=True) - 2 * (pixels @ prototypes.T) + prototypes.pow(2).sum(1)
    return distances.permute(0, 3, 1, 2)


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
    values, indices = distances.topk(2, dim=1, largest=False)        # N x 2 x H x W, nearest first
    scaled = torch.where(unseen_mask[indices][None], values[None] * sigmas[:, None, None, None, None],
                         values[None])                                  # S x N x 2 x H x W
    # the second class wins only when strictly nearer after calibration (argmin keeps the first)
    pred = torch.where(scaled[:, :, 1] < scaled[:, :, 0], indices[:, 1], indices[:, 0])
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


def _bilinear_taps(out_size: int, in_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """Source index ``i0`` and weights ``w0, w1`` of 1-D bilinear resizing with
    ``align_corners=False`` (as ATen computes them, in float32): ``out[y] = w0 in[i0] + w1 in[i0 + 1]``,
    where ``in[in_size]`` repeats the last element (ATen clamps the second tap there)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.long().clamp_max(in_size - 1)
    w1 = src - i0
    return i0, 1 - w1, w1


def _upsampled_squared_norms(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``||up(features)||^2`` per output pixel, N x 1 x H x W, without the N x C x H x W map.

    Each upsampled pixel is ``sum w_y w_x f[a, b]`` over its 2 x 2 source corners, so its
    squared norm needs only dot products between neighbouring source pixels (5 maps of
    O(C h w) work); the weights are separable, so the width is resolved first (h x W rows)
    and the height last. The last row/column is replicated so the clamped edge taps
    (``i1 == i0``) need no special case."""
    f = F.pad(features, (0, 1, 0, 1), mode="replicate")               # N x C x (h+1) x (w+1)

    def dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(1)

    norm = dots(f, f)                                                   # |f[a,b]|^2
    right = dots(f[..., :-1], f[..., 1:])                               # <f[a,b], f[a,b+1]>
    down = dots(f[:, :, :-1], f[:, :, 1:])                              # <f[a,b], f[a+1,b]>
    diagonals = dots(f[:, :, :-1, :-1], f[:, :, 1:, 1:]) + dots(f[:, :, :-1, 1:], f[:, :, 1:, :-1])
    bx, u0, u1 = _bilinear_taps(size[1], features.shape[-1], features.device)
    ay, v0, v1 = _bilinear_taps(size[0], features.shape[-2], features.device)
    # rows: |x-interpolated row a|^2 (a = 0..h) and <row a, row a+1> (a = 0..h-1), N x . x W
    row_norm = u0 * u0 * norm[..., bx] + u1 * u1 * norm[..., bx + 1] + 2 * u0 * u1 * right[..., bx]
    row_dot = u0 * u0 * down[..., bx] + u1 * u1 * down[..., bx + 1] + u0 * u1 * diagonals[..., bx]
    v0, v1 = v0[:, None], v1[:, None]
    out = v0 * v0 * row_norm[:, ay] + v1 * v1 * row_norm[:, ay + 1] + 2 * v0 * v1 * row_dot[:, ay]
    return out[:, None]


def upsampled_squared_distances(features: torch.Tensor, prototypes: torch.Tensor,
                                size: tuple[int, int] | None) -> torch.Tensor:
    """``squared_distances(upsample_features(features, size), prototypes)`` (N x K x H x W) at a
    fraction of the cost: upsampling is linear, so the cross term ``up(f) . p`` is computed at
    the feature resolution and its K-channel map upsampled; ``||up(f)||^2`` comes from
    :func:`_upsampled_squared_norms`. Equal to the direct computation up to float rounding."""
    features = features.float()
    if size is None or tuple(features.shape[-2:]) == tuple(size):
        return squared_distances(features, prototypes)
    size = (int(size[0]), int(size[1]))
    prototypes = prototypes.float()
    cross = F.interpolate((features.permute(0, 2, 3, 1) @ prototypes.T).permute(0, 3, 1, 2), size=size,
                          mode="bilinear", align_corners=False)        # N x K x H x W, channels-last
    return cross.mul_(-2).add_(_upsampled_squared_norms(features, size)).add_(
        prototypes.pow(2).sum(1)[None, :, None, None])


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
    distances = upsampled_squared_distances(features, prototypes, size)
    return calibrate(distances, unseen_mask, sigma, mode)
