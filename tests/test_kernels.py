"""The fast paths equal the plain computations: the CPU kernels (tap-by-tap atrous convolution, BN
folding, dropout masks, layout hooks), distances at feature resolution, and the allocator tuning
(speed itself is measured by ``benchmarks/``)."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.inference import calibrate, squared_distances, upsampled_squared_distances
from model.kernels import AtrousConv2d, MaskDropout, apply_kernels, tap_convolution, valid_taps
from model.visual_encoder import DeepLabV3Plus


def _upsampled(features, size):
    """The reference: the library's bilinear upsampling (align_corners=False, official test)."""
    return F.interpolate(features.float(), size=tuple(size), mode="bilinear", align_corners=False)

SHAPES = [(2, 4, 4, 6), (2, 4, 8, 6), (3, 5, 3, 2), (1, 1, 1, 3), (2, 7, 9, 5), (1, 20, 20, 12)]


@pytest.mark.parametrize("n,h,w,d", SHAPES)
def test_tap_convolution_equals_conv2d_values_and_gradients(n, h, w, d):
    torch.manual_seed(0)
    x = torch.randn(n, 6, h, w, dtype=torch.double, requires_grad=True)
    weight = torch.randn(4, 6, 3, 3, dtype=torch.double, requires_grad=True)
    grad = torch.randn(n, 4, h, w, dtype=torch.double)
    expected = F.conv2d(x, weight, padding=d, dilation=d)
    out = tap_convolution(x, weight, d)
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-12)
    ref_grads = torch.autograd.grad((expected * grad).sum(), (x, weight))
    tap_grads = torch.autograd.grad((out * grad).sum(), (x, weight))
    for a, b in zip(ref_grads, tap_grads):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: tap_convolution(a, b, d), (x[:1, :2].detach().requires_grad_(),
                                                                          weight[:2, :2].detach().requires_grad_()))


def test_valid_taps_skip_the_padding():
    assert len(valid_taps(20, 20, 6)) == 9
    assert len(valid_taps(20, 20, 20)) == 1            # every off-centre tap falls in the padding
    centre = valid_taps(4, 30, 6)
    assert len(centre) == 3 and {(ky, kx) for ky, kx, *_ in centre} == {(1, 0), (1, 1), (1, 2)}


def test_atrous_conv_keeps_weights_layout_and_follows_autocast():
    torch.manual_seed(0)
    plain = nn.Conv2d(16, 8, 3, padding=12, dilation=12, bias=False)
    atrous = AtrousConv2d(16, 8, 12)
    assert list(atrous.state_dict()) == ["weight"] and atrous.weight.shape == plain.weight.shape
    atrous.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 20, 20)
    assert atrous.use_taps(x)                          # training in float32: the kernel spans the input
    with torch.no_grad():
        assert not atrous.use_taps(x)                  # float32 inference: oneDNN's kernel is faster
        assert torch.allclose(atrous(x), plain(x), atol=1e-5)
    out = atrous(x)
    assert out.is_contiguous() and torch.allclose(out, plain(x), atol=1e-5)
    cl = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert atrous.use_taps(cl)
        fast, reference = atrous(cl), plain(cl)
    assert fast.dtype == torch.bfloat16 and fast.is_contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), plain.weight.double(), padding=12, dilation=12)
    scale = exact.abs().max()
    # bf16 rounding of inputs and per-tap products: the same order of error as oneDNN's bf16 kernel
    assert (fast.double() - exact).abs().max() / scale < 3 * max((reference.double() - exact).abs().max() / scale, 4e-3)
    fast.float().sum().backward()
    assert atrous.weight.grad.dtype == torch.float32 and atrous.weight.grad.shape == (8, 16, 3, 3)


def test_aspp_uses_atrous_convs_with_the_official_rates():
    model = apply_kernels(DeepLabV3Plus(5, backbone=18), ["taps"])
    convs = [branch[0] for branch in model.aspp.convs[1:4]]
    assert all(isinstance(c, AtrousConv2d) for c in convs)
    assert [c.dilation[0] for c in convs] == [6, 12, 18] and [c.padding[0] for c in convs] == [6, 12, 18]


SIZES = [((94, 125), (375, 500)), ((7, 9), (20, 28)), ((10, 10), (7, 13)), ((1, 5), (4, 9)), ((6, 6), (6, 6))]


@pytest.mark.parametrize("low,size", SIZES)
def test_upsampled_distances_equal_distances_of_upsampled_features(low, size):
    torch.manual_seed(0)
    features = torch.randn(2, 32, *low)
    prototypes = torch.randn(7, 32)
    reference = squared_distances(_upsampled(features, size), prototypes)
    fast = upsampled_squared_distances(features.contiguous(memory_format=torch.channels_last).bfloat16(),
                                       prototypes, size)
    plain = upsampled_squared_distances(features, prototypes, size)
    assert plain.shape == reference.shape == (2, 7, *size)
    assert torch.allclose(plain, reference, rtol=1e-5, atol=1e-4 * reference.abs().max().item())
    assert torch.equal(plain.argmin(1), reference.argmin(1))
    assert fast.dtype == torch.float32 and torch.allclose(fast, squared_distances(_upsampled(
        features.bfloat16().float(), size), prototypes), rtol=1e-4, atol=1e-3)
    # channels-last distances: per-pixel reductions over classes read contiguous memory
    assert plain.is_contiguous(memory_format=torch.channels_last)


def test_top2_calibration_keeps_the_nearest_class_on_ties():
    distances = torch.tensor([1.0, 2.0, 2.0, 5.0]).view(1, 4, 1, 1)
    unseen = torch.tensor([False, True, False, False])
    assert calibrate(distances, unseen, 0.5).item() == 0     # 2 * 0.5 == 1: tie, nearest kept
    assert calibrate(distances, unseen, 0.49).item() == 1
    assert calibrate(distances, unseen, torch.tensor([0.5, 0.49, 1.0])).view(-1).tolist() == [0, 1, 0]


def test_allocator_tuning_is_idempotent_and_can_be_turned_off():
    from utils.malloc import retain_freed_memory
    first = retain_freed_memory()
    assert isinstance(first, bool) and retain_freed_memory() == first
    code = "from utils.malloc import retain_freed_memory; print(retain_freed_memory())"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JOEM_MALLOC_TUNING": "0"},
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert off.stdout.strip() == "False"


def test_image_pool_branch_runs_in_float32_and_gradients_stay_channels_last():
    torch.manual_seed(0)
    model = apply_kernels(DeepLabV3Plus(5, backbone=18)).to(memory_format=torch.channels_last).train()
    seen = {}
    model.aspp.convs[4][2].register_forward_hook(lambda m, args, out: seen.update(bn_input=args[0].dtype))

    def capture(module, args):
        view = args[0].view_as(args[0])
        view.register_hook(lambda g: seen.update(aspp_input_grad=g))
        return (view,)
    model.aspp.register_forward_pre_hook(capture)
    images = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, features = model(images)
    assert seen["bn_input"] == torch.float32 and features.dtype == torch.bfloat16
    assert logits.dtype == torch.float32 and logits.shape == (2, 5, 64, 64)
    (logits.mean() + features.float().pow(2).mean()).backward()
    grad = seen["aspp_input_grad"]
    assert grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()


def _torchvision_backbone(backbone, x):
    """The backbone as torchvision's modules compute it (BN as its own step)."""
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    low = backbone.layer1(x)
    return low, backbone.layer4(backbone.layer3(backbone.layer2(low)))


@pytest.mark.parametrize("depth", [18, 50])
def test_backbone_with_folded_bn_and_sparse_taps_equals_torchvision_modules(depth):
    """Inference folds every BN into its conv, and the dilated convs of the last stage at 4 x 4
    use the taps inside the image: the values equal torchvision's module-by-module computation;
    in training (BN as its own step) the gradients do too."""
    torch.manual_seed(0)
    model = apply_kernels(DeepLabV3Plus(10, backbone=depth, freeze_backbone_bn=True), ["taps", "bn_fold"])
    dilated = [m for m in model.backbone.layer4.modules() if isinstance(m, AtrousConv2d)]
    assert dilated and all(m.sparse_only for m in dilated)
    assert set(model.state_dict()) == set(DeepLabV3Plus(10, backbone=depth).state_dict())
    for bn in model.backbone.modules():
        if isinstance(bn, nn.BatchNorm2d):   # non-trivial statistics, so folding matters
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
    x = torch.randn(2, 3, 64, 64)
    assert any(m.use_taps(torch.zeros(1, 1, 4, 4)) for m in dilated)
    model.eval()
    with torch.no_grad():
        folded, reference = model.backbone(x), _torchvision_backbone(model.backbone, x)
    for a, b in zip(folded, reference):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    model.train()
    low, high = model.backbone(x)
    ref_low, ref_high = _torchvision_backbone(model.backbone, x)
    params = [model.backbone.conv1.weight, model.backbone.bn1.weight, dilated[-1].weight]
    grads = torch.autograd.grad(high.square().mean() + low.mean(), params)
    ref_grads = torch.autograd.grad(ref_high.square().mean() + ref_low.mean(), params)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-3, atol=1e-4 * float(r.abs().max()))


def test_dropout_masks_do_not_depend_on_memory_format_or_dtype():
    dropout = MaskDropout(0.5).train()
    x = torch.randn(2, 8, 5, 5)
    torch.manual_seed(0)
    plain = dropout(x)
    torch.manual_seed(0)
    fast = dropout(x.contiguous(memory_format=torch.channels_last).bfloat16())
    assert torch.equal(plain != 0, fast != 0)
    assert torch.allclose(plain, fast.float(), atol=0.05)
    assert torch.equal(dropout.eval()(x), x)
    model = apply_kernels(DeepLabV3Plus(5, backbone=18, dropout=False))
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert sum(isinstance(m, MaskDropout) for m in model.modules()) == 3


@pytest.mark.parametrize("depth", [18, 50])
def test_all_kernels_off_gives_the_same_numbers_within_fp32_rounding(depth):
    """The plain network and the one with every kernel give the same features and logits in
    inference and the same gradients in training (dropout off: its masks are drawn differently;
    BN statistics frozen: batch statistics of a 2-image batch amplify rounding), channels_last
    inputs as the shipped configs run."""
    torch.manual_seed(0)
    plain = DeepLabV3Plus(6, backbone=depth, dropout=False, freeze_bn=True).to(memory_format=torch.channels_last)
    fast = copy.deepcopy(plain)
    apply_kernels(fast)
    assert set(plain.state_dict()) == set(fast.state_dict())
    for bn in plain.backbone.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for a, b in zip(plain.eval()(x), fast.eval()(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    grads = []
    for model in (plain.train(), fast.train()):
        logits, features = model(x)
        (logits.square().mean() + features.mean()).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-10)
