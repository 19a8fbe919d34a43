"""Numerical parity with outputs recorded from the official JoEm code."""
import pytest
import torch

from model.inference import calibrated_nearest_prototype
from model.loss import bar_loss, ce_loss, joem_loss, sc_loss
from model.metric import Evaluator
from model.semantic_encoder import SemanticEncoder


@pytest.fixture
def ref(shared_dir):
    return torch.load(shared_dir / "reference" / "joem_parity_seed0.pt", weights_only=True)


@pytest.fixture
def encoder(ref):
    enc = SemanticEncoder(300, 256, hidden_size=0)
    enc.load_state_dict({"model.weight": ref["semantic_encoder.weight"], "model.bias": ref["semantic_encoder.bias"]})
    return enc


def _rel(a, b):
    a, b = float(torch.as_tensor(a).detach()), float(b)
    return abs(a - b) / max(abs(b), 1e-12)


def test_training_losses_match_official(ref, encoder):
    labels = ref["train.label"].long()
    seen_objects = ref["seen"][ref["seen"] != 0]
    losses = joem_loss(ref["train.logit"], ref["train.feature"], labels, ref["embeddings"], encoder, seen_objects,
                       ratio=float(ref["ratio"]), temperature=float(ref["temperature"]), alpha=float(ref["alpha"]))
    for name in ("ce", "bar", "sc", "total"):
        assert _rel(losses[name], ref[f"train.loss_{name}"]) < 1e-5, name
    assert _rel(ce_loss(ref["train.logit"], labels), ref["train.loss_ce"]) < 1e-5
    assert _rel(bar_loss(ref["train.feature"], labels, ref["embeddings"], encoder, 0.25), ref["train.loss_bar"]) < 1e-5
    assert _rel(sc_loss(ref["embeddings"], encoder, seen_objects, 5.0), ref["train.loss_sc"]) < 1e-5


def test_calibrated_prediction_and_metrics_match_official(ref, encoder):
    unseen_mask = torch.zeros(21, dtype=torch.bool)
    unseen_mask[ref["unseen"]] = True
    with torch.no_grad():
        prototypes = encoder(ref["embeddings"])
    label = ref["test.label"].long()
    pred = calibrated_nearest_prototype(ref["test.feature"], prototypes, unseen_mask, float(ref["sigma"]),
                                        size=label.shape[-2:])
    assert torch.equal(pred, ref["test.pred"])
    evaluator = Evaluator(21, ref["seen"].tolist(), ref["unseen"].tolist())
    evaluator.add_batch(label, pred)
    assert torch.equal(evaluator.confusion_matrix.double(), ref["test.confusion"])
    names = {"Pixel_Accuracy": evaluator.pixel_accuracy(), "Pixel_Accuracy_Class": evaluator.pixel_accuracy_class(),
             "Mean_Intersection_over_Union": evaluator.mean_iou()}
    for metric, values in names.items():
        for group in ("seen", "unseen", "harmonic", "overall"):
            assert abs(values[group] - float(ref[f"test.{metric}_{group}"])) < 1e-6, (metric, group)
