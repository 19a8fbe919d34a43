"""Evaluation: calibrated nearest-prototype predictions over a loader, one confusion matrix per sigma,
and a calibration sweep's summary (the seen-unseen mIoU curve and its AUSUC)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from data_loader.classes import ClassSplit
from model.inference import AUSUC_GRID
from model.metric import Evaluator, ausuc
from model.predictor import Predictor
from trainer.reporting import Reporter
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
    """Segment every image of ``loader`` (each at its own size, distances computed once for every
    sigma) and accumulate one confusion matrix per sigma of ``predictor``. ``extremes``: also the
    sweep's ends (seen-only, unseen-only) and one per ``AUSUC_GRID`` value of calibrated stacking.
    ``on_prediction(name, labels)`` receives each image's labels at the first sigma; ``stop`` is
    checked before every batch. Distributed: each process evaluates its shard, the matrices are summed."""
    sigmas = predictor.sigma_list
    evaluator = partial(Evaluator, num_classes, seen, unseen, device=device)
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
        groups: dict[tuple[int, int], list[int]] = {}   # each image is segmented at its own size
        for index, size in enumerate(sizes):
            groups.setdefault((int(size[0]), int(size[1])), []).append(index)
        for (height, width), indices in groups.items():
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


def _row(record: dict, sigma: float | None = None) -> dict:
    row = {"mIoU_seen": record["mIoU_seen"] or 0.0, "mIoU_unseen": record["mIoU_unseen"] or 0.0,
           "mIoU_harmonic": record["mIoU_harmonic"] or 0.0}
    return row if sigma is None else {"sigma": sigma, **row}


def summarize(records: Sequence[dict], ends: dict[str, dict], stacking: Sequence[dict] = (),
              calibration: str = "top2") -> dict:
    """Sweep summary from per-sigma metric records (percent), the two end records and the AUSUC
    grid's calibrated-stacking records (the AUSUC curve)."""
    rows = [_row(r, r["sigma"]) for r in sorted(records, key=lambda r: r["sigma"])]
    best = max(rows, key=lambda r: r["mIoU_harmonic"])
    end_rows = {name: _row(rec) for name, rec in ends.items()}
    curve = [_row(r, r["sigma"]) for r in stacking]
    points = [(r["mIoU_unseen"] / 100, r["mIoU_seen"] / 100) for r in [*curve, *end_rows.values()]]
    return {"calibration": calibration, "rows": rows, "best": best, "ends": end_rows,
            "ausuc": round(ausuc(points), 6), "ausuc_curve": curve}


@dataclass
class Validation:
    """What every validation of a run shares: encoders, class split, embeddings, settings, reporter."""

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


def validate(run: Validation, loader, *, epoch: int, split_name: str, stop: StopSignals | None = None,
             chosen_sigma: float | None = None) -> dict:
    """Evaluate at every configured sigma, report, and return the headline record (percent) at
    ``inference.sigma``. When that lists several sigmas: on the selection split at the sweep's best
    harmonic mIoU (the record adds ``best_sigma``); on the reported split (``"test"``) never at its own
    best, but at ``chosen_sigma`` (the selection's choice) when it was evaluated, else at the first listed.
    A sweep adds ``ausuc``."""
    inference, split, reporter = run.settings.inference, run.split, run.reporter
    save_predictions = split_name == "test" and inference.save_predictions
    seen = [c for c in split.seen if c not in split.never_predicted]
    result = evaluate(run.predictor(), loader, split.num_classes, seen, split.unseen, device=run.device,
                      keep_samples=run.settings.trainer.tensorboard_images if reporter.writer is not None else 0,
                      extremes=bool(inference.sweep), desc=split_name,
                      on_prediction=reporter.prediction_writer(split_name) if save_predictions else None, stop=stop)
    records = [metrics_record(ev, split.names, s) for ev, s in zip(result.evaluators, result.sigmas)]
    summary, main = None, records[0]
    if inference.sweep:
        ends = {name: metrics_record(ev, split.names, float("nan")) for name, ev in result.extremes.items()}
        stacking = [metrics_record(ev, split.names, s) for ev, s in zip(result.stacking, AUSUC_GRID)]
        summary = summarize(records, ends, stacking, inference.calibration)
        best = summary["best"]["sigma"] if split_name != "test" else None
        headline = inference.sigma or best or (chosen_sigma if chosen_sigma in result.sigmas else result.sigmas[0])
        main = {**next(r for r in records if r["sigma"] == headline), "ausuc": summary["ausuc"],
                **({"best_sigma": best} if best is not None else {})}
    reporter.evaluation(epoch, split_name, main, records, summary, result.samples)
    return {k: v for k, v in main.items() if isinstance(v, float) or v is None}
