"""Calibration sweep helpers: sigma grids, AUSUC, calibrated stacking limits."""
import math

import pytest
import torch

from model.inference import GroupNearest
from model.metric import ausuc
from trainer.evaluate import summarize
from utils.errors import ConfigError
from utils.schema import sigma_values


def test_sigma_values_forms():
    assert sigma_values(0.5) == [0.5]
    assert sigma_values("0.3,0.5,0.7") == [0.3, 0.5, 0.7]
    grid = sigma_values({"log_range": [0.1, 10], "num": 3})
    assert grid == [0.1, 1.0, 10.0]
    for bad in ("a,b", [0.5, -1], {"log_range": [1, 0.5]}, True):
        with pytest.raises(ConfigError):
            sigma_values(bad)


def test_ausuc_trapezoid_and_envelope():
    assert ausuc([(0, 1), (1, 0)]) == 0.5
    assert math.isclose(ausuc([(0, 0.8), (0.5, 0.5), (1, 0)]), 0.325 + 0.125)
    # a point that falls back below the curve does not lower the area (upper envelope)
    assert math.isclose(ausuc([(0, 0.8), (0.1, 0.0), (0.2, 0.9)]), 0.18)


def _masked_argmin(distances, allowed):
    return distances.masked_fill(~allowed[None, :, None, None], float("inf")).argmin(1)


def test_stacking_limits_are_the_sweep_ends():
    torch.manual_seed(0)
    distances = torch.rand(2, 5, 4, 6)
    unseen = torch.tensor([False, False, True, False, True])
    nearest = GroupNearest(distances, unseen)
    assert torch.equal(nearest.unseen_arg, _masked_argmin(distances, unseen))
    assert torch.equal(nearest.seen_arg, _masked_argmin(distances, ~unseen))
    assert torch.equal(nearest.stacked(1e-9), nearest.unseen_arg)
    assert torch.equal(nearest.stacked(1e9), nearest.seen_arg)
    assert torch.equal(nearest.stacked(1.0), distances.argmin(1))


def test_stacking_from_group_minima_equals_argmin_of_scaled_distances():
    """The reference: argmin over all classes of the distances with unseen ones scaled (ties
    included: quantised distances make many, and argmin takes the lower index)."""
    torch.manual_seed(1)
    distances = torch.randint(0, 6, (3, 7, 9, 11)).float()
    unseen = torch.tensor([False, True, False, False, True, False, True])
    nearest = GroupNearest(distances, unseen)
    for sigma in (0.25, 0.5, 1.0, 2.0, 4.0):
        scale = torch.where(unseen, sigma, 1.0)
        assert torch.equal(nearest.stacked(sigma), (distances * scale[None, :, None, None]).argmin(1)), sigma


def test_summarize_picks_best_harmonic():
    records = [{"sigma": s, "mIoU_seen": a, "mIoU_unseen": b, "mIoU_harmonic": h}
               for s, a, b, h in [(0.5, 70.0, 40.0, 50.9), (1.0, 75.0, 20.0, 31.6)]]
    ends = {"seen_only": {"mIoU_seen": 76.0, "mIoU_unseen": 0.0, "mIoU_harmonic": 0.0},
            "unseen_only": {"mIoU_seen": 0.0, "mIoU_unseen": 10.0, "mIoU_harmonic": 0.0}}
    summary = summarize(records, ends, records)
    assert summary["best"]["sigma"] == 0.5
    assert math.isclose(summary["ausuc"], ausuc([(0.4, 0.7), (0.2, 0.75), (0.0, 0.76), (0.1, 0.0)]), abs_tol=1e-6)


def test_all_class_calibration_lets_a_third_ranked_unseen_class_win():
    from model.inference import calibrate
    distances = torch.tensor([1.0, 1.5, 2.0]).view(1, 3, 1, 1)  # class 2 (unseen) ranks third
    unseen = torch.tensor([False, False, True])
    assert calibrate(distances, unseen, 0.25).item() == 0           # official top-2: cannot win
    assert calibrate(distances, unseen, 0.25, mode="all").item() == 2
    stacked = calibrate(distances, unseen, torch.tensor([0.25, 1.0]), mode="all")
    assert stacked.flatten().tolist() == [2, 0]
