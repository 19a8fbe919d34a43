"""Shared test setup: repo root on sys.path, CPU threads, the ../shared folder."""
import os
import sys
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
