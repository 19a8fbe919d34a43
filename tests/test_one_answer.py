"""One checkpoint, one answer: --test, predict.py and the Segmenter give the same labels pixel for
pixel on odd-sized images (every side in fp32, chosen explicitly, + channels_last as the shipped
configs evaluate; the equality holds on any CPU)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from data_loader.transforms import to_model_input
from model import DeepLabV3Plus
from segmentation.segmenter import Segmenter, image_tensor
from tests.tiny import TINY, fit_prototypes
from trainer.cli import main as cli_main
from utils.checkpoint import architecture, save_checkpoint
from utils.settings import Settings

NAMES = ["background", "cat", "dog", "horse"]
SIZES = {"odd": (67, 45), "small": (50, 40)}   # width x height


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A VOC-layout folder with two odd-sized images and a checkpoint whose config points at it."""
    root = tmp_path_factory.mktemp("one_answer")
    voc = root / "VOC"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, (w, h) in SIZES.items():
        coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(voc / "JPEGImages" / f"{stem}.jpg")
        label = rng.integers(0, len(NAMES), (h, w)).astype(np.uint8)
        label[:3] = 255
        Image.fromarray(label).save(voc / "SegmentationClass" / f"{stem}.png")
    for split in ("train", "val"):
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("odd\nsmall\n")
    torch.manual_seed(0)
    model = DeepLabV3Plus(len(NAMES), backbone=18).eval()
    encoder, centres = fit_prototypes(model, to_model_input(image_tensor(voc / "JPEGImages" / "odd.jpg"))[None],
                                      len(NAMES))
    np.save(root / "embeddings.npy", centres.numpy())
    config = copy.deepcopy(TINY)
    config["data"] = {"type": "VOC", "root": str(voc), "classes": NAMES, "unseen_classes": ["horse"],
                      "embeddings": {"paths": [str(root / "embeddings.npy")], "normalize": "none"},
                      "train_split": "train", "val_split": "val", "base_size": 32, "crop_size": 32,
                      "scale_range": [1.0, 1.0]}
    config["inference"] = {"sigma": 0.7, "calibration": "all"}
    config["trainer"].update(amp=False, channels_last=True, save_dir=str(root / "saved"), monitor="off")
    checkpoint = root / "model.pth"
    save_checkpoint(checkpoint, epoch=1, visual_encoder=model.state_dict(), semantic_encoder=encoder.state_dict(),
                    config=config, class_split={"names": NAMES, "unseen": [3], "ignore_bg": False},
                    embeddings=centres, architecture=architecture(Settings.from_config(config)))
    return root, voc, checkpoint


@pytest.mark.parametrize("val_batch", [1, 2])
def test_test_mode_predict_and_segmenter_agree_pixel_for_pixel(setup, tmp_path, capsys, val_batch):
    root, voc, checkpoint = setup
    run_id = f"equal{val_batch}"
    assert cli_main(argv=["-r", str(checkpoint), "--test", "--save_predictions", "-d", "cpu", "--run_id", run_id,
                          "-o", f"data_loader.val_batch_size={val_batch}"]) == 0
    predictions = root / "saved" / "tiny" / f"test_{run_id}" / "predictions_test"
    out = tmp_path / f"predict{val_batch}"
    assert predict.main(["-r", str(checkpoint), "--images", str(voc / "JPEGImages"), "--out", str(out),
                         "--device", "cpu"]) == 0
    assert "sigma 0.7, all calibration" in capsys.readouterr().out
    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
    for stem, (w, h) in SIZES.items():
        from_test = np.array(Image.open(predictions / f"{stem}.png"))
        from_predict = np.array(Image.open(out / f"{stem}_mask.png"))
        assert from_test.shape == (h, w)
        assert np.array_equal(from_test, from_predict), stem
        assert np.array_equal(segmenter(voc / "JPEGImages" / f"{stem}.jpg").numpy(), from_test), stem
        assert len(np.unique(from_test)) >= 2
    record = json.loads((predictions.parent / "metrics.jsonl").read_text().splitlines()[0])
    assert record["split"] == "test" and record["sigma"] == 0.7


def test_sliding_window_is_the_same_path_in_test_mode_and_predict(setup, tmp_path):
    """With the window forced on (max_size 32), both entry points tile the same way."""
    root, voc, checkpoint = setup
    assert cli_main(argv=["-r", str(checkpoint), "--test", "--save_predictions", "-d", "cpu", "--run_id", "tiles",
                          "-o", "inference.window={\"max_size\": 32, \"tile\": 32, \"overlap\": 8}"]) == 0
    out = tmp_path / "tiles"
    assert predict.main(["-r", str(checkpoint), "--images", str(voc / "JPEGImages" / "odd.jpg"), "--out", str(out),
                         "--max-size", "32", "--tile", "32", "--overlap", "8"]) == 0
    from_test = np.array(Image.open(root / "saved" / "tiny" / "test_tiles" / "predictions_test" / "odd.png"))
    assert np.array_equal(from_test, np.array(Image.open(out / "odd_mask.png")))
    whole = Segmenter.from_checkpoint(checkpoint)(voc / "JPEGImages" / "odd.jpg").numpy()
    assert from_test.shape == whole.shape and (from_test != whole).any()   # tiles approximate the whole image
