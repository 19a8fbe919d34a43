"""Every seed a run derives from its ``seed``, in one place.

Each epoch's sample order comes from (seed, epoch), each sample's augmentation from (seed, epoch,
sample index) and each process's dropout stream from (seed, epoch, rank), so an epoch can be
resumed at any step and the result does not depend on the number of loader workers.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The global generators' seed for ``epoch`` on process ``rank`` (dropout, the loader's own draws)."""
    return seed * 100003 + epoch * 1009 + rank


def order_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch``'s permutation of the training set (the same on every process)."""
    return seed * 100003 + epoch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch`` (the same whatever the order,
    the worker or the process that loads it)."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2 ** 62)
