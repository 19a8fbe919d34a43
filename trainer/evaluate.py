"""Evaluation: calibrated nearest-prototype predictions over a loader, one confusion matrix per sigma."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from data_loader.classes import ClassSplit
from model.inference import AUSUC_GRID, GroupNearest, InferenceSettings, SlidingWindow, calibrate
from model.metric import Evaluator
from model.segment import pixel_distances, same_size_groups
from trainer.reporting import Reporter
from trainer.sweep import summarize
from utils.distributed import all_reduce_sum
from utils.logger import progress_enabled
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
def evaluate(model: torch.nn.Module, semantic_encoder: torch.nn.Module, loader, embeddings: torch.Tensor,
             seen: Sequence[int], unseen: Sequence[int], sigmas: Sequence[float], *, device: torch.device,
             amp: str | bool | None = None, channels_last: bool = False, window: SlidingWindow | None = None,
             keep_samples: int = 0, extremes: bool = False, excluded: Sequence[int] = (),
             calibration: str = "top2", on_prediction: Callable[[str, torch.Tensor], None] | None = None,
             stop: StopSignals | None = None, desc: str = "eval") -> EvalResult:
    """Segment every image of ``loader`` (each at its own size, through
    :func:`model.segment.pixel_distances`) and accumulate one confusion matrix per sigma.

    Distances are computed once per image; every sigma reuses them. With ``extremes`` two more
    matrices hold the sweep's ends (seen-only and unseen-only predictions) and one per
    ``AUSUC_GRID`` value of calibrated stacking. ``excluded`` classes are never predicted
    (background when it is ignored). ``on_prediction(name, labels)`` receives each image's
    labels at the first sigma. ``stop``: checked before every batch (raises
    :class:`utils.signals.Interrupted` when a signal arrived). In a distributed run each process
    evaluates its own shard and the matrices are summed.
    """
    model.eval()
    semantic_encoder.eval()
    num_classes = embeddings.shape[0]
    prototypes = semantic_encoder(embeddings.to(device)).float()
    unseen_mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    unseen_mask[list(unseen)] = True
    sigma_tensor = torch.tensor(list(sigmas), dtype=torch.float32, device=device)

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
            for rows, distances in pixel_distances(model, group, prototypes, amp=amp, channels_last=channels_last,
                                                   window=window, excluded=excluded):
                band_truth = truth[:, rows]
                band_preds = calibrate(distances, unseen_mask, sigma_tensor, calibration)
                preds[:, indices, rows.start:rows.stop, :width] = band_preds
                for ev, pred in zip(evaluators, band_preds):
                    ev.add_batch(band_truth, pred)
                if extremes:   # excluded classes are at infinite distance already
                    nearest = GroupNearest(distances, unseen_mask)
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


def validate(model: torch.nn.Module, semantic_encoder: torch.nn.Module, loader, split: ClassSplit,
             embeddings: torch.Tensor, inference: InferenceSettings, reporter: Reporter, *, epoch: int,
             split_name: str, device: torch.device, amp: str | bool | None = None, channels_last: bool = False,
             keep_samples: int = 0, save_predictions: bool = False, stop: StopSignals | None = None) -> dict:
    """Evaluate at every configured sigma, report, and return the headline record (percent
    values): at ``inference.sigma``, or at the best harmonic mIoU of a sweep given as
    ``inference.sigma``; with a sweep it also holds ``ausuc`` and ``best_sigma``."""
    excluded = list(split.never_predicted)
    result = evaluate(model, semantic_encoder, loader, embeddings, [c for c in split.seen if c not in excluded],
                      split.unseen, inference.sigmas, device=device, amp=amp, channels_last=channels_last,
                      window=inference.window, keep_samples=keep_samples, extremes=bool(inference.sweep),
                      excluded=excluded, calibration=inference.calibration, desc=split_name,
                      on_prediction=reporter.prediction_writer(split_name) if save_predictions else None,
                      stop=stop)
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
