"""Smoke test of the benchmark harness (benchmarks/run.py): a tiny run end to end, JSON checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.run import checks
from tests.tiny import write_tiny_config
from utils.amp import resolve_precision

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
    config = write_tiny_config(tmp_path, tmp_path / "cache")
    out = tmp_path / "bench.json"
    # batch 2: training BatchNorm (ASPP image pooling) needs more than one value per channel
    cmd = [sys.executable, "-m", "benchmarks.run", "-c", str(config), "--backbone", "18", "--crop", "32",
           "--batch", "2", "--warmup", "1", "--steps", "1", "--eval-size", "40x32", "--eval-images", "1",
           "--modes", "fp32,bf16,auto", "--parity-steps", "1", "--data-batches", "2",
           "--workers", "0", "--threads", "1", "--in-process", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train img/s" in proc.stdout and "parity:" in proc.stdout

    result = json.loads(out.read_text())
    for key in ("environment", "settings", "modes", "flops", "data_loader", "parity", "checks"):
        assert key in result, key
    assert result["environment"]["cpu"]["model"]
    assert result["flops"]["train_step"] > 0 and result["flops"]["eval_batch"] > 0
    auto = result["settings"]["auto_mode"]                 # fp32 (+cl in no config here) or bf16
    assert auto == resolve_precision("auto", "cpu").name and result["settings"]["fast_mode"] == auto
    assert f"auto: {auto} (auto: " in proc.stdout
    assert set(result["modes"]) == {"fp32", "bf16"}                    # auto is measured once, as its mode
    assert {c["check"] for c in result["checks"]} >= {"auto_train", "auto_eval"}
    for name, row in result["modes"].items():
        assert row["status"] == "ok", (name, row)
        for part in ("train", "eval"):
            rates = row[part]["images_per_s"]
            assert 0 < rates["min"] <= rates["median"] <= rates["max"], (name, part, rates)
            assert row["memory"][part]["peak_bytes"] > 0
        assert row["train"]["achieved_tflops"] > 0
        assert row["speedup_vs_fp32"]["train"] > 0
    assert result["modes"][auto]["train_with_data"]["images_per_s"]["median"] > 0  # the fast mode's data-included run
    loader = result["data_loader"]["results"]
    assert loader[0]["workers"] == 0 and loader[0]["images_per_s"] > 0
    parity = result["parity"]
    assert parity["loss_reference"] > 0 and parity["loss_fast"] > 0 and parity["loss_rel_diff"] >= 0
    assert 0 <= parity["eval_agreement"]["identical_fraction"] <= 1 and parity["eval_agreement"]["pixels"] == 40 * 32


def _results(auto: str, train: dict[str, float], evaluation: dict[str, float]) -> dict:
    median = lambda v: {"images_per_s": {"min": v, "median": v, "max": v}}   # noqa: E731
    return {"settings": {"auto_mode": auto, "fast_mode": auto, "device": "cpu", "eval_batch": 1, "workers": 0},
            "environment": {"cpu": {"amx_bf16": False}},
            "modes": {name: {"train": median(train[name]), "eval": median(evaluation[name])} for name in train}}


def test_auto_target_is_within_5_percent_of_the_fastest_mode():
    fast = {c["check"]: c for c in checks(_results("fp32+cl", {"fp32": 24.0, "fp32+cl": 26.0, "bf16+cl": 2.0},
                                                   {"fp32": 68.0, "fp32+cl": 85.0, "bf16+cl": 16.0}))}
    assert fast["auto_train"]["pass"] and fast["auto_train"]["value"] == 1.0 and fast["auto_eval"]["pass"]
    near = {c["check"]: c for c in checks(_results("fp32+cl", {"fp32": 27.0, "fp32+cl": 26.0},
                                                   {"fp32": 80.0, "fp32+cl": 85.0}))}
    assert near["auto_train"]["pass"] and abs(near["auto_train"]["value"] - 26 / 27) < 1e-9   # 3.7% behind
    slow = {c["check"]: c for c in checks(_results("bf16+cl", {"fp32": 24.0, "bf16+cl": 2.0},
                                                   {"fp32": 68.0, "bf16+cl": 16.0}))}
    assert not slow["auto_train"]["pass"] and not slow["auto_eval"]["pass"]
    assert "fastest mode (fp32, 24.00)" in slow["auto_train"]["text"]
