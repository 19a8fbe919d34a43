"""Confusion-matrix metrics for generalized zero-shot segmentation (official definitions)."""
from __future__ import annotations

from typing import Sequence

import torch


def ausuc(points: Sequence[tuple[float, float]]) -> float:
    """Area under the seen-unseen curve (Chao et al., 2016): ``points`` are (unseen, seen)
    pairs in [0, 1]. Sorted by unseen and integrated with the trapezoid rule over their upper
    envelope (the best seen score reachable with at least that unseen score): mIoU curves
    need not be monotone near the ends, and the envelope equals the curve where it is."""
    ordered = sorted(points)
    envelope, best = [], 0.0
    for unseen, seen in reversed(ordered):
        best = max(best, seen)
        envelope.append((unseen, best))
    envelope.reverse()
    return sum((u1 - u0) * (s0 + s1) / 2 for (u0, s0), (u1, s1) in zip(envelope, envelope[1:]))


def harmonic_mean(seen: float, unseen: float) -> float:
    """2su / (s + u); 0 when both are 0, NaN when either is NaN."""
    total = seen + unseen
    return 2 * seen * unseen / total if total != 0 else 0.0 * total


class Evaluator:
    """Accumulates a confusion matrix (rows = ground truth) on the tensors' device.

    Every metric returns ``{"overall", "seen", "unseen", "harmonic"}`` (plus ``"by_class"``
    for per-class metrics) as Python floats in [0, 1]. As in the official code, a per-class
    score that is NaN (class absent from ground truth and prediction) counts as 0 before
    averaging, and "seen" includes background. A group whose class list is empty is NaN.
    """

    def __init__(self, num_classes: int, seen: Sequence[int] = (), unseen: Sequence[int] = (),
                 device: torch.device | str | None = None):
        self.num_classes = int(num_classes)
        self.seen = torch.as_tensor(list(seen), dtype=torch.long)
        self.unseen = torch.as_tensor(list(unseen), dtype=torch.long)
        self.confusion_matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.confusion_matrix.zero_()

    def add_batch(self, gt: torch.Tensor, pred: torch.Tensor) -> None:
        """Add predictions; ground-truth labels outside ``0..num_classes-1`` are ignored."""
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth shape {tuple(gt.shape)} != prediction shape {tuple(pred.shape)}")
        if self.confusion_matrix.device != gt.device:
            self.confusion_matrix = self.confusion_matrix.to(gt.device)
        gt = gt.long()
        valid = (gt >= 0) & (gt < self.num_classes)
        index = self.num_classes * gt[valid] + pred.long()[valid]
        counts = torch.bincount(index, minlength=self.num_classes ** 2)
        self.confusion_matrix += counts.view(self.num_classes, self.num_classes)

    # --- official metrics -------------------------------------------------------------
    def _groups(self, per_class: torch.Tensor | None, ratio) -> dict:
        def group(ids: torch.Tensor) -> float:
            if ids.numel() == 0:
                return float("nan")
            return float(per_class[ids].mean()) if per_class is not None else ratio(ids)
        seen, unseen = group(self.seen), group(self.unseen)
        overall = float(per_class.mean()) if per_class is not None else ratio(None)
        return {"overall": overall, "seen": seen, "unseen": unseen, "harmonic": harmonic_mean(seen, unseen)}

    def pixel_accuracy(self) -> dict:
        """Correct pixels / labelled pixels, over all, seen-row and unseen-row pixels."""
        cm = self.confusion_matrix.double().cpu()
        diag = cm.diag()

        def ratio(ids):
            if ids is None:
                return float(diag.sum() / cm.sum())
            return float(diag[ids].sum() / cm[ids].sum())
        return self._groups(None, ratio)

    def pixel_accuracy_class(self) -> dict:
        """Mean per-class recall (NaN -> 0)."""
        cm = self.confusion_matrix.double().cpu()
        per_class = torch.nan_to_num(cm.diag() / cm.sum(1))
        return {**self._groups(per_class, None), "by_class": per_class.tolist()}

    def mean_iou(self) -> dict:
        """Mean per-class IoU (NaN -> 0)."""
        cm = self.confusion_matrix.double().cpu()
        diag = cm.diag()
        per_class = torch.nan_to_num(diag / (cm.sum(0) + cm.sum(1) - diag))
        return {**self._groups(per_class, None), "by_class": per_class.tolist()}
