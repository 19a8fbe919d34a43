"""Colour palettes and image helpers for label maps."""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised 3 x H x W float -> uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
