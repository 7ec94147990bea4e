"""Segmentation metrics from one global confusion matrix.

The matrix is summed over a whole split (and across ranks or workers) before any score is
taken: mIoU is never a mean of per-image scores. Rows are ground truth, columns prediction.

DeepGlobe convention (MagNet, FCtL, GLNet): class 0 'unknown' stays in the matrix, so a pixel
of unknown ground truth predicted as 'urban' is a false positive of urban, but unknown's own
IoU is left out of the mean. Classes with ``in_mean`` false are treated that way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``(num_classes, num_classes)`` int64 counts; rows ground truth, columns prediction.

    Args:
        pred, target: integer label maps of the same shape. Target pixels outside
            ``[0, num_classes)`` (e.g. 255 nodata) are ignored.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    valid = (target >= 0) & (target < num_classes) & (pred >= 0) & (pred < num_classes)
    index = target[valid] * num_classes + pred[valid]
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).cpu()


def scores(matrix: Tensor | np.ndarray, in_mean: Sequence[bool] | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU, overall accuracy and frequency-weighted IoU of a confusion matrix,
    and remote sensing's accuracy assessment: producer's and user's accuracy per class and
    Cohen's kappa.

    Args:
        matrix: ``(C, C)`` counts, rows ground truth.
        in_mean: which classes count in the means (default all).
    Returns:
        ``{"miou", "iou": [C], "accuracy", "fwiou", "producer_accuracy": [C],
        "user_accuracy": [C], "kappa", "pixels"}``. A class absent from both ground truth and
        prediction has IoU NaN and is left out of the mean. ``accuracy``, ``fwiou`` and
        ``kappa`` are over pixels whose ground truth is a counted class. Producer's accuracy
        of class k is the share of its ground-truth pixels predicted k (1 - omission error;
        recall), user's accuracy the share of pixels predicted k that are k (1 - commission
        error; precision), both NaN where the class has no such pixels.
    """
    m = torch.as_tensor(np.asarray(matrix), dtype=torch.float64)
    c = m.shape[0]
    counted = torch.ones(c, dtype=torch.bool) if in_mean is None else torch.tensor(list(in_mean))
    tp = m.diag()
    gt = m.sum(1)
    union = gt + m.sum(0) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    defined = counted & ~iou.isnan()
    miou = float(iou[defined].mean()) if defined.any() else float("nan")
    gt_counted = gt[counted].sum()
    accuracy = float(tp[counted].sum() / gt_counted) if gt_counted > 0 else float("nan")
    weights = torch.where(counted, gt, torch.zeros_like(gt))
    fw = (weights * torch.nan_to_num(iou)).sum() / gt_counted if gt_counted > 0 else float("nan")
    predicted = m.sum(0)
    producer = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
    user = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.full_like(tp, float("nan")))
    return {
        "miou": miou,
        "iou": [float(v) for v in iou],
        "accuracy": accuracy,
        "fwiou": float(fw),
        "producer_accuracy": [float(v) for v in producer],
        "user_accuracy": [float(v) for v in user],
        "kappa": kappa(m, counted),
        "pixels": int(m.sum()),
    }


def kappa(matrix: Tensor | np.ndarray, rows: Sequence[bool] | Tensor | None = None) -> float:
    """Cohen's kappa of a ``(C, C)`` confusion matrix over the pixels whose ground truth is
    one of ``rows`` (default all): ``(p_o - p_e) / (1 - p_e)``, with ``p_o`` the share of
    those pixels on the diagonal and ``p_e`` the agreement expected by chance from their row
    and column totals. NaN without pixels, or when chance agreement is total (``p_e = 1``)."""
    m = torch.as_tensor(np.asarray(matrix), dtype=torch.float64)
    if rows is not None:
        m = torch.where(torch.as_tensor(rows, dtype=torch.bool)[:, None], m, torch.zeros_like(m))
    total = m.sum()
    if total <= 0:
        return float("nan")
    observed = float(m.diag().sum() / total)
    chance = float((m.sum(1) * m.sum(0)).sum() / total**2)
    return float("nan") if chance >= 1 else (observed - chance) / (1 - chance)


def percent(value: float | None) -> str:
    """A score for people to read: ``0.4220`` -> ``42.2%``. Every log line and report.md
    shows scores so; JSON (NDJSON records, report.json, checkpoints) keeps fractions 0-1."""
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


class ConfusionMatrix:
    """Accumulates a confusion matrix over many images (sum with ``+=`` or all_reduce)."""

    def __init__(self, num_classes: int, in_mean: Sequence[bool] | None = None) -> None:
        self.num_classes = num_classes
        self.in_mean = list(in_mean) if in_mean is not None else [True] * num_classes
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> Tensor:
        """Add one prediction; returns that image's own matrix."""
        m = confusion_matrix(pred, target, self.num_classes)
        self.matrix += m
        return m

    def __iadd__(self, other: "ConfusionMatrix | Tensor") -> "ConfusionMatrix":
        self.matrix += other.matrix if isinstance(other, ConfusionMatrix) else torch.as_tensor(other)
        return self

    def scores(self) -> dict[str, Any]:
        return scores(self.matrix, self.in_mean)
