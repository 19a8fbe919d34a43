"""Smoke test of the benchmark harness (benchmarks/run.py): a tiny run end to end, JSON checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.tiny import write_tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
    config = write_tiny_config(tmp_path, tmp_path / "cache")
    out = tmp_path / "bench.json"
    # batch 2: training BatchNorm (ASPP image pooling) needs more than one value per channel
    cmd = [sys.executable, "-m", "benchmarks.run", "-c", str(config), "--backbone", "18", "--crop", "32",
           "--batch", "2", "--warmup", "1", "--steps", "1", "--eval-size", "40x32", "--eval-images", "1",
           "--modes", "fp32,bf16", "--fast-mode", "bf16", "--parity-steps", "1", "--data-batches", "2",
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
    assert set(result["modes"]) == {"fp32", "bf16"}
    for name, row in result["modes"].items():
        assert row["status"] == "ok", (name, row)
        for part in ("train", "eval"):
            rates = row[part]["images_per_s"]
            assert 0 < rates["min"] <= rates["median"] <= rates["max"], (name, part, rates)
            assert row["memory"][part]["peak_bytes"] > 0
        assert row["train"]["achieved_tflops"] > 0
        assert row["speedup_vs_fp32"]["train"] > 0
    assert result["modes"]["bf16"]["train_with_data"]["images_per_s"]["median"] > 0  # the fast mode's data-included run
    loader = result["data_loader"]["results"]
    assert loader[0]["workers"] == 0 and loader[0]["images_per_s"] > 0
    parity = result["parity"]
    assert parity["loss_reference"] > 0 and parity["loss_fast"] > 0 and parity["loss_rel_diff"] >= 0
    assert 0 <= parity["eval_agreement"]["identical_fraction"] <= 1 and parity["eval_agreement"]["pixels"] == 40 * 32
