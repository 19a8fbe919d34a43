"""Joint image/label transforms (torchvision v2): uint8 image 3xHxW and label HxW in, float32
ImageNet-normalised image and int64 label (255 = ignore) out; the one home of the normalisation.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from utils.schema import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomScale(v2.RandomResize):
    """``v2.RandomResize`` (short side uniform in ``[min_size, max_size)``, aspect kept) whose label
    resize is PIL's NEAREST, as the official code: PIL samples at pixel centres, torch's NEAREST
    would move 1-3% of the label pixels by one source pixel at edges."""

    def transform(self, inpt: Any, params: dict) -> Any:
        if not isinstance(inpt, tv_tensors.Mask):
            return super().transform(inpt, params)
        height, width = inpt.shape[-2:]
        short = params["size"][0]
        size = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
        resized = Image.fromarray(inpt.numpy()).resize(size[::-1], Image.NEAREST)
        return tv_tensors.wrap(torch.from_numpy(np.asarray(resized).copy()), like=inpt)


class PadRightBottom(v2.Transform):
    """Pad an image smaller than ``size`` on the right and at the bottom only (image 0, label 255), as
    the official code (``v2.RandomCrop(pad_if_needed)`` pads both sides)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def transform(self, inpt: Any, params: dict) -> Any:
        height, width = inpt.shape[-2:]
        padding = [0, 0, max(0, self.size - width), max(0, self.size - height)]
        if not any(padding):
            return inpt
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(v2.functional.pad, inpt, padding=padding, fill=fill)


def train_transform(base_size: int, crop_size: int, scale_range: Sequence[float], hflip: bool = True) -> v2.Compose:
    """The official training augmentation, in its order: horizontal flip (unless not ``hflip``), random
    scale (short side in ``base_size * scale_range``), padding to ``crop_size``, random crop, normalisation."""
    low, high = (int(base_size * s) for s in scale_range)
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5 if hflip else 0.0),
        RandomScale(low, high + 1, antialias=True),
        PadRightBottom(crop_size),
        v2.RandomCrop(crop_size),
        *val_transform().transforms,
    ])


def val_transform() -> v2.Compose:
    """Full resolution, no resize: only normalisation (as the official test)."""
    return v2.Compose([
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def to_model_input(image: torch.Tensor) -> torch.Tensor:
    """A uint8 3 x H x W image as the model sees it at evaluation: the validation transform itself."""
    return _VAL(tv_tensors.Image(image)).as_subclass(torch.Tensor)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """An ImageNet-normalised 3 x H x W float image back to uint8 (for figures)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def apply(transform: v2.Transform, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``transform`` on a uint8 image (3xHxW) and label (HxW); return plain tensors."""
    image, label = transform(tv_tensors.Image(image), tv_tensors.Mask(label))
    return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)


_VAL = val_transform()
