"""DeepLabV3+ visual encoder on torchvision's ResNet and ASPP, with the official JoEm names.

Module names follow the official JoEm code (``backbone.*`` torchvision-style ResNet,
``aspp.*`` torchvision ASPP, ``decoder.project / last_conv / pred_conv``), so an official
ResNet-101 checkpoint loads with ``strict=True``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet
from torchvision.models.segmentation.deeplabv3 import ASPP

from model.atrous import AtrousConv2d
from utils.util import ConfigError

_RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
# Official multi-grid unit of the last stage: dilations rate * (1, 2, 4).
_MULTI_GRID = (1, 2, 4)
logger = logging.getLogger(__name__)


def _dilate_stage(stage: nn.Sequential, dilations: Sequence[int]) -> None:
    """Remove the stage's stride and give block ``i`` the 3x3 dilation ``dilations[i]``.

    torchvision's ``replace_stride_with_dilation`` gives the first block of a stage the
    previous dilation and every later block the same one, and refuses BasicBlocks; the
    official code uses per-block (multi-grid) dilations, so the convs are patched here.
    """
    for index, block in enumerate(stage):
        rate = dilations[min(index, len(dilations) - 1)]
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.stride != (1, 1):
                conv.stride = (1, 1)
        for name, conv in list(block.named_children()):
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                # the same weight as an AtrousConv2d (state_dict unchanged): at these feature sizes
                # most of a dilated kernel lies in the zero padding (model/atrous.py)
                with torch.random.fork_rng(devices=[]):   # its discarded init draws nothing from the seed's stream
                    atrous = AtrousConv2d(conv.in_channels, conv.out_channels, rate, sparse_only=True)
                atrous.weight = conv.weight
                setattr(block, name, atrous)


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
        x = self.maxpool(F.relu(conv_bn(x, self.conv1, self.bn1), inplace=True))
        low = _stage(self.layer1, x)
        return low, _stage(self.layer4, _stage(self.layer3, _stage(self.layer2, low)))


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``; in inference (BN in eval mode, no gradient) the BN, a per-channel affine
    map, is folded into the convolution's weight and bias: one convolution, no pass over the
    activations (a ResNet-101 evaluation at 500x375 on an AVX2 CPU: 0.97 -> 0.89 s). Training
    keeps the two steps: with frozen statistics the folding needs the weights scaled and their
    gradients unscaled every step, which cost what it saved (measured, docs/benchmarks.md).
    Equal to the unfolded computation up to float rounding (tests/test_performance_paths.py)."""
    if bn.training or torch.is_grad_enabled():
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    if isinstance(conv, AtrousConv2d):
        out = conv.convolve(x, weight)
        return out + bias.to(out.dtype).reshape(1, -1, 1, 1)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``BasicBlock`` / ``Bottleneck`` forward with every conv + BN through :func:`conv_bn`."""
    out = F.relu(conv_bn(x, block.conv1, block.bn1), inplace=True)   # in place, as torchvision's blocks
    if isinstance(block, resnet.Bottleneck):
        out = F.relu(conv_bn(out, block.conv2, block.bn2), inplace=True)
        out = conv_bn(out, block.conv3, block.bn3)
    else:
        out = conv_bn(out, block.conv2, block.bn2)
    out += x if block.downsample is None else conv_bn(x, block.downsample[0], block.downsample[1])
    return F.relu(out, inplace=True)


def _stage(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for block in stage:
        x = _block(block, x)
    return x


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask does not depend on the memory format or dtype: the mask is
    drawn in logical (NCHW) order, so channels_last / bf16 training sees the same masks as
    contiguous fp32 from the same seed (``F.dropout`` draws them in memory order).

    Each element gets 16 random bits (four per 64-bit draw of the CPU generator, about 3x
    faster than ``rand``, and 8x faster than ``bernoulli_``); the keep probability is therefore
    a multiple of 2^-16 (0.9 becomes 0.899994; 0.5 is exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        count = x.numel()
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=x.device)
        uniform16 = bits.view(torch.int16)[:count].view(x.shape)           # uniform on [-2^15, 2^15)
        keep = uniform16 < round((1 - self.p) * 2 ** 16) - 2 ** 15
        return x * (keep.to(x.dtype) * (1.0 / (1 - self.p)))


def _dense_channels_last(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


def channels_last_gradient(x: torch.Tensor) -> torch.Tensor:
    """Identity whose backward hands on a dense channels_last gradient when ``x`` is channels_last.

    Some backward ops return contiguous or non-dense gradients for channels_last tensors (the
    pooling backward; the channel slices of a concatenation's gradient); the trunk's backward
    then mixes memory formats, and every elementwise op on the way is several times slower
    (about 5% of a bf16 + channels_last ResNet-101 step on CPU)."""
    if x.requires_grad and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        x = x.view_as(x)
        x.register_hook(_dense_channels_last)
    return x


class _GlobalAveragePool(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(1)`` of the ASPP image-pool branch, averaged into float32, with a
    channels_last input gradient."""

    def __init__(self):
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last_gradient(x).mean(dim=(-2, -1), keepdim=True, dtype=torch.float32)


class ImagePooling(nn.Sequential):
    """The ASPP image-pool branch (torchvision ``ASPPPooling`` layout and names: pool, 1x1 conv,
    BN, ReLU; ``bn=False`` drops the BN), computed in float32 even under autocast.

    Its BatchNorm normalises each channel over only the batch's N pooled values; in bf16,
    nearly equal values round together, the variance collapses towards 0 and the backward is
    scaled by up to 1/sqrt(eps) (observed: a bf16 ResNet-101 run from random weights whose
    gradient norm jumped from 3 to 2e4 at step 17 and went NaN, where float32 kept training).
    The branch is 2048 x 256 multiply-adds per image, so float32 costs nothing measurable."""

    def __init__(self, in_channels: int, out_channels: int, bn: bool = True):
        layers = [_GlobalAveragePool(), nn.Conv2d(in_channels, out_channels, 1, bias=False)]
        super().__init__(*layers, *([nn.BatchNorm2d(out_channels)] if bn else []), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            pooled = super().forward(x)
        return F.interpolate(pooled.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)


class Decoder(nn.Module):
    """DeepLabV3+ decoder: 48-channel low-level projection, two 3x3 blocks, 1x1 classifier."""

    def __init__(self, low_level_channels: int, num_classes: int, aspp_channels: int = 256,
                 feature_dim: int = 256, dropout: bool = True):
        super().__init__()
        p1, p2 = (0.5, 0.1) if dropout else (0.0, 0.0)
        self.project = nn.Sequential(nn.Conv2d(low_level_channels, 48, 1, bias=False),
                                     nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.last_conv = nn.Sequential(
            nn.Conv2d(aspp_channels + 48, feature_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(feature_dim), nn.ReLU(inplace=True), Dropout(p1),
            nn.Conv2d(feature_dim, feature_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(feature_dim), nn.ReLU(inplace=True), Dropout(p2))
        self.pred_conv = nn.Conv2d(feature_dim, num_classes, 1)

    def features(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.project(low)
        high = channels_last_gradient(F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True))
        return self.last_conv(torch.cat([high, low], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ visual encoder: ``forward(images) -> (logits at input size, features at stride 4)``.

    Args:
        num_classes: classes of the 1x1 classifier (seen + unseen; used only by the CE loss).
        backbone: ResNet depth (18, 34, 50 or 101).
        output_stride: 16 (ASPP rates 6/12/18) or 8 (12/24/36).
        freeze_backbone_bn: keep backbone BN layers in eval mode (statistics frozen) in training.
        global_avg_pool_bn: BN in the ASPP image-pool branch (official: true).
        pretrained_backbone: path to a torchvision-named ImageNet ResNet state_dict, or None.
        feature_dim: channels of the returned feature map (the joint embedding space).
        freeze_bn: keep *every* BN layer in eval mode (the official DeepLab ``freeze_bn``).
        dropout: the official dropouts (0.5 after ASPP, 0.5 and 0.1 in the decoder); false
            turns them off (deterministic training, e.g. for distributed-equivalence checks).
    """

    def __init__(self, num_classes: int, backbone: int = 101, output_stride: int = 16,
                 freeze_backbone_bn: bool = True, global_avg_pool_bn: bool = True,
                 pretrained_backbone: str | None = None, feature_dim: int = 256, freeze_bn: bool = False,
                 dropout: bool = True):
        super().__init__()
        self.freeze_backbone_bn = freeze_backbone_bn
        self.freeze_bn = freeze_bn
        self.backbone = Backbone(backbone, output_stride)
        rates = [6, 12, 18] if output_stride == 16 else [12, 24, 36]
        self.aspp = ASPP(self.backbone.out_channels, rates, out_channels=256)
        for branch, rate in zip(self.aspp.convs[1:4], rates):      # same weights, faster on CPU
            branch[0] = AtrousConv2d(self.backbone.out_channels, 256, rate)
        self.aspp.convs[4] = ImagePooling(self.backbone.out_channels, 256, bn=global_avg_pool_bn)
        self.aspp.project[3] = Dropout(0.5 if dropout else 0.0)
        self.decoder = Decoder(self.backbone.low_level_channels, num_classes, 256, feature_dim, dropout)
        self._init_head()
        if pretrained_backbone:
            self.load_pretrained_backbone(pretrained_backbone)

    def _init_head(self) -> None:
        """Official initialisation of the new layers: Kaiming-normal convs, BN weight 1 / bias 0."""
        for module in self.head_modules():
            for m in module.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def load_pretrained_backbone(self, path: str | Path) -> None:
        """Load a torchvision-named ImageNet ResNet state_dict into the backbone (fc.* ignored)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model.args.pretrained_backbone: file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"model.args.pretrained_backbone: cannot read {path} ({type(err).__name__}: {err})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ConfigError(f"model.args.pretrained_backbone: {path} does not hold a state_dict")
        state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            result = self.backbone.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise ConfigError(f"model.args.pretrained_backbone: {path} does not match the backbone: "
                              f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
        logger.info("pretrained backbone %s: %d tensors loaded; missing keys: %s; unexpected keys: %s",
                    path, len(state) - len(result.unexpected_keys), result.missing_keys or "none",
                    result.unexpected_keys or "none")

    def head_modules(self) -> list[nn.Module]:
        """ASPP and decoder: the modules trained at the 10x learning rate."""
        return [self.aspp, self.decoder]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return (p for m in self.head_modules() for p in m.parameters() if p.requires_grad)

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Optimizer groups: backbone at ``lr``, ASPP + decoder at ``lr * head_lr_mult``."""
        return [{"params": list(self.backbone_parameters()), "lr": lr, "name": "backbone"},
                {"params": list(self.head_parameters()), "lr": lr * head_lr_mult, "name": "head"}]

    def train(self, mode: bool = True) -> "DeepLabV3Plus":
        super().train(mode)
        if mode and (self.freeze_backbone_bn or self.freeze_bn):
            for m in (self if self.freeze_bn else self.backbone).modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Only the 256-d stride-4 feature map (what inference needs; skips the classifier)."""
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
