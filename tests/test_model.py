"""Visual and semantic encoders: shapes, official key names, checkpoint loading, frozen BN."""
import io

import pytest
import torch

from model import DeepLabV3Plus, SemanticEncoder
from model.builder import load_pretrained_backbone
from utils.errors import ConfigError


def _official_keys(path):
    visual, semantic, current = {}, {}, None
    for line in path.read_text().splitlines():
        if line.startswith("# visual"):
            current = visual
        elif line.startswith("# semantic"):
            current = semantic
        elif line.strip() and not line.startswith("#"):
            key, rest = line.split(" ", 1)
            shape = rest.rsplit(" ", 1)[0]
            current[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return visual, semantic


@pytest.fixture(scope="module")
def resnet101():
    torch.manual_seed(0)
    return DeepLabV3Plus(21, backbone=101, output_stride=16)


def test_state_dict_keys_and_shapes_equal_official(resnet101, shared_dir):
    visual, semantic = _official_keys(shared_dir / "reference" / "official_checkpoint_keys.txt")
    mine = {k: tuple(v.shape) for k, v in resnet101.state_dict().items()}
    assert mine == visual
    assert {k: tuple(v.shape) for k, v in SemanticEncoder(300, 256, 0).state_dict().items()} == semantic


def test_official_format_checkpoint_loads_strict(resnet101):
    buffer = io.BytesIO()
    torch.save({"arch": "DeepLab", "epoch": 3, "state_dict": resnet101.state_dict(), "monitor_best": 0.1}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    other = DeepLabV3Plus(21, backbone=101, output_stride=16)
    other.load_state_dict(checkpoint["state_dict"], strict=True)
    key = "decoder.pred_conv.weight"
    assert torch.equal(other.state_dict()[key], resnet101.state_dict()[key])


@pytest.mark.parametrize("depth,stride", [(18, 16), (18, 8), (101, 16), (101, 8)])
def test_forward_shapes(depth, stride):
    torch.manual_seed(0)
    model = DeepLabV3Plus(7, backbone=depth, output_stride=stride).eval()
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 7, 64, 96)
    assert features.shape == (2, 256, 16, 24)
    with torch.no_grad():
        _, high = model.backbone(torch.randn(1, 3, 64, 64))
    assert high.shape[-1] == 64 // stride
    assert high.shape[1] == (2048 if depth == 101 else 512)


def test_multigrid_dilations():
    model = DeepLabV3Plus(5, backbone=101, output_stride=16)
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [2, 4, 8]
    assert [b.conv2.dilation[0] for b in model.backbone.layer3] == [1] * 23
    model8 = DeepLabV3Plus(5, backbone=101, output_stride=8)
    assert [b.conv2.dilation[0] for b in model8.backbone.layer3] == [2] * 23
    assert [b.conv2.dilation[0] for b in model8.backbone.layer4] == [4, 8, 16]
    model18 = DeepLabV3Plus(5, backbone=18, output_stride=16)
    assert [b.conv2.dilation[0] for b in model18.backbone.layer4] == [2, 4]
    assert model18.aspp.convs[0][0].in_channels == 512
    assert model18.decoder.project[0].in_channels == 64


def test_frozen_backbone_bn_keeps_statistics():
    torch.manual_seed(0)
    model = DeepLabV3Plus(5, backbone=18, freeze_backbone_bn=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits, features = model(torch.randn(2, 3, 64, 64))
    (logits.mean() + features.mean()).backward()
    optimizer.step()
    after = model.state_dict()
    backbone_keys = [k for k in before if k.startswith("backbone.")]
    head_keys = [k for k in before if not k.startswith("backbone.")]
    assert backbone_keys and head_keys
    assert all(torch.equal(before[k], after[k]) for k in backbone_keys)
    assert any(not torch.equal(before[k], after[k]) for k in head_keys)
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    unfrozen = DeepLabV3Plus(5, backbone=18, freeze_backbone_bn=False).train()
    assert unfrozen.backbone.bn1.training


def test_param_groups_cover_all_parameters_once():
    model = DeepLabV3Plus(5, backbone=18)
    groups = model.param_groups(lr=0.01, head_lr_mult=10)
    assert [g["lr"] for g in groups] == [0.01, 0.1]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_global_avg_pool_without_bn():
    model = DeepLabV3Plus(5, backbone=18, global_avg_pool_bn=False).eval()
    assert not any(k.startswith("aspp.convs.4.2") for k in model.state_dict())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))[0].shape == (1, 5, 64, 64)


def test_pretrained_backbone_loading(tmp_path):
    """A torchvision ResNet state_dict or a whole-model release file (``state_dict`` with
    ``backbone.*`` keys, ``module.`` prefixes) loads; anything else is one line naming the keys."""
    import torchvision
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = DeepLabV3Plus(5, backbone=18)
    load_pretrained_backbone(model.backbone, path)
    assert torch.equal(model.backbone.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    release = DeepLabV3Plus(5, backbone=18)
    state = {f"module.{k}": v for k, v in release.state_dict().items()}
    torch.save({"arch": "DeepLab", "epoch": 50, "state_dict": state}, tmp_path / "fe.pth")
    load_pretrained_backbone(model.backbone, tmp_path / "fe.pth")
    assert torch.equal(model.backbone.conv1.weight, release.backbone.conv1.weight)
    with pytest.raises(ConfigError, match=r"model.args.pretrained_backbone: .*nope.pth: checkpoint not found"):
        load_pretrained_backbone(model.backbone, tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match=r"does not match the backbone: missing keys: layer1.2.bn1.bias, "
                                          r"layer1.2.bn1.num_batches_tracked, layer1.2.bn1.running_mean and \d+ more; "
                                          r"unexpected keys: none; other shapes: none") as err:
        load_pretrained_backbone(DeepLabV3Plus(5, backbone=34).backbone, path)
    assert "\n" not in str(err.value)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ConfigError, match=r"missing keys: none; unexpected keys: layer1.0.bn3.bias, .* and 195 more; "
                                          r"other shapes: layer1.0.conv1.weight"):
        load_pretrained_backbone(model.backbone, tmp_path / "r50.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"model.args.pretrained_backbone: .*junk.pth: corrupted or truncated"):
        load_pretrained_backbone(model.backbone, tmp_path / "junk.pth")


def test_official_head_init():
    """ASPP: PyTorch's default convolution init (kaiming-uniform a=sqrt(5): std 1/sqrt(3 fan_in));
    decoder: kaiming-normal fan_out with the ReLU gain (std sqrt(2 / fan_out)), each within 10%."""
    torch.manual_seed(0)
    model = DeepLabV3Plus(21, backbone=101)
    aspp = [m for m in model.aspp.modules() if isinstance(m, torch.nn.Conv2d)]
    decoder = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(aspp) == 6 and len(decoder) == 4
    for conv in aspp:
        fan_in = conv.weight[0].numel()
        assert abs(conv.weight.std().item() / (1 / (3 * fan_in)) ** 0.5 - 1) < 0.1, conv
    for conv in decoder:
        fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
        assert abs(conv.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.1, conv
    bns = [m for m in (*model.aspp.modules(), *model.decoder.modules()) if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(bn.weight == 1) and torch.all(bn.bias == 0) for bn in bns)
    fan_in_init = DeepLabV3Plus(21, backbone=18, head_init="kaiming_fan_in")
    conv = fan_in_init.aspp.convs[1][0]
    assert abs(conv.weight.std().item() / (2 / conv.weight[0].numel()) ** 0.5 - 1) < 0.1
    with pytest.raises(ConfigError, match="model.args.head_init: unknown 'xavier'"):
        DeepLabV3Plus(5, backbone=18, head_init="xavier")


def test_bad_architecture_options():
    with pytest.raises(ConfigError, match="depth 42"):
        DeepLabV3Plus(5, backbone=42)
    with pytest.raises(ConfigError, match="output_stride"):
        DeepLabV3Plus(5, backbone=18, output_stride=32)


def test_semantic_encoder_init_and_mlp():
    torch.manual_seed(0)
    linear = SemanticEncoder(300, 256, hidden_size=0)
    assert linear.is_linear and torch.all(linear.model.bias == 0.01)
    bound = (6 / (300 + 256)) ** 0.5
    assert linear.model.weight.abs().max() <= bound
    mlp = SemanticEncoder(300, 256, hidden_size=128, dropout=0.2)
    assert not mlp.is_linear
    assert [type(m).__name__ for m in mlp.model] == ["Linear", "LeakyReLU", "Dropout", "Linear"]
    assert mlp.model[1].negative_slope == 0.2 and mlp.model[2].p == 0.2
    assert mlp(torch.randn(4, 5, 300)).shape == (4, 5, 256)
