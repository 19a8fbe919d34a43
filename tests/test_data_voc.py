"""Tiny Pascal VOC trees: counts after unseen removal, train_aug lists, ignore options,
joint transforms (checkerboard alignment) and bad-file errors."""
import logging

import numpy as np
import pytest
import torch

from data_loader import prepare_data
from data_loader.build import resolve
from data_loader.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.test_data_helpers import (
    CLASS_COLOURS,
    COW,
    SHEEP,
    blank_label,
    make_voc,
    standard_voc,
    voc_cfg,
    write_image,
    write_label,
)
from utils.errors import ConfigError, DataError


def denormalise(image: torch.Tensor) -> np.ndarray:
    """Back to uint8 HxWx3."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_counts_after_unseen_removal(tmp_path):
    root, emb = standard_voc(tmp_path)
    bundle = prepare_data(voc_cfg(root, emb))
    assert [s.name for s in bundle.train_set.samples] == ["t0", "t3", "t4"]
    assert [s.name for s in bundle.val_set.samples] == ["v0", "v1", "v2"]
    kept = prepare_data(voc_cfg(root, emb, remove_unseen_images=False), val=False)
    assert len(kept.train_set) == 5 and kept.val_set is None
    assert len(prepare_data(voc_cfg(root, emb, unseen_classes=["sheep"]), val=False).train_set) == 4


def test_items(tmp_path):
    root, emb = standard_voc(tmp_path, image_ext=".png")
    bundle = prepare_data(voc_cfg(root, emb, image_ext=".png"))
    item = bundle.train_set[0]
    assert item["name"] == "t0" and item["image"].dtype == torch.float32 and item["image"].shape == (3, 24, 24)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (24, 24)
    assert set(item["label"].unique().tolist()) <= {0, SHEEP, 255}
    val = bundle.val_set[2]  # full resolution, no resize: 30x20 as written
    assert val["image"].shape == (3, 30, 20) and val["label"].shape == (30, 20)
    assert np.array_equal(val["label"].numpy(), blank_label(30, 20, objects={1: (slice(4, 12), slice(6, 20))}))
    assert np.array_equal(denormalise(val["image"]), CLASS_COLOURS[val["label"].numpy()])


def test_train_aug_pair_list(tmp_path):
    root = tmp_path / "VOC2012"
    labels = {"a": blank_label(objects={COW: (slice(0, 4), slice(0, 4))}), "b": blank_label(), "c": blank_label()}
    lines = []
    for stem, label in labels.items():
        write_image(root / "JPEGImages" / f"{stem}.jpg", CLASS_COLOURS[label])
        write_label(root / "SegmentationClassAug" / f"{stem}.png", label, palette=False)
        lines.append(f"/JPEGImages/{stem}.jpg /SegmentationClassAug/{stem}.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(lines) + "\n")
    cfg = voc_cfg(root, str(tmp_path / "emb.npy"), train_split="train_aug")
    np.save(tmp_path / "emb.npy", np.ones((21, 4), dtype=np.float32))
    bundle = prepare_data(cfg, val=False)
    assert [s.name for s in bundle.train_set.samples] == ["b", "c"]
    assert bundle.train_set.samples[0].label == root / "SegmentationClassAug" / "b.png"


def test_ignore_bg_and_ignore_unseen(tmp_path):
    root, emb = standard_voc(tmp_path, image_ext=".png")
    cfg = voc_cfg(root, emb, image_ext=".png", ignore_bg=True, ignore_unseen=True, remove_unseen_images=False,
                  base_size=24, scale_range=[1.0, 1.0], crop_size=32)
    bundle = prepare_data(cfg)
    val = bundle.val_set[0]["label"]  # val: background ignored, unseen cow kept for evaluation
    assert (val == COW).sum() == 8 * 14 and (val == 0).sum() == 0 and (val == 255).sum() == 24 * 32 - 8 * 14
    train = bundle.train_set[2]["label"]  # t2: motorbike box + person box; both bg and unseen ignored
    assert set(train.unique().tolist()) == {15, 255} and (train == 15).sum() == 6 * 8


def test_checkerboard_alignment(tmp_path):
    """Image colour encodes the label; after random scale/crop/flip they must still agree."""
    cells = np.add.outer(np.arange(48) // 12, np.arange(64) // 16) % 2  # 4x4 cells, even count per row
    label = np.where(cells == 1, SHEEP, 3).astype(np.uint8)
    root = make_voc(tmp_path / "VOC", {"train": {"c0": label}, "val": {"c0": label}}, image_ext=".png")
    np.save(tmp_path / "emb.npy", np.ones((21, 4), dtype=np.float32))
    cfg = voc_cfg(root, str(tmp_path / "emb.npy"), image_ext=".png", base_size=48, crop_size=56,
                  scale_range=[0.5, 1.5], unseen_classes=[])
    dataset = prepare_data(cfg, val=False).train_set
    torch.manual_seed(0)
    saw_padding = saw_flip_asymmetry = False
    for _ in range(40):
        item = dataset[0]
        image, target = denormalise(item["image"]), item["label"].numpy()
        assert image.shape[:2] == target.shape == (56, 56)
        valid = target != 255
        # pixels farther than 2 px from a label edge (resizing blends colours across edges)
        padded = np.pad(target, 2, mode="edge")
        near_edge = np.zeros_like(valid)
        for dy in range(5):
            for dx in range(5):
                near_edge |= padded[dy:dy + 56, dx:dx + 56] != target
        inner = valid & ~near_edge
        decoded = np.where(np.abs(image.astype(int) - CLASS_COLOURS[SHEEP]).sum(-1) <
                           np.abs(image.astype(int) - CLASS_COLOURS[3]).sum(-1), SHEEP, 3)
        assert (decoded[inner] == target[inner]).all() and inner.sum() > 100
        assert (image[~valid] == 0).all()  # padding: image 0, label 255
        saw_padding |= bool((~valid).any())
        saw_flip_asymmetry |= bool((target[valid] != np.fliplr(target)[valid]).any())
    assert saw_padding and saw_flip_asymmetry


def test_missing_files(tmp_path):
    root, emb = standard_voc(tmp_path)
    (root / "JPEGImages" / "t3.jpg").unlink()
    (root / "SegmentationClass" / "v1.png").unlink()
    with pytest.raises(DataError, match=r"JPEGImages/t3.jpg: image file not found$"):
        prepare_data(voc_cfg(root, emb), val=False)
    with pytest.raises(DataError, match=r"SegmentationClass/v1.png: label file not found$"):
        prepare_data(voc_cfg(root, emb), train=False)
    bundle = prepare_data(voc_cfg(root, emb, skip_bad_samples=True))
    assert [s.name for s in bundle.train_set.samples] == ["t0", "t4"]
    assert [s.name for s in bundle.val_set.samples] == ["v0", "v2"]
    with pytest.raises(ConfigError, match=r"data.val_split: list file .*ImageSets/Segmentation/test.txt not found"):
        prepare_data(voc_cfg(root, emb, val_split="test"), train=False)


def test_bad_label_values_and_sizes(tmp_path, caplog):
    root, emb = standard_voc(tmp_path)
    write_label(root / "SegmentationClass" / "t0.png", blank_label(objects={30: (slice(0, 2), slice(0, 2))}))
    with pytest.raises(DataError, match=r"t0.png: label values \[30\] are neither class indices 0..20 nor 255"):
        prepare_data(voc_cfg(root, emb), val=False)  # the unseen scan reads every training label
    write_label(root / "SegmentationClass" / "v0.png", blank_label(20, 32))
    write_image(root / "JPEGImages" / "v1.jpg", np.zeros((24, 32, 3), np.uint8)[:, :, :1].repeat(3, 2)[:, :30])
    (root / "JPEGImages" / "v2.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"v0.png: label size 32x20 differs .* \(and 2 more; list them with "):
        prepare_data(voc_cfg(root, emb), train=False)   # the val split is read in full at start
    val = resolve(voc_cfg(root, emb)).dataset("val", "val_split", train=False)
    with pytest.raises(DataError, match=r"v0.png: label size 32x20 differs from image .*v0.jpg size 32x24"):
        val[0]
    with pytest.raises(DataError, match=r"v1.png: label size 32x24 differs from image .*v1.jpg size 30x24"):
        val[1]
    with pytest.raises(DataError, match=r"v2.jpg: cannot read image \("):
        val[2]
    write_image(root / "SegmentationClass" / "v2.png", np.zeros((30, 20, 3), np.uint8))
    (root / "JPEGImages" / "v2.jpg").unlink()
    write_image(root / "JPEGImages" / "v2.jpg", np.zeros((30, 20, 3), np.uint8))
    with pytest.raises(DataError, match=r"v2.png: label must be a single-channel class-index PNG .* got mode RGB"):
        val[2]
    with caplog.at_level(logging.WARNING):
        with pytest.raises(ConfigError, match="data.val_split: no usable sample left"):
            prepare_data(voc_cfg(root, emb, skip_bad_samples=True), train=False)
    assert sum("skipping bad sample" in r.message for r in caplog.records) == 3
