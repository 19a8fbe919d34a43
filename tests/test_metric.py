"""Evaluator: confusion matrix and official metric definitions, edge cases."""
import math

import torch

from model.metric import Evaluator, harmonic_mean


def test_confusion_matrix_ignores_out_of_range_labels():
    ev = Evaluator(3, seen=[0, 1], unseen=[2])
    gt = torch.tensor([[0, 1, 2, 255, -1, 2]])
    pred = torch.tensor([[0, 2, 2, 1, 1, 0]])
    ev.add_batch(gt, pred)
    expected = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 1]])
    assert torch.equal(ev.confusion_matrix, expected)
    ev.add_batch(gt, pred)
    assert torch.equal(ev.confusion_matrix, 2 * expected)
    ev.reset()
    assert ev.confusion_matrix.sum() == 0


def test_metrics_by_hand():
    ev = Evaluator(3, seen=[0, 1], unseen=[2])
    ev.add_batch(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 0, 2, 1]))
    pa = ev.pixel_accuracy()
    assert pa["overall"] == 4 / 6 and pa["seen"] == 3 / 4 and pa["unseen"] == 1 / 2
    assert math.isclose(pa["harmonic"], 2 * 0.75 * 0.5 / 1.25)
    pac = ev.pixel_accuracy_class()
    assert pac["by_class"] == [1.0, 0.5, 0.5]
    assert math.isclose(pac["seen"], 0.75) and math.isclose(pac["overall"], 2 / 3)
    miou = ev.mean_iou()
    # class 0: tp 2, fp 1, fn 0 -> 2/3; class 1: tp 1, fp 1, fn 1 -> 1/3; class 2: tp 1, fn 1 -> 1/2
    assert [round(v, 6) for v in miou["by_class"]] == [round(2 / 3, 6), round(1 / 3, 6), 0.5]
    assert math.isclose(miou["seen"], 0.5) and math.isclose(miou["unseen"], 0.5)
    assert math.isclose(miou["harmonic"], 0.5)


def test_absent_classes_count_as_zero_like_official():
    ev = Evaluator(4, seen=[0, 1, 3], unseen=[2])
    ev.add_batch(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))  # class 3 absent everywhere
    miou = ev.mean_iou()
    assert miou["by_class"] == [1.0, 1.0, 1.0, 0.0]
    assert math.isclose(miou["seen"], 2 / 3) and math.isclose(miou["overall"], 0.75)
    assert ev.pixel_accuracy_class()["by_class"][3] == 0.0


def test_empty_groups_and_zero_harmonic():
    ev = Evaluator(3)
    ev.add_batch(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    miou = ev.mean_iou()
    assert math.isnan(miou["seen"]) and math.isnan(miou["unseen"]) and math.isnan(miou["harmonic"])
    assert math.isclose(miou["overall"], (1 + 0.5 + 0) / 3)
    only_seen = Evaluator(3, seen=[0, 1, 2], unseen=[])
    only_seen.add_batch(torch.tensor([0]), torch.tensor([0]))
    assert only_seen.pixel_accuracy()["seen"] == 1.0 and math.isnan(only_seen.pixel_accuracy()["unseen"])
    zero = Evaluator(2, seen=[0], unseen=[1])
    zero.add_batch(torch.tensor([0, 1]), torch.tensor([1, 0]))
    assert zero.mean_iou()["harmonic"] == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_large_batch_counts_match_python_loop():
    torch.manual_seed(0)
    gt = torch.randint(0, 6, (3, 40, 50))
    gt[0, :5] = 255
    pred = torch.randint(0, 5, (3, 40, 50))
    ev = Evaluator(5, seen=[0, 1, 2], unseen=[3, 4])
    ev.add_batch(gt, pred)
    expected = torch.zeros(5, 5, dtype=torch.long)
    for g, p in zip(gt.flatten().tolist(), pred.flatten().tolist()):
        if 0 <= g < 5:
            expected[g, p] += 1
    assert torch.equal(ev.confusion_matrix, expected)
