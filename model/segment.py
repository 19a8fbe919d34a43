"""From normalised images to per-pixel squared distances to the prototypes (the path under
:class:`model.predictor.Predictor`, which every entry point uses).

Whole-image mode (the default, as the official test): the image goes through the visual encoder
at its own size (any size, no padding), the stride-4 features are upsampled bilinearly to full
resolution and each pixel takes its calibrated nearest prototype. Sliding-window mode (images
whose longer side exceeds ``inference.window.max_size``): the image is padded to a multiple of
4 and encoded in overlapping tiles whose features are averaged over the overlaps; this is an
approximation of the whole-image features (the network sees less context near tile borders).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from model.inference import distance_bands
from utils.amp import autocast_context
from utils.schema import SlidingWindow

FEATURE_STRIDE = 4
MAX_ELEMENTS = 1 << 26   # distance-map elements per band (256 MB in float32)


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


def padded_size(height: int, width: int) -> tuple[int, int]:
    """The image size the sliding window works on: sides rounded up to the feature stride."""
    return height + -height % FEATURE_STRIDE, width + -width % FEATURE_STRIDE


def tile_count(height: int, width: int, window: SlidingWindow | None) -> int:
    """How many tiles an image of this size is encoded in (1: the whole image)."""
    if window is None or not window.applies(height, width):
        return 1
    return len(tile_boxes(*padded_size(height, width), window.tile, window.overlap))


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
        crops = torch.cat([images[:, :, t:t + th, l:l + tw] for t, l, th, tw in group])
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


def pixel_distances(model: torch.nn.Module, images: torch.Tensor, prototypes: torch.Tensor, *,
                    amp: str | bool | None = None, channels_last: bool = False,
                    window: SlidingWindow | None = None, excluded: Sequence[int] = (),
                    max_elements: int = MAX_ELEMENTS) -> Iterator[tuple[slice, torch.Tensor]]:
    """Squared distances of every pixel of ``images`` (N x 3 x H x W, normalised, one size) to
    the ``prototypes`` (K x C), in bands of rows: ``(rows, N x K x len(rows) x W)``.

    ``excluded`` classes get an infinite distance (never predicted: the background when the
    split ignores it). Call under ``torch.inference_mode()``."""
    height, width = images.shape[-2:]
    prototypes = prototypes.float()
    if window is not None and window.applies(height, width):
        pad_h, pad_w = padded_size(height, width)
        padded = F.pad(images, (0, pad_w - width, 0, pad_h - height))  # zeros: the mean colour
        features, size = sliding_window_features(model, padded, window, amp, channels_last), (pad_h, pad_w)
    else:
        features, size = encode(model, images, amp, channels_last), (height, width)
    allowed = None
    if len(excluded):
        allowed = torch.ones(prototypes.shape[0], dtype=torch.bool, device=prototypes.device)
        allowed[list(excluded)] = False
    for rows, distances in distance_bands(features, prototypes, size, max_elements):
        if rows.start >= height:
            break
        rows = slice(rows.start, min(rows.stop, height))
        distances = distances[:, :, :rows.stop - rows.start, :width]
        if allowed is not None:
            distances = distances.masked_fill(~allowed[None, :, None, None], float("inf"))
        yield rows, distances


def same_size_groups(sizes: Sequence[tuple[int, int]]) -> list[tuple[list[int], tuple[int, int]]]:
    """Indices of a padded batch grouped by the images' own sizes (in order of appearance), so
    each image is segmented at its own size whatever else shares its batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault((int(size[0]), int(size[1])), []).append(index)
    return [(indices, size) for size, indices in groups.items()]
