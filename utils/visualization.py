"""Colour palettes and label-map images."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def palette(num_classes: int = 256) -> torch.Tensor:
    """The Pascal VOC colour map (num_classes x 3, uint8); index 255 (ignore) is white."""
    colours = torch.zeros(max(num_classes, 256), 3, dtype=torch.uint8)
    for index in range(colours.shape[0]):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = torch.tensor([r, g, b], dtype=torch.uint8)
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
