"""CamVid through the Custom layout: one tiny end-to-end training run of configs/camvid/joem.json
on a handful of the shared images (skipped when ../shared has no CamVid folder)."""
import json
from pathlib import Path

import pytest

from tests.tiny import read_metrics
from trainer.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["sky", "building", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian", "bicyclist"]


@pytest.fixture
def camvid(shared_dir) -> Path:
    folder = shared_dir / "datasets" / "camvid"
    if not (folder / "train.txt").is_file():
        pytest.skip(f"{folder} is absent: the CamVid images are not available")
    return folder


def test_camvid_smoke_run(camvid, shared_dir, tmp_path):
    config = json.loads((ROOT / "configs" / "camvid" / "joem.json").read_text())
    data = config["data"]
    for split, count in (("train", 4), ("val", 2)):
        lines = (camvid / f"{split}.txt").read_text().splitlines()[:count]
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
        data[f"{split}_split"] = str(tmp_path / f"{split}.txt")  # an absolute list path; its lines are root-relative
    data["root"] = str(camvid)
    data["embeddings"]["paths"] = [str(shared_dir / p.replace("data/", "", 1)) for p in data["embeddings"]["paths"]]
    data.update(base_size=64, crop_size=64, scale_range=[1.0, 1.0])
    del data["expected_counts"]
    config["data_loader"].update(batch_size=2, val_batch_size=2)
    config["trainer"].update(epochs=1, save_dir=str(tmp_path / "saved"), tensorboard=False)
    path = tmp_path / "camvid.json"
    path.write_text(json.dumps(config))
    assert main(argv=["-c", str(path), "-d", "cpu", "--run_id", "smoke"]) == 0
    run = tmp_path / "saved" / "camvid_joem" / "smoke"
    records = read_metrics(run)
    # sigma 0.5 and the 11-value sweep, for the one test of the final weights (no selection)
    assert [r["split"] for r in records] == ["test"] * 12 and {r["epoch"] for r in records} == {1}
    assert records[0]["sigma"] == 0.5 and 0.1 in [r["sigma"] for r in records]
    assert all(list(r["iou_by_class"]) == CLASSES for r in records)
    log = (run / "train.log").read_text()
    assert "data.train_split" in log and "4 listed, 0 bad, 4 used" in log
    assert "unseen: pavement, bicyclist" in log and "embeddings: (10, 300)" in log
