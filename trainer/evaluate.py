"""Evaluation: calibrated nearest-prototype predictions over a loader, one confusion matrix per sigma."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from data_loader.classes import ClassSplit
from model.inference import AUSUC_GRID
from model.metric import Evaluator
from model.predictor import Predictor
from trainer.reporting import Reporter
from trainer.sweep import summarize
from utils.distributed import all_reduce_sum
from utils.logger import progress_enabled
from utils.settings import Settings
from utils.signals import StopSignals


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


@torch.inference_mode()
def evaluate(predictor: Predictor, loader, num_classes: int, seen: Sequence[int], unseen: Sequence[int], *,
             device: torch.device, keep_samples: int = 0, extremes: bool = False,
             on_prediction: Callable[[str, torch.Tensor], None] | None = None,
             stop: StopSignals | None = None, desc: str = "eval") -> EvalResult:
    """Segment every image of ``loader`` (each at its own size, through ``predictor``) and
    accumulate one confusion matrix per sigma of the predictor.

    Distances are computed once per image; every sigma reuses them. With ``extremes`` two more
    matrices hold the sweep's ends (seen-only and unseen-only predictions) and one per
    ``AUSUC_GRID`` value of calibrated stacking. ``on_prediction(name, labels)`` receives each
    image's labels at the first sigma. ``stop``: checked before every batch (raises
    :class:`utils.errors.Interrupted` when a signal arrived). In a distributed run each process
    evaluates its own shard and the matrices are summed.
    """
    sigmas = predictor.sigma_list

    def evaluator() -> Evaluator:
        return Evaluator(num_classes, seen, unseen, device=device)
    evaluators = [evaluator() for _ in sigmas]
    ends = {name: evaluator() for name in ("seen_only", "unseen_only")} if extremes else {}
    stacking = [evaluator() for _ in AUSUC_GRID] if extremes else []
    samples: list[dict] = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress_enabled()):
        if stop is not None:
            stop.check()
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        sizes = batch.get("size") or [tuple(images.shape[-2:])] * images.shape[0]
        preds = torch.zeros(len(sigmas), *labels.shape, dtype=torch.long, device=device)
        for indices, (height, width) in same_size_groups(sizes):
            group = images[indices, :, :height, :width] if len(indices) < len(images) or (
                (height, width) != tuple(images.shape[-2:])) else images
            truth = labels[indices, :height, :width]
            for band in predictor.bands(group):
                band_truth = truth[:, band.rows]
                preds[:, indices, band.rows.start:band.rows.stop, :width] = band.labels
                for ev, pred in zip(evaluators, band.labels):
                    ev.add_batch(band_truth, pred)
                if extremes:   # excluded classes are at infinite distance already
                    nearest = predictor.nearest_groups(band.distances)
                    ends["seen_only"].add_batch(band_truth, nearest.seen_arg)
                    ends["unseen_only"].add_batch(band_truth, nearest.unseen_arg)
                    for ev, sigma in zip(stacking, AUSUC_GRID):
                        ev.add_batch(band_truth, nearest.stacked(sigma))
            if on_prediction is not None:
                for index in indices:
                    on_prediction(batch["name"][index], preds[0, index, :height, :width].cpu())
        if len(samples) < keep_samples:
            for i in range(min(keep_samples - len(samples), images.shape[0])):
                height, width = sizes[i]
                samples.append({"image": images[i, :, :height, :width].float().cpu(),
                                "label": labels[i, :height, :width].cpu(), "pred": preds[:, i, :height, :width].cpu()})
    for ev in [*evaluators, *ends.values(), *stacking]:
        all_reduce_sum(ev.confusion_matrix)
    return EvalResult(sigmas, evaluators, samples, ends, stacking)


def same_size_groups(sizes: Sequence[tuple[int, int]]) -> list[tuple[list[int], tuple[int, int]]]:
    """Indices of a padded batch grouped by the images' own sizes (in order of appearance), so
    each image is segmented at its own size whatever else shares its batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault((int(size[0]), int(size[1])), []).append(index)
    return [(indices, size) for size, indices in groups.items()]


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


@dataclass
class Validation:
    """What every validation of a run shares: the encoders, class split and embeddings, the
    run's settings (inference section, resolved precision, memory format), the reporter."""

    model: torch.nn.Module
    semantic_encoder: torch.nn.Module
    split: ClassSplit
    embeddings: torch.Tensor
    settings: Settings
    reporter: Reporter
    device: torch.device

    def predictor(self) -> Predictor:
        """The predictor of the current weights (prototypes recomputed: the semantic encoder trains)."""
        self.model.eval()
        return Predictor.from_settings(self.model, self.semantic_encoder, self.embeddings, self.settings,
                                       self.split.unseen, self.split.never_predicted)


def validate(run: Validation, loader, *, epoch: int, split_name: str, stop: StopSignals | None = None) -> dict:
    """Evaluate at every configured sigma, report, and return the headline record (percent
    values): at ``inference.sigma``, or at the best harmonic mIoU of a sweep given as
    ``inference.sigma``; with a sweep it also holds ``ausuc`` and ``best_sigma``. The test split
    writes each predicted mask when ``inference.save_predictions`` is set."""
    inference, split, reporter = run.settings.inference, run.split, run.reporter
    excluded = list(split.never_predicted)
    save_predictions = split_name == "test" and inference.save_predictions
    result = evaluate(run.predictor(), loader, split.num_classes, [c for c in split.seen if c not in excluded],
                      split.unseen, device=run.device,
                      keep_samples=run.settings.trainer.tensorboard_images if reporter.wants_images else 0,
                      extremes=bool(inference.sweep), desc=split_name,
                      on_prediction=reporter.prediction_writer(split_name) if save_predictions else None, stop=stop)
    records = [metrics_record(ev, split.names, s) for ev, s in zip(result.evaluators, result.sigmas)]
    summary = None
    if inference.sweep:
        ends = {name: metrics_record(ev, split.names, float("nan")) for name, ev in result.extremes.items()}
        stacking = [metrics_record(ev, split.names, s) for ev, s in zip(result.stacking, AUSUC_GRID)]
        summary = summarize(records, ends, stacking, inference.calibration)
    main = records[0] if inference.sigma is not None else next(
        r for r in records if r["sigma"] == summary["best"]["sigma"])
    if summary is not None:
        main = {**main, "ausuc": summary["ausuc"], "best_sigma": summary["best"]["sigma"]}
    reporter.evaluation(epoch, split_name, main, records, summary, result.samples)
    return {k: v for k, v in main.items() if isinstance(v, float) or v is None}
