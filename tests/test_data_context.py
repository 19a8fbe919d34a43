"""Tiny Pascal-Context trees in the official (59_labels.pth) and PNG layouts."""
import numpy as np
import pytest
import torch

from data_loader import prepare_data
from data_loader.classes import CONTEXT_CLASSES, CONTEXT_PNG_CLASSES
from tests.test_data_helpers import blank_label, image_for, write_embeddings, write_image, write_label
from utils.errors import ConfigError, DataError

COW, FENCE, TABLE, WOOD = (CONTEXT_CLASSES.index(n) for n in ("cow", "fence", "diningtable", "wood"))
BOX, BOX2 = (slice(2, 8), slice(3, 9)), (slice(10, 14), slice(0, 30))


def context_cfg(root, emb, **overrides):
    cfg = {"type": "Context", "layout": "official", "root": str(root), "classes": "context",
           "unseen_classes": "zs3-6", "embeddings": {"paths": [emb], "normalize": "max_norm"},
           "train_split": "train", "val_split": "val", "base_size": 24, "crop_size": 24,
           "scale_range": [0.5, 2.0]}
    cfg.update(overrides)
    return cfg


def labels_in_embedding_order():
    return {
        "2008_000001": blank_label(objects={COW: BOX}),
        "2008_000002": blank_label(objects={TABLE: BOX, WOOD: BOX2}),
        "2008_000003": blank_label(objects={FENCE: BOX2}),
        "2008_000004": blank_label(objects={59: BOX, 21: BOX2}),
    }


def write_images(root, labels):
    for stem, label in labels.items():
        write_image(root / "JPEGImages" / f"{stem}.jpg", image_for(label))


@pytest.mark.parametrize("as_numpy", [False, True])
def test_official_layout(tmp_path, as_numpy):
    root, labels = tmp_path / "VOC2010", labels_in_embedding_order()
    write_images(root, labels)
    stored = {k: (v if as_numpy else torch.from_numpy(v)) for k, v in labels.items()}
    torch.save(stored, root / "59_labels.pth")
    (root / "pascal_context_train.txt").write_text("\n".join(labels) + "\n")
    (root / "pascal_context_val.txt").write_text("2008_000001\n2008_000004\n")
    emb = write_embeddings(tmp_path / "emb.npy", 60)
    bundle = prepare_data(context_cfg(root, emb))
    assert [s.name for s in bundle.train_set.samples] == ["2008_000002", "2008_000004"]  # cow, fence unseen
    assert len(bundle.val_set) == 2 and bundle.embeddings.shape == (60, 8)
    label = bundle.val_set[1]["label"]
    assert (label == 59).sum() == 6 * 6 and (label == 21).sum() == 4 * 30 and (label == 0).sum() == 24 * 32 - 156
    write_image(root / "JPEGImages" / "2008_000009.jpg", image_for(blank_label()))
    (root / "pascal_context_val.txt").write_text("2008_000001\n2008_000009\n")
    with pytest.raises(DataError, match=r"59_labels.pth\['2008_000009'\]: no label for this image"):
        prepare_data(context_cfg(root, emb), train=False)


def test_png_layout_remaps_alphabetical_labels(tmp_path):
    root, labels = tmp_path / "VOC2010", labels_in_embedding_order()
    write_images(root, labels)
    to_png = np.full(256, 255, dtype=np.uint8)
    for value, name in enumerate(CONTEXT_CLASSES):
        to_png[value] = CONTEXT_PNG_CLASSES.index("table" if name == "diningtable" else name)
    assert (to_png[COW], to_png[TABLE], to_png[FENCE], to_png[WOOD]) == (20, 50, 25, 59)
    for stem, label in labels.items():
        write_label(root / "PNGLabels" / f"{stem}.png", to_png[label], palette=False)
    lists = root / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(labels) + "\n")
    (lists / "val.txt").write_text("2008_000002\n")
    emb = write_embeddings(tmp_path / "emb.npy", 60)
    bundle = prepare_data(context_cfg(root, emb, layout="png", label_dir="PNGLabels"))
    assert [s.name for s in bundle.train_set.samples] == ["2008_000002", "2008_000004"]
    assert np.array_equal(bundle.val_set[0]["label"].numpy(), labels["2008_000002"])
    write_label(root / "PNGLabels" / "2008_000002.png", blank_label(objects={60: BOX}))
    with pytest.raises(DataError, match=r"2008_000002.png: label values \[60\] are neither class indices 0..59"):
        prepare_data(context_cfg(root, emb, layout="png", label_dir="PNGLabels"), val=False)


def test_layout_errors(tmp_path):
    emb = write_embeddings(tmp_path / "emb.npy", 60)
    tmp_path.joinpath("ctx").mkdir()
    tmp_path.joinpath("ctx", "pascal_context_train.txt").write_text("2008_000001\n")
    with pytest.raises(ConfigError, match=r"data.layout: unknown 'coco'; valid: official, png \(file config\)"):
        prepare_data(context_cfg(tmp_path / "ctx", emb, layout="coco"))
    with pytest.raises(ConfigError, match=r"59_labels.pth: label file not found"):
        prepare_data(context_cfg(tmp_path / "ctx", emb), val=False)
    with pytest.raises(ConfigError, match=r"data.label_dir: not used by the context-official layout"):
        prepare_data(context_cfg(tmp_path / "ctx", emb, label_dir="x"))
    with pytest.raises(ConfigError, match=r"label class 'zebra' is not in the class list"):
        prepare_data(context_cfg(tmp_path / "ctx", emb, layout="png", label_classes=["background", "zebra"]))
