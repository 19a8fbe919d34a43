"""The benchmark harness (benchmarks/run.py) end to end on a tiny model: what it measures, prints and writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import main
from tests.tiny import write_tiny_config
from utils.amp import resolve_precision

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One in-process run: ResNet-18, crop 32, batch 2 (the ASPP image-pool BatchNorm needs two), 1 + 1 steps."""
    tmp = tmp_path_factory.mktemp("bench")
    config, out = write_tiny_config(tmp, tmp / "cache"), tmp / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.run", "-c", str(config), "--backbone", "18", "--crop", "32",
           "--batch", "2", "--warmup", "1", "--steps", "1", "--eval-size", "40x32", "--eval-images", "2",
           "--eval-batch", "2", "--modes", "fp32,bf16,auto", "--parity-steps", "2", "--data-batches", "2",
           "--workers", "0", "--threads", "1", "--in-process", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_the_json_holds_the_environment_settings_and_every_measurement(tiny_run):
    _, result = tiny_run
    assert result["environment"]["cpu"]["model"] and result["environment"]["torch"]
    settings = result["settings"]
    assert (settings["backbone"], settings["crop"], settings["batch"], settings["eval_size"]) == (18, 32, 2, [40, 32])
    assert result["config"]["name"] == "tiny" and result["note"] is None   # the tiny data's own embeddings
    auto = resolve_precision("auto", "cpu").name   # the tiny config has channels_last off
    assert settings["auto_mode"] == settings["fast_mode"] == auto and settings["data_modes"] == [auto]
    assert list(result["modes"]) == ["fp32", "bf16"]   # auto is measured once, as the mode it equals
    for name, row in result["modes"].items():
        assert row["status"] == "ok" and not row["errors"], (name, row)
        for part in ("train", "eval"):
            rates = row[part]["images_per_s"]
            assert 0 < rates["min"] <= rates["median"] <= rates["max"], (name, part, rates)
            assert row["peak_bytes"][part] > 0
        assert len(row["train"]["step_s"]) == 1 and len(row["train"]["warmup_s"]) == 1
        assert len(row["eval"]["step_s"]) == 1   # 2 images in one batch of 2
        assert row["train"]["achieved_tflops"] > 0 and row["train"]["mfu"] is None   # MFU: GPUs only
    assert result["modes"][auto]["train_with_data"]["images_per_s"]["median"] > 0   # the fast mode, data included
    assert result["flops"]["train_step"] > 0 and result["flops"]["mode"] == "fp32"
    loader = result["data_loader"]
    assert [r["workers"] for r in loader["results"]] == [0] and loader["results"][0]["images_per_s"] > 0
    parity = result["parity"]
    assert parity["fast"] == auto and len(parity["losses_fp32"]) == len(parity["losses_fast"]) == 2
    assert parity["losses_fp32"][-1] > 0 and parity["loss_rel_diff"] >= 0
    assert 0 <= parity["identical_fraction"] <= 1 and parity["pixels"] == 2 * 40 * 32


def _keys(tree) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | {key for value in tree.values() for key in _keys(value)}
    return {key for value in tree for key in _keys(value)} if isinstance(tree, list) else set()


def test_no_targets_are_graded(tiny_run):
    stdout, result = tiny_run
    graded = {key for key in _keys({k: v for k, v in result.items() if k != "config"})
              if any(word in key.lower() for word in ("check", "target", "pass"))}
    assert not graded and "PASS" not in stdout and "FAIL" not in stdout and "target" not in stdout.lower()


def test_the_report_prints_one_table_and_the_other_parts(tiny_run):
    stdout, result = tiny_run
    rows = [line for line in stdout.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| mode | train img/s min/med/max | +data img/s med | eval img/s min/med/max")
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| fp32", "| bf16"]
    auto = result["settings"]["auto_mode"]
    for mode, row in result["modes"].items():   # +data: only the fast mode (auto: bf16, or fp32 on AVX2 only)
        train, data = row["train"]["images_per_s"], (row.get("train_with_data") or {}).get("images_per_s")
        column = f"{data['median']:.2f}" if mode == auto else "-"
        assert f"| {mode} | {train['min']:.2f} / {train['median']:.2f} / {train['max']:.2f} | {column} |" in stdout
    assert f"auto: {auto} ({resolve_precision('auto', 'cpu').reason})" in stdout
    assert "auto train: " in stdout and "% of the fastest mode" in stdout
    assert "parity: loss after 2 steps fp32" in stdout and "of 2,560 pixels identical" in stdout
    assert "data loader: 0 worker(s):" in stdout and "FLOPs of a training step" in stdout


def test_a_bad_mode_is_one_error_line_and_exit_2(capsys):
    assert main(["--modes", "fp32,bf17"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --modes: mode 'bf17'")
