"""DDP on CPU (gloo): two processes equal one process on the combined batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import read_metrics, write_tiny_config

pytestmark = pytest.mark.slow   # torchrun processes: run with `pytest -m slow tests`
ROOT = Path(__file__).resolve().parents[1]
DETERMINISTIC = {  # no random augmentation, dropout or batch statistics: ranks compose exactly
    "data__scale_range": [1.0, 1.0], "data__hflip": False, "data_loader__shuffle": False,
    "model__args__dropout": False, "model__args__freeze_bn": True, "trainer__epochs": 1,
    "model__args__head_init": "kaiming_fan_in",   # the official init diverges at lr 0.1 on the head from scratch
    "trainer__test_after_train": False,
    # SGD: updates are linear in the gradients (Adam would amplify float-rounding noise of near-zero gradients)
    "optimizer": {"type": "SGD", "args": {"lr": 0.01, "momentum": 0.9}, "head_lr_mult": 10},
    "optimizer_gen": {"type": "SGD", "args": {"lr": 0.01}},
}


def _train(config: Path, run_id: str, processes: int) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([*launcher, str(ROOT / "train_pascal_zs3setting.py"), "-c", str(config), "-d", "cpu",
                             "--run_id", run_id], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_two_gloo_processes_match_one_process_on_the_combined_batch(tmp_path):
    config = write_tiny_config(tmp_path, tmp_path / "cache", **DETERMINISTIC)
    _train(config, "single", 1)
    _train(config, "ddp", 2)
    runs = tmp_path / "saved" / "tiny"
    single = torch.load(runs / "single" / "checkpoint-epoch1.pth", weights_only=True)
    ddp = torch.load(runs / "ddp" / "checkpoint-epoch1.pth", weights_only=True)
    # Seven SGD steps of a randomly initialised network amplify float-rounding differences
    # (batch 4 vs 2 x 2 sums, thread counts, kernel choice) to ~1e-4: the tolerance allows that
    # and still catches a wrong gradient average (a factor of 2 on the updates).
    for part in ("visual_encoder", "semantic_encoder"):
        for key, value in single[part].items():
            if value.is_floating_point():
                assert torch.allclose(value, ddp[part][key], rtol=1e-2, atol=1e-4), key
    moved = single["visual_encoder"]["decoder.pred_conv.weight"]
    assert not torch.allclose(moved, torch.zeros_like(moved))
    log = (runs / "ddp" / "train.log").read_text()
    assert "effective batch size: 4 (2 process(es) x 2)" in log
    a, b = read_metrics(runs / "single")[-1], read_metrics(runs / "ddp")[-1]
    assert abs(a["mIoU_harmonic"] - b["mIoU_harmonic"]) < 0.5
