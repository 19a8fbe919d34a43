"""predict.py, the Segmenter and model/predictor.py: tiling, banding, class resolution, outputs, errors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import predict
from data_loader.transforms import to_model_input
from model.inference import calibrate, distance_bands, squared_distances, upsampled_squared_distances
from model.predictor import Predictor, class_mask, class_prototypes, sliding_window_features, tile_boxes, tile_starts
from model.visual_encoder import DeepLabV3Plus
from segmentation.segmenter import Segmenter, choose_classes, image_tensor
from segmentation.trained import load_trained_model
from tests.tiny import fit_prototypes
from utils.checkpoint import architecture, save_checkpoint
from utils.schema import InferenceSettings, SlidingWindow
from utils.settings import Settings
from utils.visualization import palette

NAMES = ["background", "cat", "dog", "horse"]
UNSEEN = [3]
DIM = 8
CONFIG = {"name": "predict-test",
          "model": {"type": "DeepLabV3Plus", "args": {"backbone": 18, "output_stride": 16}},
          "semantic_encoder": {"type": "SemanticEncoder", "args": {"hidden_size": 0}},
          "data": {"type": "Synthetic", "embeddings": {"normalize": "l2"}},
          "inference": {"sigma": 0.5}}


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, images) -> Path:
    """An untrained ResNet-18 checkpoint with 4 classes and 8-d embeddings.

    The random visual encoder is kept; the linear semantic encoder maps the 8-d embedding
    space onto the 8 main directions of small.png's features, and the class embeddings are
    k-means centres of its pixels, so that predictions use several classes (random
    prototypes would give one class everywhere)."""
    torch.manual_seed(0)
    model = DeepLabV3Plus(len(NAMES), backbone=18).eval()
    encoder, centres = fit_prototypes(model, to_model_input(image_tensor(images / "small.png"))[None], len(NAMES), DIM)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(path, epoch=1, visual_encoder=model.state_dict(), semantic_encoder=encoder.state_dict(),
                    config=CONFIG, class_split={"names": NAMES, "unseen": UNSEEN, "ignore_bg": False},
                    embeddings=centres, architecture=architecture(Settings.of_trained(CONFIG)))
    return path


@pytest.fixture(scope="module")
def trained(ckpt):
    return load_trained_model(ckpt, "cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """small.png (50x40) and big.png (300x200) with smooth random content."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (w, h) in {"small.png": (50, 40), "big.png": (300, 200)}.items():
        coarse = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def extra(tmp_path_factory) -> Path:
    """extra.npy (rows: zebra, Cat) with its sidecar extra.classes.txt."""
    folder = tmp_path_factory.mktemp("emb")
    table = np.random.default_rng(1).standard_normal((2, DIM)).astype(np.float32) * 3
    np.save(folder / "extra.npy", table)
    (folder / "extra.classes.txt").write_text("zebra\nCat\n")
    return folder / "extra.npy"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def mask(path: Path) -> np.ndarray:
    image = Image.open(path)
    assert image.mode == "P"
    return np.array(image)


# ----------------------------------------------------------------------------- sliding window machinery

class PointwiseStub(nn.Module):
    """Features = 4x4 average pool of a 1x1 conv: each cell depends only on its own pixels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(images), 4)


def test_tile_starts_cover_the_side():
    assert tile_starts(100, 128, 96) == [0]
    assert tile_starts(304, 128, 96) == [0, 96, 176]
    assert tile_starts(224, 128, 96) == [0, 96]
    for length, tile, step in [(304, 128, 96), (1000, 512, 384), (96, 32, 32)]:
        covered = np.zeros(length, bool)
        for start in tile_starts(length, tile, step):
            assert start + tile <= length
            covered[start:start + tile] = True
        assert covered.all()
    assert tile_boxes(208, 304, 128, 32) == [(top, left, 128, 128) for top in (0, 80) for left in (0, 96, 176)]
    assert tile_boxes(40, 300, 128, 32) == [(0, 0, 40, 128), (0, 96, 40, 128), (0, 172, 40, 128)]


@pytest.mark.parametrize("tile,overlap,batch", [(32, 8, 1), (48, 16, 3), (64, 0, 2), (256, 32, 1)])
def test_sliding_window_equals_whole_image_for_pointwise_features(tile, overlap, batch):
    model = PointwiseStub()
    image = torch.randn(2, 3, 72, 104)
    with torch.no_grad():
        whole = model.features(image)
        tiled = sliding_window_features(model, image, SlidingWindow(0, tile, overlap, batch))
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-5)


def test_sliding_window_refuses_misaligned_images_and_checks_its_settings():
    with pytest.raises(ValueError, match="pad first"):
        sliding_window_features(PointwiseStub(), torch.randn(1, 3, 62, 64), SlidingWindow(0, 32, 8))
    assert "tile" in SlidingWindow(tile=30).check() and "overlap" in SlidingWindow(tile=32, overlap=32).check()
    assert SlidingWindow().check() is None and not SlidingWindow(max_size=0).applies(5000, 5000)


def test_banded_distances_equal_the_whole_map():
    torch.manual_seed(0)
    features, prototypes = torch.randn(2, 6, 13, 19), torch.randn(5, 6)
    unseen = torch.tensor([False, False, True, False, True])
    whole = upsampled_squared_distances(features, prototypes, (52, 76))
    bands = list(distance_bands(features, prototypes, (52, 76), max_elements=2 * 5 * 76 * 7))
    assert len(bands) == 8 and [b.shape[2] for _, b in bands] == [7] * 7 + [3]
    banded = torch.cat([b for _, b in bands], dim=2)
    assert torch.allclose(banded, whole, rtol=1e-5, atol=1e-4)
    assert (calibrate(banded, unseen, 0.5) == calibrate(whole, unseen, 0.5)).float().mean() > 0.999
    single = list(distance_bands(features, prototypes, (52, 76)))
    assert len(single) == 1 and torch.equal(single[0][1], whole)


# ----------------------------------------------------------------------------- end to end

def test_outputs_for_folder_with_sliding_window(capsys, ckpt, images, tmp_path):
    out = tmp_path / "preds"
    code, stdout, _ = run(capsys, "-r", ckpt, "--images", images, "--out", out, "--device", "cpu",
                          "--max-size", 128, "--tile", 128, "--overlap", 32)
    assert code == 0
    lines = stdout.splitlines()
    assert "unseen: horse; sigma 0.5, top2 calibration" in lines[0]  # checkpoint's split and config
    assert lines[1].startswith("big.png  300x200") and "[6 tiles]" in lines[1]
    assert lines[2].startswith("small.png  50x40") and "tiles" not in lines[2]
    assert (out / "classes.txt").read_text().split() == NAMES
    assert Image.open(out / "legend.png").mode == "RGB"
    for stem, size in [("big", (300, 200)), ("small", (50, 40))]:
        labels = Image.open(out / f"{stem}_mask.png")
        assert labels.mode == "P" and labels.size == size
        assert labels.getpalette()[:12] == palette()[:4].flatten().tolist()
        assert np.array(labels).max() < len(NAMES)
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == size
    # a re-run into the input folder must not segment its own outputs nor touch the images
    before = (out / "small_mask.png").read_bytes()
    code, _, err = run(capsys, "-r", ckpt, "--images", out, "--out", out)
    assert code == 2 and "no images found" in err
    assert (out / "small_mask.png").read_bytes() == before


def test_classes_restriction_limits_mask_values(capsys, ckpt, images, tmp_path):
    small = images / "small.png"
    code, _, _ = run(capsys, "-r", ckpt, "--images", small, "--out", tmp_path / "all", "--sigma", 1)
    assert code == 0
    full = mask(tmp_path / "all" / "small_mask.png")
    assert len(np.unique(full)) >= 3
    code, stdout, _ = run(capsys, "-r", ckpt, "--images", small, "--out", tmp_path / "sub", "--sigma", 1,
                          "--classes", "DOG, Back_ground")
    assert code == 0 and "unseen: none" in stdout
    assert (tmp_path / "sub" / "classes.txt").read_text().split() == ["dog", "background"]
    sub = mask(tmp_path / "sub" / "small_mask.png")
    assert set(np.unique(sub)) <= {0, 1}
    # without calibration, a pixel whose nearest class is kept keeps it
    assert (sub[full == 2] == 0).all() and (sub[full == 0] == 1).all()


def test_extra_class_prototype_comes_from_the_semantic_encoder(trained, extra):
    chosen = choose_classes(trained, "background, cat, Zebra", str(extra))
    assert chosen.names == ["background", "cat", "zebra"]
    assert chosen.unseen == [2] and chosen.extra == [2]           # extra classes are unseen; horse not chosen
    row = torch.from_numpy(np.load(extra))
    assert torch.equal(chosen.embeddings[1], trained.embeddings[1])  # "Cat" in the file: checkpoint wins
    prototypes = class_prototypes(trained.semantic_encoder, chosen.embeddings)
    with torch.no_grad():
        assert torch.allclose(prototypes[2], trained.semantic_encoder(row[0]), atol=1e-6)
        assert torch.allclose(prototypes[:2], class_prototypes(trained.semantic_encoder, trained.embeddings)[:2])
    normalized = choose_classes(trained, "zebra", str(extra), normalize="checkpoint")  # config: l2
    assert torch.allclose(normalized.embeddings[0], row[0] / row[0].norm())
    named = choose_classes(trained, "okapi,horse", str(extra), embedding_classes="okapi,lion", unseen="okapi")
    assert torch.equal(named.embeddings[0], row[0]) and named.unseen == [0]


def test_extra_class_in_outputs(capsys, ckpt, images, extra, tmp_path):
    code, stdout, _ = run(capsys, "-r", ckpt, "--images", images / "small.png", "--out", tmp_path,
                          "--classes", "background,cat,zebra", "--embeddings", extra)
    assert code == 0 and "unseen: zebra" in stdout
    assert (tmp_path / "classes.txt").read_text().split() == ["background", "cat", "zebra"]
    assert Image.open(tmp_path / "legend.png").size[1] > 3 * 20
    assert mask(tmp_path / "small_mask.png").max() < 3


def test_small_sigma_makes_the_unseen_class_win_in_its_top_two(capsys, ckpt, images, tmp_path):
    """Every side in fp32, chosen explicitly: the pixels' two nearest classes come from the same
    distances predict.py computes, so the labels are equal pixel for pixel on any CPU."""
    distances = Segmenter.from_checkpoint(ckpt, device="cpu", amp=False).predict(images / "small.png",
                                                                                  distances=True).distances
    top2 = distances.topk(2, dim=0, largest=False).indices.numpy()
    target = int(np.bincount(top2[1].ravel(), minlength=4).argmax())   # the class most often second
    code, _, _ = run(capsys, "-r", ckpt, "--images", images / "small.png", "--out", tmp_path / "a",
                     "--unseen", NAMES[target], "--sigma", 1e-6, "--amp", "false")
    assert code == 0
    labels = mask(tmp_path / "a" / "small_mask.png")
    expected = np.where((top2 == target).any(0), target, top2[0])
    assert np.array_equal(labels, expected)
    assert (labels == target).sum() > (top2[0] == target).sum()


def test_segmenter_accepts_paths_pil_arrays_and_tensors(trained, images):
    segmenter = Segmenter(trained)
    path = images / "small.png"
    pil = Image.open(path).convert("RGB")
    expected = segmenter(path)
    assert expected.shape == (40, 50) and expected.dtype == torch.long and len(expected.unique()) >= 2
    assert torch.equal(segmenter(pil), expected)
    assert torch.equal(segmenter(np.asarray(pil)), expected)
    assert torch.equal(segmenter(torch.from_numpy(np.array(pil)).permute(2, 0, 1)), expected)
    result = segmenter.predict(path, distances=True)
    assert result.distances.shape == (4, 40, 50) and result.tiles == 1
    unseen = class_mask(trained.split.num_classes, trained.split.unseen)
    assert torch.equal(calibrate(result.distances[None], unseen, 0.5)[0], expected)
    with pytest.raises(predict.ConfigError, match="H x W x 3 uint8"):
        segmenter(np.zeros((4, 4), np.float32))


def test_a_sweep_in_the_checkpoint_uses_its_best_sigma(trained):
    swept = dataclasses.replace(trained, settings=dataclasses.replace(
        trained.settings, inference=InferenceSettings.from_config({"sigma": [0.3, 0.5, 0.7]})))
    with pytest.raises(predict.ConfigError, match=r"inference.sigma is a sweep \[0.3, 0.5, 0.7\].*give sigma"):
        Segmenter(swept)
    assert Segmenter(dataclasses.replace(swept, best_sigma=0.7)).sigma == 0.7
    assert Segmenter(swept, sigma=0.25).sigma == 0.25


def test_bf16_segment_runs(trained, images):
    labels = Segmenter(trained, amp="bf16")(images / "small.png")
    assert labels.shape == (40, 50) and labels.max() < len(NAMES)


# ----------------------------------------------------------------------------- errors and helpers

def test_user_errors_exit_2(capsys, ckpt, images, extra, tmp_path):
    small = images / "small.png"
    base = ["--images", small, "--out", tmp_path / "o"]
    code, _, err = run(capsys, "-r", tmp_path / "missing.pth", *base)
    assert code == 2 and err.startswith("error: ") and "missing.pth" in err and "not found" in err
    code, _, err = run(capsys, "-r", ckpt, *base, "--classes", "background,unicorn")
    assert code == 2 and "'unicorn'" in err and "background, cat, dog, horse" in err and "embedding file" in err
    wrong = tmp_path / "wide.npy"
    np.save(wrong, np.zeros((1, DIM + 3), np.float32))
    code, _, err = run(capsys, "-r", ckpt, *base, "--classes", "zebra", "--embeddings", wrong,
                       "--embedding-classes", "zebra")
    assert code == 2 and f"{DIM + 3} dims" in err and f"have {DIM}" in err
    code, _, err = run(capsys, "-r", ckpt, *base, "--classes", "zebra", "--embeddings", wrong)
    assert code == 2 and "wide.classes.txt" in err                # no sidecar, no --embedding-classes
    code, _, err = run(capsys, "-r", ckpt, *base, "--unseen", "zebra")
    assert code == 2 and "not among the classes" in err
    code, _, err = run(capsys, "-r", ckpt, "--images", tmp_path / "nope.jpg", "--out", tmp_path / "o")
    assert code == 2 and "nope.jpg" in err
    code, _, err = run(capsys, "-r", ckpt, *base, "--tile", 100)
    assert code == 2 and "tile: must be a positive multiple of 16" in err
    assert len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "-r", ckpt, *base, "--device", "cuda")
        assert code == 2 and "CUDA is not available" in err


def test_unreadable_image_is_skipped_with_status_1(capsys, ckpt, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    code, _, err = run(capsys, "-r", ckpt, "--images", bad, "--out", tmp_path / "o")
    assert code == 1 and "broken.jpg" in err and "skipped" in err
    assert (tmp_path / "o" / "classes.txt").is_file() and not (tmp_path / "o" / "broken_mask.png").exists()


def test_output_names_never_overwrite_inputs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        Image.new("RGB", (8, 8)).save(folder / "x.png")
    (a / "y_mask.png").write_bytes(b"")
    found = predict.collect_images([str(a), str(b / "x.png")], skip_dir=a)
    assert [p.name for p in found] == ["x.png", "x.png"]           # a/y_mask.png is an output: skipped
    assert predict.output_stems(found) == ["x", "x-2"]
    with pytest.raises(predict.ConfigError, match="overwrite an input"):
        predict.check_outputs([a / "y_mask.png"], ["y"], a)


def test_a_run_folder_gives_its_final_weights_or_the_checkpoint_its_selection_chose(capsys, ckpt, images, tmp_path):
    import json
    import os
    import shutil

    from segmentation.segmenter import Segmenter
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(ckpt, run_dir / "checkpoint-epoch2.pth")
    shutil.copy(ckpt, run_dir / "checkpoint-epoch10.pth")
    os.utime(run_dir / "checkpoint-epoch10.pth", (1, 1))   # the last epoch, whatever the file times
    shutil.copy(ckpt, run_dir / "model_best.pth")          # kept by a run that selected on the reported split
    code, out, err = run(capsys, "-r", run_dir, "--images", images / "small.png", "--out", tmp_path / "a")
    assert code == 0, err
    final = run_dir / "checkpoint-epoch10.pth"
    assert out.splitlines()[0] == f"checkpoint: {final} (the run's final weights (epoch 10))"
    config = torch.load(ckpt, weights_only=True)["config"]
    config["data"]["selection_split"] = {"holdout": 4}
    config["trainer"] = {"epochs": 10, "monitor": "max mIoU_harmonic"}
    (run_dir / "config.json").write_text(json.dumps(config))   # a run that selected on a split of its own
    segmenter = Segmenter.from_checkpoint(run_dir, device="cpu")
    assert segmenter.checkpoint == run_dir / "model_best.pth"
    assert segmenter.checkpoint_note == "the run's checkpoint chosen on its selection split"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(capsys, "-r", empty, "--images", images / "small.png", "--out", tmp_path / "b")
    assert code == 2 and err == f"error: {empty}: no checkpoint-epochN.pth (the final weights) in this run folder\n"


def test_the_predictor_turns_distances_into_labels_in_one_place():
    model, encoder = PointwiseStub(), nn.Linear(5, 6)
    embeddings, images = torch.randn(4, 5), torch.randn(2, 3, 20, 28)
    predictor = Predictor(model, class_prototypes(encoder, embeddings), class_mask(4, [1, 3]), [0.5, 2.0], "all",
                          excluded=[0])
    assert predictor.unseen_mask.tolist() == [False, True, False, True]
    assert torch.equal(predictor.prototypes, class_prototypes(encoder, embeddings))
    with torch.inference_mode():
        up = F.interpolate(model.features(images), size=(20, 28), mode="bilinear", align_corners=False)
        distances = squared_distances(up, predictor.prototypes)
        distances[:, 0] = float("inf")
        expected = calibrate(distances, predictor.unseen_mask, torch.tensor([0.5, 2.0]), "all")
    labels = predictor.labels(images)
    assert labels.shape == (2, 2, 20, 28) and (labels == expected).float().mean() > 0.999 and (labels != 0).all()
    single = Predictor(model, predictor.prototypes, predictor.unseen_mask, 0.5, "all", excluded=[0]).labels(images)
    assert torch.equal(single, labels[:1])
