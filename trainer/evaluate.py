"""Evaluation: prototypes from the semantic encoder, calibrated nearest prototype, metrics."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm import tqdm

from model.inference import calibrate, restricted_nearest, stacked_nearest, upsampled_squared_distances
from model.metric import Evaluator
from utils.amp import autocast_context
from utils.distributed import all_reduce_sum
from utils.logger import progress_enabled


@dataclass
class EvalResult:
    """Confusion matrices for each sigma, plus a few samples for visualisation."""

    sigmas: list[float]
    evaluators: list[Evaluator]
    samples: list[dict] = field(default_factory=list)
    # sweep ends: every pixel to its nearest seen class / nearest unseen class
    extremes: dict[str, Evaluator] = field(default_factory=dict)
    # calibrated stacking over AUSUC_GRID (for the AUSUC curve)
    stacking: list[Evaluator] = field(default_factory=list)


# Fixed log-spaced grid (1e-3 .. 1e3) so AUSUC is comparable across models and sweeps.
AUSUC_GRID = [10 ** (k / 8) for k in range(-24, 25)]


def batch_distances(features_fn, images: torch.Tensor, size: Sequence[int], prototypes: torch.Tensor,
                    amp: str | bool | None = None, channels_last: bool = False) -> torch.Tensor:
    """Squared distances N x K x H x W of a batch's full-resolution pixels to the prototypes:
    ``features_fn`` (the visual encoder's ``features``) under autocast, upsampled to ``size``."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_context(images.device, amp):
        features = features_fn(images)
    return upsampled_squared_distances(features, prototypes, tuple(size))


@torch.inference_mode()
def evaluate(model: torch.nn.Module, semantic_encoder: torch.nn.Module, loader, embeddings: torch.Tensor,
             seen: Sequence[int], unseen: Sequence[int], sigmas: Sequence[float], *, device: torch.device,
             amp: str | bool | None = None, channels_last: bool = False, keep_samples: int = 0,
             extremes: bool = False, excluded: Sequence[int] = (), calibration: str = "top2",
             desc: str = "eval") -> EvalResult:
    """Run the visual encoder over ``loader`` and accumulate one confusion matrix per sigma.

    Features and distances are computed once per batch; every sigma reuses them. With
    ``extremes`` two more matrices hold the sweep's ends (seen-only and unseen-only
    predictions) and one per ``AUSUC_GRID`` value of calibrated stacking. ``excluded`` classes are never predicted (background when it is ignored).
    In a distributed run each process evaluates its own shard and the matrices are summed.
    """
    model.eval()
    semantic_encoder.eval()
    num_classes = embeddings.shape[0]
    prototypes = semantic_encoder(embeddings.to(device)).float()
    unseen_mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    unseen_mask[list(unseen)] = True
    allowed = torch.ones(num_classes, dtype=torch.bool, device=device)
    allowed[list(excluded)] = False
    sigma_tensor = torch.tensor(list(sigmas), dtype=torch.float32, device=device)
    evaluators = [Evaluator(num_classes, seen, unseen, device=device) for _ in sigmas]
    ends = {name: Evaluator(num_classes, seen, unseen, device=device) for name in ("seen_only", "unseen_only")
            } if extremes else {}
    stacking = [Evaluator(num_classes, seen, unseen, device=device) for _ in AUSUC_GRID] if extremes else []
    samples: list[dict] = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress_enabled()):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        distances = batch_distances(model.features, images, labels.shape[-2:], prototypes, amp, channels_last)
        if excluded:
            distances.masked_fill_(~allowed[None, :, None, None], float("inf"))
        preds = calibrate(distances, unseen_mask, sigma_tensor, calibration)
        for evaluator, pred in zip(evaluators, preds):
            evaluator.add_batch(labels, pred)
        for name, evaluator in ends.items():
            group = ~unseen_mask if name == "seen_only" else unseen_mask
            evaluator.add_batch(labels, restricted_nearest(distances, group & allowed))
        for evaluator, sigma in zip(stacking, AUSUC_GRID):
            evaluator.add_batch(labels, stacked_nearest(distances, unseen_mask, sigma))
        if len(samples) < keep_samples:
            for i in range(min(keep_samples - len(samples), images.shape[0])):
                samples.append({"image": images[i].float().cpu(), "label": labels[i].cpu(),
                                "pred": preds[:, i].cpu()})
    for evaluator in [*evaluators, *ends.values(), *stacking]:
        all_reduce_sum(evaluator.confusion_matrix)
    return EvalResult(list(map(float, sigmas)), evaluators, samples, ends, stacking)


def _pct(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(100.0 * value, 4)


def metrics_record(evaluator: Evaluator, class_names: Sequence[str], sigma: float) -> dict:
    """Flat metric record in percent (NaN -> None), with per-class IoU by class name."""
    record: dict = {"sigma": sigma}
    for prefix, values in (("mIoU", evaluator.mean_iou()), ("pixel_acc", evaluator.pixel_accuracy()),
                           ("class_acc", evaluator.pixel_accuracy_class())):
        for group in ("seen", "unseen", "harmonic", "overall"):
            record[f"{prefix}_{group}"] = _pct(values[group])
    record["iou_by_class"] = {name: _pct(v) for name, v in zip(class_names, evaluator.mean_iou()["by_class"])}
    return record


def format_metrics_table(record: dict) -> str:
    """Three-line summary: pixel acc, class acc and mIoU for seen / unseen / harmonic / overall."""
    def fmt(v):
        return "   n/a" if v is None else f"{v:6.2f}"
    rows = [f"{'':10s} {'seen':>6s} {'unseen':>6s} {'harm.':>6s} {'all':>6s}"]
    for label, prefix in (("pixel acc", "pixel_acc"), ("class acc", "class_acc"), ("mIoU", "mIoU")):
        rows.append(f"{label:10s} " + " ".join(fmt(record[f'{prefix}_{g}'])
                                              for g in ("seen", "unseen", "harmonic", "overall")))
    return "\n".join(rows)


def format_class_table(record: dict, unseen_names: Sequence[str]) -> str:
    """Per-class IoU table, unseen classes marked with '*'."""
    lines = ["class                    IoU"]
    for name, value in record["iou_by_class"].items():
        mark = "*" if name in unseen_names else " "
        lines.append(f"{mark}{name:22s} {'n/a' if value is None else f'{value:6.2f}'}")
    lines.append("(* = unseen class)")
    return "\n".join(lines)
