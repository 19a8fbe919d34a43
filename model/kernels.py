"""CPU kernels: faster ways to compute the plain network of ``model.visual_encoder``, applied to a
built model by :func:`apply_kernels` (one call, in ``model.builder.build_encoders``) and switched
by ``trainer.cpu_kernels``. Each equals the plain computation up to float rounding
(tests/test_kernels.py); its measured gain per CPU class is in docs/benchmarks.md.

* ``taps``: the ASPP's atrous convolutions, and the backbone's dilated 3x3 convolutions where the
  kernel spans the input, computed tap by tap, without the taps that fall in the zero padding.
  oneDNN multiplies the padding (its bf16 kernels run these convolutions at a third of the rate
  of an undilated one) and has no fast weight-gradient kernel for a dilation this large relative
  to the input. Each of the 9 taps is a 1x1 convolution (a matrix product over channels) of the
  input rows/columns that land inside the image, added into the output rows/columns it reaches,
  in forward and backward. The taps are summed in float32; each tap's product is rounded to the
  compute dtype first (in bf16 the error is about 1.3x that of oneDNN's single rounding).
* ``bn_fold``: in inference (BN in eval mode, no gradient) each backbone BN, a per-channel affine
  map, is folded into its convolution's weight and bias: one convolution, no pass over the
  activations. Training keeps the two steps.
* ``dropout``: dropout masks from 16-bit draws in logical (NCHW) order: 3x faster than ``rand``,
  and the same masks whatever the memory format or dtype (fp32 and bf16 + channels_last runs
  from one seed see the same masks). The keep probability is a multiple of 2^-16.
* ``layout``: the image-pool input and the decoder's upsampled ASPP output hand on dense
  channels_last gradients (the pooling backward and the concatenation's channel slices return
  contiguous or strided ones, and the trunk's backward then mixes layouts).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet

from utils.schema import CPU_KERNELS

Tap = tuple[int, int, slice, slice, slice, slice]  # ky, kx, output rows, output cols, input rows, input cols


def _span(size: int, offset: int) -> tuple[slice, slice] | None:
    """(output, input) index ranges where ``input = output + offset`` stays inside ``size``."""
    if abs(offset) >= size:
        return None
    return slice(max(0, -offset), size - max(0, offset)), slice(max(0, offset), size + min(0, offset))


def valid_taps(height: int, width: int, dilation: int) -> list[Tap]:
    """The taps of a 3x3 convolution (padding = dilation) that touch the image, centre first."""
    taps = []
    for ky, kx in [(1, 1)] + [(y, x) for y in range(3) for x in range(3) if (y, x) != (1, 1)]:
        rows, cols = _span(height, (ky - 1) * dilation), _span(width, (kx - 1) * dilation)
        if rows is not None and cols is not None:
            taps.append((ky, kx, rows[0], cols[0], rows[1], cols[1]))
    return taps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """N x H x W x D -> (N H W) x D (a copy only when ``t`` is a strided window)."""
    return t.reshape(-1, t.shape[-1])


def _product(t: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``t @ matrix`` for an N x H x W x D window ``t``, as one 2-D matrix product (a batched
    product over a strided window can be 50x slower on CPU)."""
    return (_rows(t) @ matrix).view(*t.shape[:-1], matrix.shape[-1])


def _linear(t: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``t @ matrix.T`` like :func:`_product`, without copying the transposed ``matrix``."""
    return F.linear(_rows(t), matrix).view(*t.shape[:-1], matrix.shape[0])


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _TapConvolution(torch.autograd.Function):
    """3x3 convolution with padding = dilation, tap by tap, computed in ``dtype``: ``x``
    N x C x H x W (cast to ``dtype``) and ``weight`` O x C x 3 x 3 (any float dtype; its
    gradient comes back in that dtype). Returns N x O x H x W in channels_last memory."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dilation: int, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        _, _, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1)                                   # N x H x W x C
        kernel = weight.permute(2, 3, 0, 1).to(dtype, memory_format=torch.contiguous_format)  # 3 x 3 x O x C
        taps = valid_taps(h, w, dilation)
        out = _linear(pixels, kernel[1, 1]).to(_accumulation_dtype(dtype))  # the centre tap covers all
        for ky, kx, oy, ox, iy, ix in taps[1:]:
            out[:, oy, ox] += _linear(pixels[:, iy, ix], kernel[ky, kx])
        ctx.save_for_backward(x, kernel)
        ctx.dilation, ctx.weight_dtype = dilation, weight.dtype
        return out.to(dtype).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, kernel = ctx.saved_tensors
        _, _, h, w = x.shape
        taps = valid_taps(h, w, ctx.dilation)
        grad = grad.to(x.dtype).permute(0, 2, 3, 1)                      # N x H x W x O
        pixels = x.permute(0, 2, 3, 1)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            acc = _product(grad, kernel[1, 1]).to(_accumulation_dtype(x.dtype))  # N x H x W x C
            for ky, kx, oy, ox, iy, ix in taps[1:]:
                acc[:, iy, ix] += _product(grad[:, oy, ox], kernel[ky, kx])
            grad_x = acc.to(x.dtype).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(*kernel.shape[2:], 3, 3, dtype=ctx.weight_dtype, device=x.device)
            for ky, kx, oy, ox, iy, ix in taps:
                grad_w[:, :, ky, kx] = _rows(grad[:, oy, ox]).T @ _rows(pixels[:, iy, ix])
        return grad_x, grad_w, None, None


class AtrousConv2d(nn.Conv2d):
    """``nn.Conv2d(in, out, 3, padding=d, dilation=d, bias=False)`` (same ``weight``, so
    checkpoints are unchanged) whose forward computes only the taps inside the image where
    that is faster (:meth:`use_taps`), and is the plain convolution elsewhere.

    Follows autocast like ``nn.Conv2d`` (input and weight in the autocast dtype). The output is
    channels_last in memory when the input is (contiguous inputs get a contiguous output)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int, sparse_only: bool = False):
        super().__init__(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.sparse_only = sparse_only

    def use_taps(self, x: torch.Tensor) -> bool:
        """Where the tap-by-tap form was measured faster (oneDNN, CPU; docs/benchmarks.md). ASPP
        (``sparse_only`` false; AVX-512 BF16/AMX): always in reduced precision (autocast or a
        bf16/fp16 input); in float32 only for training when the dilated kernel spans the input
        (``2 d >= min(H, W)``: the GEMM weight-gradient path). Backbone convs (``sparse_only``;
        AVX2 fp32 and AVX-512 BF16): only where the kernel spans a channels_last input, in any
        precision (the demo's ResNet-18 at 4 x 4: training step 1.3x faster; ResNet-101's 20 x 20
        stage: slower, so not there). Not on other devices (cuDNN has not been measured)."""
        if x.device.type != "cpu":
            return False
        spans = 2 * self.dilation[0] >= min(x.shape[-2:])
        if self.sparse_only:   # measured with channels_last inputs only (the shipped layout)
            return spans and x.is_contiguous(memory_format=torch.channels_last)
        if torch.is_autocast_enabled("cpu") or x.dtype in (torch.bfloat16, torch.float16):
            return True
        return torch.is_grad_enabled() and spans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x, self.weight)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This convolution with ``weight`` in place of ``self.weight`` (e.g. with a BN folded in)."""
        if not self.use_taps(x):
            return self._conv_forward(x, weight, None)
        return tap_convolution(x, weight, self.dilation[0])

    @classmethod
    def like(cls, conv: nn.Conv2d, sparse_only: bool) -> "AtrousConv2d":
        """The same convolution (sharing ``conv.weight``); its own init draws nothing from the seed's stream."""
        with torch.random.fork_rng(devices=[]):
            atrous = cls(conv.in_channels, conv.out_channels, conv.dilation[0], sparse_only)
        atrous.weight = conv.weight
        return atrous


def tap_convolution(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=dilation, dilation=dilation)`` (3x3, no bias) tap by tap,
    in the autocast dtype when autocast is on (like ``F.conv2d``), else in ``x``'s dtype; the
    output keeps the input's memory format."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    out = _TapConvolution.apply(x, weight, dilation, dtype)
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def _conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``, as one convolution with the BN folded in when the BN is in eval mode and no
    gradient is recorded."""
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


def _folded_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``BasicBlock`` / ``Bottleneck`` forward with every conv + BN through :func:`_conv_bn`."""
    out = F.relu(_conv_bn(x, block.conv1, block.bn1), inplace=True)   # in place, as torchvision's blocks
    if isinstance(block, resnet.Bottleneck):
        out = F.relu(_conv_bn(out, block.conv2, block.bn2), inplace=True)
        out = _conv_bn(out, block.conv3, block.bn3)
    else:
        out = _conv_bn(out, block.conv2, block.bn2)
    out += x if block.downsample is None else _conv_bn(x, block.downsample[0], block.downsample[1])
    return F.relu(out, inplace=True)


def _folded_backbone(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = backbone.maxpool(F.relu(_conv_bn(x, backbone.conv1, backbone.bn1), inplace=True))
    low = backbone.layer1(x)
    return low, backbone.layer4(backbone.layer3(backbone.layer2(low)))


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is drawn in logical (NCHW) order from 16 random bits per element
    (four per 64-bit draw of the generator), whatever the memory format or dtype."""

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
    """Identity whose backward hands on a dense channels_last gradient when ``x`` is channels_last."""
    if x.requires_grad and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        x = x.view_as(x)
        x.register_hook(_dense_channels_last)
    return x


def apply_kernels(model: nn.Module, kernels: Sequence[str] = CPU_KERNELS) -> nn.Module:
    """Apply the named kernels (``trainer.cpu_kernels``) to a ``DeepLabV3Plus``, in place: weights
    and state_dict names unchanged."""
    if "taps" in kernels:
        for branch in model.aspp.convs[1:4]:
            branch[0] = AtrousConv2d.like(branch[0], sparse_only=False)
        for block in model.backbone.layer4:
            for name, conv in list(block.named_children()):
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.dilation[0] > 1:
                    setattr(block, name, AtrousConv2d.like(conv, sparse_only=True))
    if "bn_fold" in kernels:
        backbone = model.backbone
        backbone.forward = partial(_folded_backbone, backbone)
        for stage in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
            for block in stage:
                block.forward = partial(_folded_block, block)
    if "dropout" in kernels:
        for parent in model.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Dropout:
                    setattr(parent, name, MaskDropout(child.p).train(child.training))
    if "layout" in kernels:
        model.aspp.convs[4].register_forward_pre_hook(lambda module, args: (channels_last_gradient(args[0]),))
        model.decoder.resize.register_forward_hook(lambda module, args, out: channels_last_gradient(out))
    return model
