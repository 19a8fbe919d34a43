"""Numerical parity with outputs recorded from the official JoEm code."""
import pytest
import torch

from model.loss import bar_loss, ce_loss, joem_loss, sc_loss
from model.metric import Evaluator
from model.predictor import Predictor
from model.semantic_encoder import SemanticEncoder
from utils.parse_config import load_config
from utils.settings import Settings


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


class RecordedFeatures:
    """A visual encoder that returns the features the official test computed."""

    def __init__(self, features):
        self.recorded = features

    def features(self, images):
        return self.recorded


def test_calibrated_prediction_and_metrics_match_official(ref, encoder):
    """The production path (the VOC config's predictor, as --test builds it) on the official features."""
    settings = Settings.from_config(load_config("configs/config_pascal_zs3setting.json"), "voc")
    assert settings.inference.sigmas == [float(ref["sigma"])] and settings.inference.calibration == "top2"
    label = ref["test.label"].long()
    predictor = Predictor.from_settings(RecordedFeatures(ref["test.feature"]), encoder, ref["embeddings"], settings,
                                        ref["unseen"].tolist(), (), amp=False)
    pred = predictor.labels(torch.zeros(label.shape[0], 3, *label.shape[-2:]))[0]
    assert torch.equal(pred, ref["test.pred"])
    evaluator = Evaluator(21, ref["seen"].tolist(), ref["unseen"].tolist())
    evaluator.add_batch(label, pred)
    assert torch.equal(evaluator.confusion_matrix.double(), ref["test.confusion"])
    names = {"Pixel_Accuracy": evaluator.pixel_accuracy(), "Pixel_Accuracy_Class": evaluator.pixel_accuracy_class(),
             "Mean_Intersection_over_Union": evaluator.mean_iou()}
    for metric, values in names.items():
        for group in ("seen", "unseen", "harmonic", "overall"):
            assert abs(values[group] - float(ref[f"test.{metric}_{group}"])) < 1e-6, (metric, group)
