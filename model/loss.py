"""JoEm training losses: CE, boundary-aware regression (BAR) and semantic consistency (SC).

Numerical behaviour follows the official JoEm code (checked against its recorded outputs in
``tests/test_parity.py``); where the paper and the code differ, the code is followed.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.schema import IGNORE_INDEX


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy over *all* classes' logits (official: unseen logits take part too)."""
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def _nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer label map N x H x W."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def bar_target(labels: torch.Tensor, embeddings: torch.Tensor, semantic_encoder: nn.Module,
               size: tuple[int, int], ratio: float, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Boundary-aware target features N x C x h x w for a label map N x H x W.

    The label map is nearest-downsampled to ``ratio`` of ``size``, each cell holds its class
    embedding (zeros for ``ignore_index``), the map is bilinearly upsampled
    (``align_corners=False``, official) to ``size`` and encoded by the semantic encoder.
    For a linear encoder the encoded table is interpolated instead of the raw embeddings:
    bilinear weights sum to 1, so both orders give the same map (the ignore cell becomes
    the encoder's bias, the image of the zero vector), at a fraction of the cost.
    """
    h, w = size
    small = _nearest(labels, (int(h * ratio), int(w * ratio)))
    num_classes = embeddings.shape[0]
    small = torch.where((small < 0) | (small >= num_classes), num_classes, small)
    table = torch.cat([embeddings, embeddings.new_zeros(1, embeddings.shape[1])])
    if getattr(semantic_encoder, "is_linear", False):
        encoded = semantic_encoder(table)
        grid = encoded[small].permute(0, 3, 1, 2)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    grid = table[small].permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    return semantic_encoder(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def bar_loss(features: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor,
             semantic_encoder: nn.Module, ratio: float, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """BAR: mean squared error over non-ignored pixels *and* channels (official), with
    gradients into both encoders. The valid mask is the label map nearest-resized to the
    feature size. Returns 0 (not NaN, as the official code would) when no pixel is valid."""
    size = tuple(features.shape[-2:])
    target = bar_target(labels, embeddings, semantic_encoder, size, ratio, ignore_index)
    valid = (_nearest(labels, size) != ignore_index)[:, None].float()
    # ((f - t) * valid)^2 equals (f - t)^2 * valid (valid is 0/1); this order keeps every
    # gradient in the features' memory format (3x faster backward with channels_last)
    diff = (features.float() - target.float()) * valid
    count = valid.sum() * features.shape[1]
    return (diff * diff).sum() / count.clamp_min(1)


def pairwise_distances(x: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Euclidean distances between the rows of ``x``: ``torch.cdist`` (official VOC trainer), or with
    ``epsilon`` > 0 ``sqrt(sum of squared differences + epsilon)`` per pair (official Context trainer)."""
    if epsilon > 0:
        return ((x[:, None] - x[None]).square().sum(-1) + epsilon).sqrt()
    return torch.cdist(x[None], x[None])[0]


def sc_loss(embeddings: torch.Tensor, semantic_encoder: nn.Module, class_ids: Sequence[int] | torch.Tensor,
            temperature: float, divide_by_num_classes: bool = False, distance_epsilon: float = 0.0) -> torch.Tensor:
    """SC: KL(softmax(-temperature * d(embeddings)) || log_softmax(-d(prototypes))), batchmean.

    ``d`` is the Euclidean (not squared) pairwise distance (see :func:`pairwise_distances` for
    ``distance_epsilon``); the temperature applies only to the word-embedding side; ``class_ids``
    are the seen object classes (background excluded), all as in the official code.
    ``divide_by_num_classes`` divides once more by the number of classes, as the official
    Pascal-Context trainer does (one batchmean KL per class row, summed, over the class count).
    """
    ids = torch.as_tensor(class_ids, device=embeddings.device, dtype=torch.long)
    chosen = embeddings[ids].float()
    prototypes = semantic_encoder(chosen).float()
    target = F.softmax(-temperature * pairwise_distances(chosen, distance_epsilon), dim=1)
    log_source = F.log_softmax(-pairwise_distances(prototypes, distance_epsilon), dim=1)
    loss = F.kl_div(log_source, target, reduction="batchmean")
    return loss / len(ids) if divide_by_num_classes else loss


def joem_loss(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor,
              semantic_encoder: nn.Module, seen_object_ids: Sequence[int] | torch.Tensor, *, ratio: float,
              temperature: float, alpha: float, sc_divide_by_num_classes: bool = False,
              sc_distance_epsilon: float = 0.0, ce_weight: float = 1.0, bar_weight: float = 1.0,
              ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """The full objective ``ce_weight`` CE + ``bar_weight`` BAR + ``alpha`` SC (official: weights
    1, 1, alpha); returns ``{"ce", "bar", "sc", "total"}``."""
    ce = ce_loss(logits, labels, ignore_index)
    bar = bar_loss(features, labels, embeddings, semantic_encoder, ratio, ignore_index)
    sc = sc_loss(embeddings, semantic_encoder, seen_object_ids, temperature, sc_divide_by_num_classes,
                 sc_distance_epsilon)
    return {"ce": ce, "bar": bar, "sc": sc, "total": ce_weight * ce + bar_weight * bar + alpha * sc}
