"""DeepLabV3+ visual encoder on torchvision's ResNet and ASPP, with the official JoEm names.

Module names follow the official JoEm code (``backbone.*`` torchvision-style ResNet,
``aspp.*`` torchvision ASPP, ``decoder.project / last_conv / pred_conv``), so an official
ResNet-101 checkpoint loads with ``strict=True``. The CPU speed-ups (``model.kernels``) are
applied to a built model by the builder; this module is the plain network.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet
from torchvision.models.segmentation.deeplabv3 import ASPP

from utils.errors import ConfigError

_RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
_MULTI_GRID = (1, 2, 4)   # official multi-grid unit of the last stage: dilations rate * (1, 2, 4)
HEAD_INITS = ("official", "kaiming_fan_in")


def _dilate_stage(stage: nn.Sequential, dilations: Sequence[int]) -> None:
    """Remove the stage's stride and give block ``i`` the 3x3 dilation ``dilations[i]`` (the
    official per-block multi-grid; torchvision's ``replace_stride_with_dilation`` gives every
    block of a stage the same dilation and refuses BasicBlocks)."""
    for index, block in enumerate(stage):
        rate = dilations[min(index, len(dilations) - 1)]
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d):
                conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    conv.dilation, conv.padding = (rate, rate), (rate, rate)


class Backbone(nn.Module):
    """A torchvision ResNet trunk returning (low-level stride-4 feature, high-level feature)."""

    def __init__(self, depth: int = 101, output_stride: int = 16):
        super().__init__()
        if depth not in _RESNETS:
            raise ConfigError(f"model.args.backbone: unsupported ResNet depth {depth}; valid: {sorted(_RESNETS)}")
        if output_stride not in (8, 16):
            raise ConfigError(f"model.args.output_stride: must be 8 or 16, got {output_stride}")
        net = _RESNETS[depth](weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        if output_stride == 16:
            _dilate_stage(self.layer4, [2 * g for g in _MULTI_GRID])
        else:
            _dilate_stage(self.layer3, [2])
            _dilate_stage(self.layer4, [4 * g for g in _MULTI_GRID])
        self.out_channels = 2048 if depth >= 50 else 512
        self.low_level_channels = 256 if depth >= 50 else 64

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return low, self.layer4(self.layer3(self.layer2(low)))


class GlobalAveragePool(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(1)`` averaged into float32 (no float32 copy of the input)."""

    def __init__(self):
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), keepdim=True, dtype=torch.float32)


class ImagePooling(nn.Sequential):
    """The ASPP image-pool branch (torchvision ``ASPPPooling`` layout and names: pool, 1x1 conv,
    BN, ReLU; ``bn=False`` drops the BN), computed in float32 even under autocast.

    Its BatchNorm normalises each channel over only the batch's N pooled values; in bf16,
    nearly equal values round together, the variance collapses towards 0 and the backward is
    scaled by up to 1/sqrt(eps) (observed: a bf16 ResNet-101 run from random weights whose
    gradient norm jumped from 3 to 2e4 at step 17 and went NaN, where float32 kept training).
    The branch is 2048 x 256 multiply-adds per image, so float32 costs nothing measurable."""

    def __init__(self, in_channels: int, out_channels: int, bn: bool = True):
        layers = [GlobalAveragePool(), nn.Conv2d(in_channels, out_channels, 1, bias=False)]
        super().__init__(*layers, *([nn.BatchNorm2d(out_channels)] if bn else []), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            pooled = super().forward(x)
        return F.interpolate(pooled.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)


class Resize(nn.Module):
    """Bilinear resize to ``size`` with ``align_corners=True`` (the decoder's, as official)."""

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class Decoder(nn.Module):
    """DeepLabV3+ decoder: 48-channel low-level projection, two 3x3 blocks, 1x1 classifier."""

    def __init__(self, low_level_channels: int, num_classes: int, aspp_channels: int = 256,
                 feature_dim: int = 256, dropout: bool = True):
        super().__init__()
        p1, p2 = (0.5, 0.1) if dropout else (0.0, 0.0)
        self.project = nn.Sequential(nn.Conv2d(low_level_channels, 48, 1, bias=False),
                                     nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.resize = Resize()
        self.last_conv = nn.Sequential(
            nn.Conv2d(aspp_channels + 48, feature_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(feature_dim), nn.ReLU(inplace=True), nn.Dropout(p1),
            nn.Conv2d(feature_dim, feature_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(feature_dim), nn.ReLU(inplace=True), nn.Dropout(p2))
        self.pred_conv = nn.Conv2d(feature_dim, num_classes, 1)

    def features(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.project(low)
        return self.last_conv(torch.cat([self.resize(high, low.shape[-2:]), low], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ visual encoder: ``forward(images) -> (logits at input size, features at stride 4)``.

    Args:
        num_classes: classes of the 1x1 classifier (seen + unseen; used only by the CE loss).
        backbone: ResNet depth (18, 34, 50 or 101).
        output_stride: 16 (ASPP rates 6/12/18) or 8 (12/24/36).
        freeze_backbone_bn: keep backbone BN layers in eval mode (statistics frozen) in training.
        global_avg_pool_bn: BN in the ASPP image-pool branch (official: true).
        feature_dim: channels of the returned feature map (the joint embedding space).
        freeze_bn: keep *every* BN layer in eval mode (the official DeepLab ``freeze_bn``).
        dropout: the official dropouts (0.5 after ASPP, 0.5 and 0.1 in the decoder); false
            turns them off (deterministic training, e.g. for distributed-equivalence checks).
        head_init: "official" (ASPP: PyTorch's default convolution init; decoder: kaiming-normal
            fan_out for every convolution, the classifier included) or "kaiming_fan_in"
            (kaiming-normal fan_in for every ASPP and decoder convolution, the earlier recipe of
            the from-scratch configs). BN weight 1, bias 0 in both.

    The ImageNet backbone weights are loaded by ``model.builder.load_pretrained_backbone``.
    """

    def __init__(self, num_classes: int, backbone: int = 101, output_stride: int = 16,
                 freeze_backbone_bn: bool = True, global_avg_pool_bn: bool = True, feature_dim: int = 256,
                 freeze_bn: bool = False, dropout: bool = True, head_init: str = "official"):
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ConfigError(f"model.args.head_init: unknown {head_init!r}; valid: {', '.join(HEAD_INITS)}")
        self.freeze_backbone_bn = freeze_backbone_bn
        self.freeze_bn = freeze_bn
        self.backbone = Backbone(backbone, output_stride)
        rates = [6, 12, 18] if output_stride == 16 else [12, 24, 36]
        self.aspp = ASPP(self.backbone.out_channels, rates, out_channels=256)
        self.aspp.convs[4] = ImagePooling(self.backbone.out_channels, 256, bn=global_avg_pool_bn)
        self.aspp.project[3] = nn.Dropout(0.5 if dropout else 0.0)
        self.decoder = Decoder(self.backbone.low_level_channels, num_classes, 256, feature_dim, dropout)
        fan_in = head_init == "kaiming_fan_in"
        for module in (self.aspp, self.decoder) if fan_in else (self.decoder,):
            for m in module.modules():
                if isinstance(m, nn.Conv2d) and fan_in:
                    nn.init.kaiming_normal_(m.weight)
                elif isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Optimizer groups: backbone at ``lr``, ASPP + decoder at ``lr * head_lr_mult``."""
        head = [p for m in (self.aspp, self.decoder) for p in m.parameters() if p.requires_grad]
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr, "name": "backbone"},
                {"params": head, "lr": lr * head_lr_mult, "name": "head"}]

    def train(self, mode: bool = True) -> "DeepLabV3Plus":
        super().train(mode)
        if mode and (self.freeze_backbone_bn or self.freeze_bn):
            for m in (self if self.freeze_bn else self.backbone).modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Only the stride-4 feature map (what inference needs; skips the classifier)."""
        low, high = self.backbone(images)
        return self.decoder.features(self.aspp(high), low)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        logits = self.decoder.pred_conv(features)
        # upsampled in float32 and contiguous memory (the layout of the CE loss's gradient):
        # under bf16 + channels_last the bilinear backward is then several times faster
        logits = F.interpolate(logits.float().contiguous(), size=images.shape[-2:], mode="bilinear",
                               align_corners=True)
        return logits, features
