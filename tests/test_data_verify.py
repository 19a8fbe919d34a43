"""python -m data_loader.verify: count table, bad files, expected counts, config errors."""
import json

import numpy as np

from data_loader.verify import main
from tests.test_data_helpers import standard_voc, voc_cfg, write_label


def write_config(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"name": "t", "data": data}))
    return str(path)


def table(out):
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("split"))
    return [line.split() for line in lines[start + 1:start + 3]]


def test_verify_resolves_a_base_config(tmp_path, capsys):
    root, emb = standard_voc(tmp_path)
    write_config(tmp_path, voc_cfg(root, emb))
    child = tmp_path / "splits" / "zs3_unseen1.json"
    child.parent.mkdir()
    child.write_text(json.dumps({"_base_": "../config.json", "data": {"unseen_classes": ["sheep"]}}))
    assert main(["-c", str(child), "--quiet"]) == 0
    assert "unseen: sheep" in capsys.readouterr().out


def test_verify_counts(tmp_path, capsys):
    root, emb = standard_voc(tmp_path)
    config = write_config(tmp_path, voc_cfg(root, emb, expected_counts={"train": 5, "val": 3}))
    assert main(["-c", config, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "21 classes, embeddings (21, 8), unseen: cow, motorbike" in out
    assert table(out) == [["train", "5", "0", "2", "3", "5"], ["val", "3", "0", "1", "3", "3"]]
    assert out.strip().endswith("data OK")


def test_verify_reports_problems(tmp_path, capsys):
    root, emb = standard_voc(tmp_path)
    write_label(root / "SegmentationClass" / "t3.png", np.full((24, 32), 40))
    (root / "JPEGImages" / "v2.jpg").write_bytes(b"junk")
    config = write_config(tmp_path, voc_cfg(root, emb, expected_counts={"val": 1449}))
    assert main(["-c", config, "--quiet"]) == 1
    captured = capsys.readouterr()
    assert table(captured.out) == [["train", "5", "1", "2", "2", "-"], ["val", "3", "1", "1", "2", "1449"]]
    errors = captured.err.strip().splitlines()
    assert errors[0].endswith("t3.png: label values [40] are neither class indices 0..20 nor 255")
    assert "v2.jpg: cannot read image" in errors[1]
    assert errors[2] == (f"error: data.val_split 'val': 3 images listed, expected 1449 "
                         f"(data.expected_counts in {config})")
    assert errors[3] == "3 problem(s) found"


def test_verify_config_error(tmp_path, capsys):
    root, emb = standard_voc(tmp_path)
    config = write_config(tmp_path, voc_cfg(root, emb, unseen_classes=["cowz"]))
    assert main(["-c", config]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: data.unseen_classes: unknown class 'cowz' (file {config}); valid: background,")
    assert "\n" not in err
