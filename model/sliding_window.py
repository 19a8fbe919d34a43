"""Full-resolution inference on large images: sliding-window features and a banded decision.

``sliding_window_features`` runs the visual encoder on overlapping tiles and averages the
stride-4 *features* over the overlaps (every feature cell weighs 1 per tile that covers it),
so the result has the shape the whole image would give. ``full_resolution_labels`` then
takes one calibrated nearest-prototype decision per pixel at full resolution, upsampling
the features bilinearly (``align_corners=False``, as :func:`model.inference.calibrated_nearest_prototype`)
one band of rows at a time, so a large image never holds a full-resolution 256-channel map.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from model.inference import calibrated_nearest_prototype
from utils.amp import autocast_context

def model_features(model: torch.nn.Module, images: torch.Tensor, amp: str | None = None) -> torch.Tensor:
    """The encoder's stride-4 feature map (``model.features``), under autocast when asked; float32."""
    with autocast_context(images.device, amp):
        features = model.features(images)
    return features.float()


def tile_starts(length: int, tile: int, step: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)`` every ``step`` pixels.

    The last tile ends exactly at ``length``; a side not longer than ``tile`` is one span.
    """
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles ``(top, left, tile_height, tile_width)`` covering a ``height x width`` image."""
    step = tile - overlap
    th, tw = min(tile, height), min(tile, width)
    return [(top, left, th, tw) for top in tile_starts(height, tile, step) for left in tile_starts(width, tile, step)]


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def sliding_window_features(model: torch.nn.Module, image: torch.Tensor, tile: int, overlap: int,
                            amp: str | None = None, feature_stride: int = 4, batch_size: int = 1) -> torch.Tensor:
    """Stride-4 features of a large image from overlapping tiles, averaged over the overlaps.

    Args:
        model: has ``features(images) -> N x C x h/feature_stride x w/feature_stride``.
        image: N x 3 x H x W (normalised), H and W multiples of ``feature_stride``.
        tile: tile side in pixels (a multiple of ``feature_stride``; sides shorter than
            ``tile`` are taken whole).
        overlap: pixels shared by neighbouring tiles (a multiple of ``feature_stride``,
            ``0 <= overlap < tile``).
        amp: "bf16"/"fp16" runs the encoder under autocast; features are summed in float32.
        batch_size: tiles per forward pass (all tiles of an image have the same size).

    Returns N x C x H/feature_stride x W/feature_stride float32 features; each cell is the
    mean of the features every covering tile computed for it.
    """
    n, _, height, width = image.shape
    s = feature_stride
    if tile <= 0 or tile % s or overlap % s or not 0 <= overlap < tile:
        raise ValueError(f"sliding window: tile ({tile}) and overlap ({overlap}) must be multiples of {s} "
                         f"with 0 <= overlap < tile")
    if height % s or width % s:
        raise ValueError(f"sliding window: image sides {height}x{width} must be multiples of {s} (pad first)")
    boxes = tile_boxes(height, width, tile, overlap)
    total = count = None
    for group in _batches(boxes, max(1, batch_size)):
        crops = torch.cat([image[:, :, t:t + th, l:l + tw] for t, l, th, tw in group])
        features = model_features(model, crops, amp)
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


def _linear_indices(in_size: int, out_size: int, start: int, stop: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weight of output positions ``start..stop-1`` for a linear resize
    ``in_size -> out_size`` with ``align_corners=False`` (PyTorch's convention)."""
    scale = in_size / out_size
    positions = torch.arange(start, stop, device=device, dtype=torch.float32)
    source = ((positions + 0.5) * scale - 0.5).clamp_min(0)
    low = source.floor().long().clamp_max(in_size - 1)
    high = (low + 1).clamp_max(in_size - 1)
    return low, high, source - low


def resize_rows(x: torch.Tensor, out_height: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start..stop-1`` of ``x`` (N x C x h x w) linearly resized to ``out_height`` rows.

    Computed as one small matrix product with the interpolation weights of the source rows
    involved (much faster on CPU than gathering rows)."""
    low, high, weight = _linear_indices(x.shape[2], out_height, start, stop, x.device)
    first, last = int(low[0]), int(high[-1])
    matrix = x.new_zeros(stop - start, last - first + 1)
    rows = torch.arange(stop - start, device=x.device)
    matrix.index_put_((rows, low - first), 1 - weight, accumulate=True)
    matrix.index_put_((rows, high - first), weight, accumulate=True)
    return torch.einsum("yr,ncrw->ncyw", matrix, x[:, :, first:last + 1])


def full_resolution_labels(features: torch.Tensor, prototypes: torch.Tensor, unseen_mask: torch.Tensor,
                           sigma: float, size: tuple[int, int], crop: tuple[int, int] | None = None,
                           max_pixels: int = 1 << 18, mode: str = "top2") -> torch.Tensor:
    """Calibrated nearest-prototype labels (N x h x w, int64) at full resolution.

    ``features`` (N x C x fh x fw) are bilinearly upsampled to ``size`` (``align_corners=False``)
    and only the top-left ``crop`` (default: all of ``size``) is decided, in bands of about
    ``max_pixels`` pixels; the result equals ``calibrated_nearest_prototype(features, ...,
    size=size)[..., :h, :w]`` up to float rounding. Each band is resized vertically here and
    horizontally by ``F.interpolate`` (whose vertical scale is then 1, an exact identity).
    ``mode`` is the calibration ("top2", official, or "all").
    """
    height, width = size
    out_h, out_w = crop if crop is not None else size
    features = features.float()
    labels = torch.empty(features.shape[0], out_h, out_w, dtype=torch.long, device=features.device)
    rows_per_band = max(1, max_pixels // max(1, width))
    for top in range(0, out_h, rows_per_band):
        bottom = min(out_h, top + rows_per_band)
        band = resize_rows(features, height, top, bottom)
        band = F.interpolate(band, size=(bottom - top, width), mode="bilinear", align_corners=False)
        labels[:, top:bottom] = calibrated_nearest_prototype(band[..., :out_w], prototypes, unseen_mask, sigma,
                                                             mode=mode)
    return labels
