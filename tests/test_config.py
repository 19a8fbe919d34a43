"""ConfigParser: overrides, object factory, run directory snapshot, errors."""
import argparse
import json

import pytest
import torch

from utils.parse_config import ConfigParser, CustomArgs
from utils.util import ConfigError, atomic_torch_save, read_json


def _write_config(tmp_path):
    config = {"name": "unit", "loss": {"alpha": 0.1, "ratio": 0.25},
              "optimizer": {"type": "SGD", "args": {"lr": 0.01}},
              "trainer": {"save_dir": str(tmp_path / "saved")}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def _args():
    args = argparse.ArgumentParser()
    args.add_argument("-c", "--config", default=None)
    args.add_argument("-r", "--resume", default=None)
    args.add_argument("-d", "--device", default=None)
    return args


def test_cli_overrides_nested_keys_and_snapshot(tmp_path):
    path = _write_config(tmp_path)
    options = [CustomArgs(["--alpha"], float, "loss;alpha"), CustomArgs(["--lr"], float, "optimizer;args;lr")]
    parser = ConfigParser.from_args(_args(), options, argv=["-c", str(path), "--alpha", "0.5", "-d", "cpu"],
                                    run_id="r1")
    assert parser["loss"]["alpha"] == 0.5 and parser["loss"]["ratio"] == 0.25
    assert parser["optimizer"]["args"]["lr"] == 0.01
    assert parser.device == "cpu"
    assert parser.run_dir == tmp_path / "saved" / "unit" / "r1"
    assert read_json(parser.run_dir / "config.json")["loss"]["alpha"] == 0.5


def test_init_obj_builds_and_lists_valid_names(tmp_path):
    parser = ConfigParser(json.loads(_write_config(tmp_path).read_text()), create_dirs=False)
    model = torch.nn.Linear(2, 2)
    optimizer = parser.init_obj("optimizer", torch.optim, model.parameters())
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.01
    parser.config["optimizer"]["type"] = "Sgd"
    with pytest.raises(ConfigError, match=r"optimizer\.type: unknown 'Sgd'; valid: .*SGD"):
        parser.init_obj("optimizer", torch.optim, model.parameters())
    with pytest.raises(ConfigError, match="missing key 'scheduler'"):
        parser.init_obj("scheduler", torch.optim)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config given"):
        ConfigParser.from_args(_args(), argv=[])
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 1"):
        ConfigParser.from_args(_args(), argv=["-c", str(bad)])
    with pytest.raises(ConfigError, match="missing.json: file not found"):
        ConfigParser.from_args(_args(), argv=["-c", str(tmp_path / "missing.json")])
    path = _write_config(tmp_path)
    with pytest.raises(ConfigError, match="cannot override nothere.alpha"):
        ConfigParser.from_args(_args(), [CustomArgs(["--x"], float, "nothere;alpha")],
                               argv=["-c", str(path), "--x", "1"])


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "ckpt.pth"
    atomic_torch_save({"a": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        atomic_torch_save({"a": Unpicklable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
