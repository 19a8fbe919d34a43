"""Official JoEm checkpoints (fe_/gen_ pair) load and predict exactly like native ones."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from convert_official_checkpoint import main as convert_main
from model import DeepLabV3Plus, SemanticEncoder
from model.kernels import apply_kernels
from model.predictor import class_prototypes
from segmentation.trained import load_trained_model
from tests.tiny import write_tiny_config
from trainer.cli import main as cli_main
from utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _write_official_pair(folder, model, semantic, stem="model_best"):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.save({"arch": "DeepLab", "epoch": 7, "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "monitor_best": 0.25}, folder / f"{stem}_fe.pth")
    torch.save({"arch": "SemanticEncoder", "epoch": 7, "state_dict": semantic.state_dict(),
                "optimizer": torch.optim.Adam(semantic.parameters()).state_dict(), "monitor_best": 0.25},
               folder / f"{stem}_gen.pth")
    return folder / f"{stem}_fe.pth"


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    # ResNet-18: the conversion is the same for every depth (the official key layout of ResNet-101
    # is checked in test_model), and an 18-layer pair is written and read 4x faster
    model, semantic = DeepLabV3Plus(21, backbone=18).eval(), SemanticEncoder(300, 256, 0)
    np.save(folder / "w2v.npy", np.random.RandomState(0).randn(21, 300).astype(np.float32))
    (folder / "VOC").mkdir()
    config = json.loads((ROOT / "configs" / "config_pascal_zs3setting.json").read_text())
    config["model"]["args"]["backbone"] = 18
    config["data"]["root"] = str(folder / "VOC")
    config["data"]["embeddings"] = {"paths": [str(folder / "w2v.npy")], "normalize": "max_norm"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, _write_official_pair(folder, model, semantic), model, semantic, config


def test_official_pair_gives_identical_outputs(official):
    folder, fe_path, model, semantic, config = official
    loaded = load_trained_model(fe_path, config=config)
    images = torch.randn(1, 3, 48, 64)
    model = apply_kernels(copy.deepcopy(model)).to(memory_format=torch.channels_last)   # as the config evaluates
    assert loaded.model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(loaded.model.features(images), model.features(images))
        assert torch.equal(class_prototypes(loaded.semantic_encoder, loaded.embeddings), semantic(loaded.embeddings))
    assert loaded.split.unseen_names == ("cow", "motorbike") and loaded.epoch == 7
    assert convert_main(["-c", str(folder / "config.json"), "-r", str(fe_path), "--out", str(folder / "n.pth")]) == 0
    native = load_trained_model(folder / "n.pth")
    with torch.no_grad():
        assert torch.equal(native.model.features(images), model.features(images))
    assert torch.equal(native.embeddings, loaded.embeddings)
    before = (folder / "n.pth").read_bytes()
    assert convert_main(["-c", str(folder / "config.json"), "-r", str(fe_path), "--out", str(folder / "n.pth")]) == 2
    assert (folder / "n.pth").read_bytes() == before


def test_official_errors(official, tmp_path):
    folder, fe_path, _, _, config = official
    with pytest.raises(ConfigError, match="holds no class list"):
        load_trained_model(fe_path)
    lonely = tmp_path / "fe_checkpoint-epoch3.pth"
    lonely.write_bytes(fe_path.read_bytes())
    with pytest.raises(ConfigError, match="gen_checkpoint-epoch3.pth is missing"):
        load_trained_model(lonely, config=config)


def test_official_checkpoint_for_test_and_training(tmp_path, capsys):
    torch.manual_seed(1)
    config = write_tiny_config(tmp_path, tmp_path / "cache", trainer__epochs=1)
    fe_path = _write_official_pair(tmp_path, DeepLabV3Plus(10, backbone=18), SemanticEncoder(300, 256, 0), "fe")
    fe_path = fe_path.rename(tmp_path / "fe_checkpoint-epoch7.pth")
    (tmp_path / "fe_gen.pth").rename(tmp_path / "gen_checkpoint-epoch7.pth")
    assert cli_main(argv=["-r", str(fe_path), "--test", "-d", "cpu"]) == 2
    assert "official JoEm checkpoint holds no config" in capsys.readouterr().err
    assert cli_main(argv=["-r", str(fe_path), "-c", str(config), "--test", "-d", "cpu", "--run_id", "t"]) == 0
    assert "converted official JoEm checkpoint" in capsys.readouterr().out
    assert cli_main(argv=["-r", str(fe_path), "-c", str(config), "-d", "cpu", "--run_id", "ft"]) == 0
    out = capsys.readouterr().out
    assert "training starts at epoch 1 from the weights" in out and "epoch 1/1" in out


def test_segmenter_loads_an_official_pair_with_its_config_file(official, tmp_path):
    from segmentation.segmenter import Segmenter
    folder, fe_path, model, semantic, config = official
    segmenter = Segmenter.from_checkpoint(fe_path, config=folder / "config.json", device="cpu", amp=False,
                                          classes=["background", "cow", "horse", "motorbike"])
    image = np.random.default_rng(3).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    labels = segmenter(image)
    assert labels.shape == (37, 53) and labels.max() < 4
    assert segmenter.names == ["background", "cow", "horse", "motorbike"]
    assert [segmenter.names[i] for i in segmenter.unseen] == ["cow", "motorbike"] and segmenter.sigma == 0.5
    with pytest.raises(ConfigError, match="holds no class list"):
        Segmenter.from_checkpoint(fe_path)
