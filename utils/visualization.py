"""Colour palettes and label-map images."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def palette(num_classes: int = 256) -> torch.Tensor:
    """The Pascal VOC colour map (num_classes x 3, uint8); index 255 (ignore) is white."""
    index = torch.arange(max(num_classes, 256)).unsqueeze(1)
    # bit 3k + c of the index is bit 7 - k of channel c (r, g, b)
    colours = sum(((index >> (3 * k + torch.arange(3))) & 1) << (7 - k) for k in range(8)).to(torch.uint8)
    colours[255] = 255
    return colours


_PALETTE = palette()


def colorize(label: torch.Tensor) -> torch.Tensor:
    """H x W class indices -> 3 x H x W uint8 colours."""
    return _PALETTE[label.long().clamp(0, 255).cpu()].permute(2, 0, 1).contiguous()


def mask_image(labels: torch.Tensor) -> Image.Image:
    """A palette-mode PNG image of H x W class indices (< 256) with the VOC colours."""
    mask = Image.fromarray(labels.to(torch.uint8).cpu().numpy(), mode="P")
    mask.putpalette(_PALETTE.flatten().tolist())
    return mask


def save_mask(labels: torch.Tensor, path: str | Path) -> None:
    """Write H x W class indices as a palette PNG (values = class indices)."""
    mask_image(labels).save(path)
