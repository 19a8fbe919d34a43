"""Configs: inheritance (_base_), overrides (-o and the shortcuts), schema errors, object factory."""
import json
import re
from pathlib import Path

import pytest
import torch

from trainer.cli import main
from trainer.options import OVERRIDES, build_arg_parser, overrides_of
from utils.errors import ConfigError
from utils.parse_config import construct, load_config, parse_assignment, set_by_path
from utils.run_dir import run_path
from utils.schema import CONFIG_SCHEMA, OptimizerSection
from utils.settings import Settings
from utils.util import atomic_torch_save, read_json

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def test_base_chain_is_deep_merged_relative_to_the_file(tmp_path):
    _write(tmp_path / "base.json", {"name": "base", "loss": {"alpha": 0.1, "ratio": 0.25},
                                    "data": {"embeddings": {"paths": ["a.npy"], "normalize": "l2"}}})
    _write(tmp_path / "mid.json", {"_base_": "base.json", "loss": {"alpha": 0.5}})
    child = _write(tmp_path / "splits" / "child.json", {"_base_": ["../mid.json"], "name": "child",
                                                        "data": {"embeddings": {"normalize": "max_norm"}}})
    config = load_config(child)
    assert config == {"name": "child", "loss": {"alpha": 0.5, "ratio": 0.25},
                      "data": {"embeddings": {"paths": ["a.npy"], "normalize": "max_norm"}}}
    _write(tmp_path / "loop_a.json", {"_base_": "loop_b.json"})
    _write(tmp_path / "loop_b.json", {"_base_": "loop_a.json"})
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop_a.json")
    with pytest.raises(ConfigError, match=r"gone\.json.*not found"):
        load_config(_write(tmp_path / "orphan.json", {"_base_": "gone.json"}))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_checks(path):
    config = load_config(path)
    assert "_base_" not in config and config["data"]["type"] in ("VOC", "Context", "Synthetic", "Custom")
    settings = Settings.from_config(config, str(path))
    assert settings.trainer.epochs >= 1 and settings.inference.sigmas


def test_split_configs_hold_only_what_differs():
    for family, base in (("pascal", "config_pascal_zs3setting.json"), ("context", "config_context_zs3setting.json")):
        for path in (ROOT / "configs" / family).glob("zs3_unseen*.json"):
            raw = read_json(path)
            assert raw["_base_"] == f"../{base}" and len(json.dumps(raw)) < 200, path
            n = path.stem.removeprefix("zs3_unseen")
            if n != "2":
                assert load_config(path)["data"]["unseen_classes"] == f"zs3-{n}"


def test_overrides_parse_json_and_check_the_key_path():
    assert parse_assignment("data.root=/data/VOC2012") == ("data.root", "/data/VOC2012")
    assert parse_assignment("data.scale_range=[0.5, 1.5]") == ("data.scale_range", [0.5, 1.5])
    assert parse_assignment("trainer.amp=false") == ("trainer.amp", False)
    config = {"trainer": {"epochs": 3}, "optimizer": {"type": "SGD", "args": {"lr": 0.1}}}
    set_by_path(config, "trainer.val_period", 2, CONFIG_SCHEMA)          # known, absent: added
    set_by_path(config, "optimizer.args.nesterov", True, CONFIG_SCHEMA)  # free-form args
    assert config["trainer"] == {"epochs": 3, "val_period": 2} and config["optimizer"]["args"]["nesterov"]
    with pytest.raises(ConfigError, match=r"config key trainer\.epcohs: unknown key 'epcohs' under trainer; "
                                          r"valid: .*epochs"):
        set_by_path(config, "trainer.epcohs", 5, CONFIG_SCHEMA)
    with pytest.raises(ConfigError, match="unknown key 'nothere'"):
        set_by_path(config, "nothere.alpha", 1, CONFIG_SCHEMA)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignment("trainer.epochs")


def test_command_line_overrides_and_help(tmp_path, capsys):
    parser = build_arg_parser("configs/config_pascal_zs3setting.json")
    help_text = parser.format_help()
    for opt in OVERRIDES:
        assert opt.flags[0] in help_text and opt.target in help_text
    assert "-o KEY=VALUE" in help_text
    args = parser.parse_args(["-o", "data.root=/data/VOC2012", "-o", "trainer.epochs=5", "--lr", "0.5"])
    assert overrides_of(args) == {"data.root": "/data/VOC2012", "trainer.epochs": 5, "optimizer.args.lr": 0.5}
    settings = Settings.from_config(load_config(ROOT / "configs" / "config_pascal_zs3setting.json"),
                                    overrides=overrides_of(args))
    assert settings.data.root == "/data/VOC2012" and settings.trainer.epochs == 5
    run_dir = run_path(settings.trainer.save_dir, settings.name, "r1")
    assert run_dir == Path("saved") / "pascal_zs3_unseen2" / "r1" and not run_dir.exists()
    code = main(argv=["-c", str(ROOT / "configs" / "config_synthetic_zs3setting.json"), "-o", "trainer.epcohs=1",
                      "-d", "cpu", "--save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "trainer.epcohs" in err
    assert not any(tmp_path.iterdir())


def test_construct_builds_and_lists_valid_names(tmp_path):
    spec = OptimizerSection("SGD", {"lr": 0.01})
    model = torch.nn.Linear(2, 2)
    optimizer = construct(torch.optim, spec, "optimizer", model.parameters())
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.01
    with pytest.raises(ConfigError, match=r"optimizer\.type: unknown 'Sgd'; valid: .*SGD"):
        construct(torch.optim, OptimizerSection("Sgd", {"lr": 0.01}), "optimizer", model.parameters())
    with pytest.raises(ConfigError, match="optimizer.args: \\['lr'\\] may not be set here"):
        construct(torch.optim, spec, "optimizer", model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="missing"):
        Settings.from_config({"name": "unit", "optimizer": {"type": "SGD"}})


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 1"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.json: file not found"):
        load_config(tmp_path / "missing.json")


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


@pytest.mark.parametrize("argv, message", [
    (["-o", "data=null"], "config key data: may not be null (-o data=null)"),
    (["-o", "trainer.epochs=null"], "config key trainer.epochs: may not be null"),
    (["-o", "data.synthetic.num_train=1e12"], "data.synthetic.num_train: invalid value 1000000000000.0"),
    (["-o", "data.synthetic.image_size=32.5"], "data.synthetic.image_size: invalid value 32.5"),
    (["-o", "data_loader.batch_size=4.0"], "data_loader.batch_size: invalid value 4.0"),
])
def test_null_overrides_and_counts_that_are_not_integers_are_one_line_errors(tmp_path, capsys, argv, message):
    from tests.tiny import write_tiny_config
    config = write_tiny_config(tmp_path, tmp_path / "cache")
    assert main(argv=["-c", str(config), "-d", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "saved").exists() and not (tmp_path / "cache").exists()   # before any work


@pytest.mark.parametrize("argv, file_change, message", [
    (["-o", "data=5"], {}, "data: expected an object, got 5"),
    (["-o", 'trainer="x"'], {}, "trainer: expected an object, got 'x'"),
    (["-o", "data.embeddings=3"], {}, "data.embeddings: expected an object, got 3"),
    ([], {"optimizer": "Adam"}, "optimizer: expected an object, got 'Adam'"),
    ([], {"loss": [1, 2]}, "loss: expected an object, got [1, 2]"),
    ([], {"model": 18}, "model: expected an object, got 18"),
])
def test_a_section_that_is_not_an_object_is_a_one_line_error(tmp_path, capsys, argv, file_change, message):
    from tests.tiny import write_tiny_config
    config = write_tiny_config(tmp_path, tmp_path / "cache", **file_change)
    assert main(argv=["-c", str(config), "-d", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "saved").exists() and not (tmp_path / "cache").exists()   # before any work


@pytest.mark.parametrize("run_id", ["../escape", "a/../../x", ".", "..", "a/./b", ""])
def test_a_run_id_that_leaves_the_experiment_folder_is_refused(tmp_path, capsys, run_id):
    from tests.tiny import write_tiny_config
    config = write_tiny_config(tmp_path, tmp_path / "cache")
    assert main(argv=["-c", str(config), "-d", "cpu", "--run_id", run_id]) == 2
    assert capsys.readouterr().err == ("error: --run_id: expected a folder name inside the experiment folder (no '.' "
                                       f"or '..' parts), got {run_id!r}\n")
    assert not (tmp_path / "saved").exists()


def test_null_is_allowed_where_the_schema_says_a_key_may_be_null():
    config = {"trainer": {"epochs": 1, "amp": "bf16"}, "model": {"type": "M", "args": {"dropout": 0.1}}}
    set_by_path(config, "trainer.amp", None, CONFIG_SCHEMA)        # TrainerSection.amp: str | bool | None
    set_by_path(config, "model.args.dropout", None, CONFIG_SCHEMA)  # free constructor arguments
    assert config["trainer"]["amp"] is None and config["model"]["args"]["dropout"] is None
    with pytest.raises(ConfigError, match="may not be null"):
        set_by_path(config, "model", None, CONFIG_SCHEMA)


def test_command_line_without_config_or_checkpoint_is_a_one_line_error(capsys):
    assert main(argv=["-d", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == "error: no config given: add -c config.json (or -r a checkpoint or run folder to continue)\n"


def test_delete_in_a_child_replaces_the_base_object(tmp_path):
    _write(tmp_path / "base.json", {"name": "base", "optimizer": {"type": "SGD", "args": {"lr": 0.1, "momentum": 0.9}},
                                    "data": {"embeddings": {"paths": ["a.npy"], "normalize": "l2"}}})
    child = _write(tmp_path / "child.json", {"_base_": "base.json",
                                             "optimizer": {"_delete_": True, "type": "Adam", "args": {"lr": 1e-3}},
                                             "data": {"embeddings": {"normalize": "none"}}})
    config = load_config(child)
    assert config["optimizer"] == {"type": "Adam", "args": {"lr": 1e-3}}     # momentum deleted with the base object
    assert config["data"]["embeddings"] == {"paths": ["a.npy"], "normalize": "none"}   # merged as before


def test_semantic_dropout_without_a_hidden_layer_is_refused(tmp_path):
    config = load_config(ROOT / "configs" / "config_pascal_zs3setting.json")
    config["semantic_encoder"]["args"]["dropout"] = 0.5
    with pytest.raises(ConfigError, match=r"semantic_encoder\.args\.dropout: does nothing when hidden_size is 0"):
        Settings.from_config(config, "c.json")
    recorded = Settings.from_config(config, "c.json", recorded=True)   # a checkpoint's config of an older run
    assert "dropout" not in recorded.semantic_encoder.args
    config["semantic_encoder"]["args"]["hidden_size"] = 64   # an MLP: dropout acts
    assert Settings.from_config(config).semantic_encoder.args["dropout"] == 0.5


DATA_KEYS_READ_ONLY_BY_SETTINGS = ("remove_unseen_images", "ignore_unseen", "ignore_bg", "scale_range", "crop_size",
                                   "base_size", "normalize", "skip_bad_samples", "hflip", "unseen_classes")


def test_data_keys_are_spelled_only_in_the_schema_and_the_settings():
    """The data section is read once, typed: no other module names its keys in a string (docstrings,
    which document them, aside)."""
    import ast
    import subprocess
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    found = []
    for name in files.split():
        if name.startswith("tests/") or name in ("utils/schema.py", "utils/settings.py"):
            continue
        tree = ast.parse((ROOT / name).read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found += [f"{name}:{node.lineno}: {key}" for key in DATA_KEYS_READ_ONLY_BY_SETTINGS
                          if re.search(rf"(?<![\w-]){key}(?!\w)", node.value)]
    assert not found, "\n".join(found)
