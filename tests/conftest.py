"""Shared test setup: repo root on sys.path, CPU threads, the ../shared folder."""
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def shared_dir() -> Path:
    """The ../shared folder with the reference fixtures and published embeddings."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: reference fixtures and published embeddings unavailable")
    return SHARED


@dataclass(frozen=True)
class TrainedTiny:
    """One trained tiny run shared by the tests that only read it (3 epochs, TensorBoard on,
    ``"amp": "auto"`` as the shipped configs)."""

    tmp: Path          # its folder (config.json, the synthetic cache, saved/)
    config: Path
    cache: Path
    run_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "model_best.pth"


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> TrainedTiny:
    from tests.tiny import write_tiny_config
    from trainer.cli import main
    tmp = tmp_path_factory.mktemp("trained_tiny")
    config = write_tiny_config(tmp, tmp / "cache", trainer__epochs=3, trainer__tensorboard=True, trainer__amp="auto")
    assert main(default_config=None, argv=["-c", str(config), "--run_id", "r1", "-d", "cpu"]) == 0
    return TrainedTiny(tmp, config, tmp / "cache", tmp / "saved" / "tiny" / "r1")
