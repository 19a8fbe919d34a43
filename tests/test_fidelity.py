"""The official recipe, row by row (docs/fidelity.md): every row names a test that exists, and the
rows that no other test covers are checked here."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors

from data_loader.transforms import PadRightBottom, RandomScale, apply, train_transform
from model.builder import build_encoders
from model.loss import sc_loss
from model.semantic_encoder import SemanticEncoder
from trainer.optim import build_optimizers, build_scheduler
from utils.parse_config import load_config
from utils.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
VOC, CONTEXT = "configs/config_pascal_zs3setting.json", "configs/config_context_zs3setting.json"
PAPER = sorted(str(p.relative_to(ROOT)) for p in [ROOT / VOC, ROOT / CONTEXT, *(ROOT / "configs" / "pascal").glob(
    "*.json"), *(ROOT / "configs" / "context").glob("*.json")])


def settings(path: str) -> Settings:
    return Settings.from_config(load_config(ROOT / path), path)


def test_every_row_of_the_fidelity_table_names_a_test_that_exists():
    rows = [line for line in (ROOT / "docs" / "fidelity.md").read_text().splitlines() if line.startswith("| ")][2:]
    assert len(rows) >= 20
    for row in rows:
        tests = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", row.split("|")[-2])
        assert tests, row
        for path, name in tests:
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name}"


@pytest.mark.parametrize("path", PAPER)
def test_paper_configs_hold_the_official_values(path):
    s = settings(path)
    context = s.data.type == "Context"
    assert s.trainer.monitor == "off" and s.data.selection_split is None and s.trainer.test_after_train
    assert (s.data.base_size, s.data.crop_size, s.data.hflip) == (312, 312, True)
    assert list(s.data.scale_range) == ([0.5, 2.0] if context else [0.5, 1.5])
    assert s.data.remove_unseen_images and s.loader.batch_size == 32 and s.loader.val_batch_size == 1
    assert s.trainer.epochs == (200 if context else 50) and s.seed == 1234
    loss = s.loss
    assert (loss.ratio, loss.temperature, loss.alpha) == ((0.25, 7.0, 0.01) if context else (0.25, 5.0, 0.1))
    assert loss.sc_divide_by_num_classes == context and loss.sc_distance_epsilon == (1e-8 if context else 0.0)
    assert s.inference.sigma == 0.5 and s.inference.calibration == "top2" and s.inference.window.max_size > 500
    assert s.model.args["backbone"] == 101 and s.model.args["output_stride"] == 16
    assert s.model.args.get("head_init", "official") == "official" and s.model.args["freeze_backbone_bn"]


@pytest.mark.parametrize("path,decay", [(VOC, 1e-4), (CONTEXT, 5e-4)])
def test_optimizer_groups_and_hyperparameters(path, decay):
    s = settings(path)
    visual, semantic = build_encoders(s, 21, 300, pretrained=False)
    sgd, adam = build_optimizers(s, visual, semantic)
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adam, torch.optim.Adam)
    backbone, head = sgd.param_groups
    assert (backbone["lr"], head["lr"]) == pytest.approx((2.5e-4, 2.5e-3))
    for group in (backbone, head):
        assert (group["momentum"], group["dampening"], group["weight_decay"]) == (0.9, 0, decay)
    ids = {id(p) for group in sgd.param_groups for p in group["params"]}
    assert ids == {id(p) for p in visual.parameters()}   # every parameter, the frozen BN's affine ones too
    assert id(visual.backbone.bn1.weight) in {id(p) for p in backbone["params"]}
    (group,) = adam.param_groups
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (2e-4, (0.9, 0.999), 1e-8, 0)


@pytest.mark.parametrize("path,epochs", [(VOC, 50), (CONTEXT, 200)])
def test_poly_schedule_is_stepped_per_epoch(path, epochs):
    s = settings(path)
    visual, semantic = build_encoders(s, 21, 300, pretrained=False)
    sgd, adam = build_optimizers(s, visual, semantic)
    schedule, interval = build_scheduler(s, sgd, None)
    assert interval == "epoch"
    for epoch in range(1, epochs + 1):   # epoch e runs at base * (1 - (e - 1) / E) ** 0.9
        expected = 2.5e-4 * (1 - (epoch - 1) / epochs) ** 0.9
        assert sgd.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-18)
        assert sgd.param_groups[1]["lr"] == pytest.approx(10 * expected, rel=1e-9, abs=1e-18)
        assert adam.param_groups[0]["lr"] == 2e-4   # the semantic encoder's LR is constant
        schedule.step()


def test_random_scale_draws_the_short_side_from_the_official_range():
    image = tv_tensors.Image(torch.zeros(3, 375, 500, dtype=torch.uint8))
    shorts = set()
    for seed in range(300):
        torch.manual_seed(seed)
        out = RandomScale(int(0.5 * 312), int(1.5 * 312) + 1)(image)
        shorts.add(out.shape[1])
        assert out.shape[2] == int(out.shape[1] * 500 / 375)   # the aspect kept, as the official int()
    assert min(shorts) >= 156 and max(shorts) <= 468 and len(shorts) > 150


@pytest.mark.parametrize("size,short", [((7, 11), 10), ((13, 17), 4), ((375, 500), 563), ((333, 499), 188),
                                        ((64, 64), 97), ((101, 57), 33), ((360, 480), 181)])
def test_label_resize_equals_pil_nearest(size, short):
    """PIL samples at pixel centres (``floor((dst + 0.5) * in / out)``, accumulated in double
    precision); torch's nearest samples at ``floor(dst * in / out)``, which differs at edges."""
    label = np.random.default_rng(0).integers(0, 21, size=size, dtype=np.uint8)
    height, width = size
    out_size = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
    resized = RandomScale(short, short + 1).transform(tv_tensors.Mask(torch.from_numpy(label)), {"size": [short]})
    pil = np.asarray(Image.fromarray(label).resize(out_size[::-1], Image.NEAREST))
    assert np.array_equal(resized.numpy(), pil)
    image = RandomScale(short, short + 1).transform(tv_tensors.Image(torch.zeros(3, *size, dtype=torch.uint8)),
                                                    {"size": [short]})
    assert tuple(image.shape[1:]) == tuple(resized.shape)   # image and label stay aligned
    torch_nearest = F.interpolate(torch.from_numpy(label)[None, None].float(), size=out_size, mode="nearest")
    if size == (375, 500):
        assert not np.array_equal(torch_nearest[0, 0].byte().numpy(), pil)   # where the two rules differ


def test_padding_is_right_and_bottom_and_the_crop_is_uniform():
    image = tv_tensors.Image(torch.full((3, 20, 30), 7, dtype=torch.uint8))
    label = tv_tensors.Mask(torch.full((20, 30), 3, dtype=torch.uint8))
    padded_image, padded_label = PadRightBottom(40)(image, label)
    assert padded_image.shape == (3, 40, 40) and padded_label.shape == (40, 40)
    assert (padded_image[:, :20, :30] == 7).all() and (padded_image[:, 20:] == 0).all() and \
        (padded_image[:, :, 30:] == 0).all()
    assert (padded_label[:20, :30] == 3).all() and (padded_label[20:] == 255).all()
    assert (padded_label[:, 30:] == 255).all()
    transform = train_transform(20, 40, [1.0, 1.0], hflip=False)   # no scale change: pad, then crop 40
    rows = set()
    for seed in range(50):
        torch.manual_seed(seed)
        _, out = apply(transform, image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor))
        assert (out[:20, :30] == 3).all()              # the image sits at the top-left, whatever the draw
        rows.add(int((out == 3).sum()))
    assert rows == {600}
    rows_label = torch.arange(60, dtype=torch.uint8)[:, None].expand(60, 80).contiguous()   # value = row
    tops = set()
    for seed in range(200):
        torch.manual_seed(seed)
        _, out = apply(train_transform(60, 40, [1.0, 1.0], hflip=False), torch.zeros(3, 60, 80, dtype=torch.uint8),
                       rows_label)
        tops.add(int(out[0, 0]))
    assert tops == set(range(21))                      # every integer offset of the 60-row image, 0..20


def test_flip_comes_before_scale_and_crop():
    """Flip first, then pad right/bottom: a flipped small image still sits at the top-left."""
    transform = train_transform(20, 40, [1.0, 1.0], hflip=True)
    names = [type(t).__name__ for t in transform.transforms]
    assert names[:4] == ["RandomHorizontalFlip", "RandomScale", "PadRightBottom", "RandomCrop"]
    label = torch.zeros(20, 30, dtype=torch.uint8)
    label[:, :10] = 1
    flipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        _, out = apply(transform, torch.zeros(3, 20, 30, dtype=torch.uint8), label)
        assert (out[:20, :30] != 255).all() and (out[20:] == 255).all() and (out[:, 30:] == 255).all()
        flipped += int(out[0, 29] == 1)
    assert 5 < flipped < 35


def test_context_sc_equals_the_official_formula():
    """sqrt(sum of squared differences + 1e-8) per pair, one KL per seen object class (batchmean
    over its row), summed and divided by the class count (the official Context trainer)."""
    torch.manual_seed(0)
    embeddings, encoder, ids = 0.05 * torch.randn(60, 300), SemanticEncoder(300, 256, 0), list(range(1, 58))
    chosen = embeddings[ids]
    prototypes = encoder(chosen)

    def distance(x):
        return torch.stack([torch.sqrt(((x[i] - x) ** 2).sum(1) + 1e-8) for i in range(len(x))])
    target, source = F.softmax(-7 * distance(chosen), 1), F.log_softmax(-distance(prototypes), 1)
    official = sum(F.kl_div(source[i], target[i], reduction="batchmean") for i in range(len(ids))) / len(ids)
    ours = sc_loss(embeddings, encoder, ids, 7.0, divide_by_num_classes=True, distance_epsilon=1e-8)
    assert ours > 0.01 and torch.allclose(ours, official, rtol=1e-6)
    plain = sc_loss(embeddings, encoder, ids, 7.0, divide_by_num_classes=True)   # torch.cdist (the VOC trainer)
    assert not torch.equal(plain, ours) and torch.allclose(plain, ours, rtol=1e-3)
