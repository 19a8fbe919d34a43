"""Calibrated nearest-prototype maths (Apollonius calibration): squared distances to prototypes
(also of bilinearly upsampled features, in bands), calibration over the two nearest or all classes."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from utils.schema import CALIBRATIONS


def squared_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances N x K x H x W between pixel features N x C x H x W and prototypes K x C.

    The result is channels-last in memory (class index fastest), so the per-pixel reductions
    over classes (argmin, top-2) read contiguous memory."""
    pixels = features.float().permute(0, 2, 3, 1)                      # N x H x W x C
    prototypes = prototypes.float()
    distances = pixels.pow(2).sum(-1, keepdim=True) - 2 * (pixels @ prototypes.T) + prototypes.pow(2).sum(1)
    return distances.permute(0, 3, 1, 2)


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
        nearest = GroupNearest(distances, unseen_mask)
        pred = torch.stack([nearest.stacked(float(s)) for s in sigmas])
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


class GroupNearest:
    """Each pixel's nearest seen class and nearest unseen class with their squared distances:
    everything calibrated stacking needs, for any number of sigmas (a sweep, the AUSUC grid)."""

    def __init__(self, distances: torch.Tensor, unseen_mask: torch.Tensor):
        unseen = unseen_mask.to(device=distances.device, dtype=torch.bool)[None, :, None, None]
        self.seen_min, self.seen_arg = distances.masked_fill(unseen, float("inf")).min(1)
        self.unseen_min, self.unseen_arg = distances.masked_fill(~unseen, float("inf")).min(1)
        self.first = torch.minimum(self.seen_arg, self.unseen_arg)   # argmin's choice on a tie

    def stacked(self, sigma: float) -> torch.Tensor:
        """``argmin`` over classes of the distances with unseen ones times ``sigma`` (ties to the
        lower class index, as argmin)."""
        scaled = self.unseen_min * sigma
        return torch.where(scaled < self.seen_min, self.unseen_arg,
                           torch.where(scaled > self.seen_min, self.seen_arg, self.first))


def bilinear_taps(out_size: int, in_size: int, device: torch.device | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    bx, u0, u1 = bilinear_taps(size[1], features.shape[-1], features.device)
    ay, v0, v1 = bilinear_taps(size[0], features.shape[-2], features.device)
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


def distance_bands(features: torch.Tensor, prototypes: torch.Tensor, size: tuple[int, int],
                   max_elements: int = 1 << 26) -> Iterator[tuple[slice, torch.Tensor]]:
    """Squared distances of the features upsampled to ``size``, in bands of rows:
    ``(rows, N x K x len(rows) x W)``. One band (exactly :func:`upsampled_squared_distances`)
    unless ``N K H W`` exceeds ``max_elements``; then the K-channel cross term is upsampled one
    band of rows at a time (rows by the bilinear taps, columns by ``F.interpolate``), so a large
    image never holds the full-resolution distance map (equal up to float rounding)."""
    height, width = int(size[0]), int(size[1])
    n, k = features.shape[0], prototypes.shape[0]
    rows_per_band = max(1, max_elements // max(1, n * k * width))
    if rows_per_band >= height:
        yield slice(0, height), upsampled_squared_distances(features, prototypes, (height, width))
        return
    features, prototypes = features.float(), prototypes.float()
    cross = (features.permute(0, 2, 3, 1) @ prototypes.T).permute(0, 3, 1, 2)     # N x K x h x w
    norms = _upsampled_squared_norms(features, (height, width))                   # N x 1 x H x W
    squared = prototypes.pow(2).sum(1)[None, :, None, None]
    i0, w0, w1 = bilinear_taps(height, features.shape[-2], features.device)
    i1 = (i0 + 1).clamp_max(features.shape[-2] - 1)
    for top in range(0, height, rows_per_band):
        rows = slice(top, min(height, top + rows_per_band))
        band = cross[:, :, i0[rows]] * w0[rows, None] + cross[:, :, i1[rows]] * w1[rows, None]
        band = F.interpolate(band, size=(band.shape[2], width), mode="bilinear", align_corners=False)
        yield rows, band.mul_(-2).add_(norms[:, :, rows]).add_(squared)


# Fixed log-spaced grid (1e-3 .. 1e3) so AUSUC is comparable across models and sweeps.
AUSUC_GRID = [10 ** (k / 8) for k in range(-24, 25)]
