"""Boundary metrics: boundary IoU (Cheng et al., CVPR 2021) and the boundary F-score, per class.

mIoU is dominated by the interiors of regions, where a coarse prediction is already right; these
two scores look only near the class boundaries, which is where a refiner or a CRF acts.

**Boundary IoU** of class c: with ``G`` the ground-truth pixels of c and ``P`` the predicted
ones, and ``X_d`` the pixels of ``X`` within distance ``d`` of ``X``'s contour,

    |G_d ∩ P_d| / |G_d ∪ P_d|,      d = max(1, round(ratio * image diagonal)), ratio 0.02

as in the authors' reference code: "within d" is the square (chessboard) neighbourhood of
their iterated 3x3 erosion, and the image frame counts as a contour (a region cut by the
frame has a boundary there).

**Boundary F-score** of class c: the contours of ``G`` and ``P`` (pixels of the class with a
4-neighbour of another class; the frame is not a contour here, as in DAVIS's boundary
measure), a predicted contour pixel is a hit when a ground-truth contour pixel lies within the
tolerance ``t`` (square neighbourhood, ``t`` from ``ratio`` 0.008 of the diagonal as DAVIS
does), and the other way round for recall; F = 2PR / (P + R).

Both are summed as counts over a split, as the confusion matrix is (magseg.evaluation.metrics):
per class, intersection and union pixels, contour pixels and hits; a score is taken from the
sums only, never averaged over images. Ground-truth pixels outside ``[0, C)`` (nodata) are
not counted. Window sums come from an integral image, so the cost does not grow with ``d``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

IOU_RATIO = 0.02  # Cheng et al.'s dilation ratio
F_RATIO = 0.008  # DAVIS's boundary tolerance, as a fraction of the diagonal

# The columns of a (C, 6) count table.
INTER, UNION, PRED_CONTOUR, PRED_HITS, GT_CONTOUR, GT_HITS = range(6)


def distance_of(size: tuple[int, int], ratio: float) -> int:
    """``max(1, round(ratio * diagonal))`` pixels for an image of ``size`` (H, W)."""
    return max(1, round(ratio * math.hypot(*size)))


def window_count(mask: Tensor, d: int, outside: bool) -> Tensor:
    """``(H, W)`` int32: how many True pixels of ``mask`` ``(H, W)`` bool lie in the
    ``(2d+1)²`` square around each pixel, pixels outside the image counting as ``outside``."""
    h, w = mask.shape
    k = 2 * d + 1
    padded = torch.full((h + 2 * d + 1, w + 2 * d + 1), int(outside), dtype=torch.int32, device=mask.device)
    padded[0, :] = 0  # the integral image's leading zero row and column
    padded[:, 0] = 0
    padded[d + 1 : d + 1 + h, d + 1 : d + 1 + w] = mask.to(torch.int32)
    s = padded.cumsum(0, dtype=torch.int32).cumsum(1, dtype=torch.int32)
    return s[k:, k:] - s[:h, k:] - s[k:, :w] + s[:h, :w]


def boundary_region(mask: Tensor, d: int, frame: bool = True) -> Tensor:
    """``(H, W)`` bool: the pixels of ``mask`` within ``d`` (square) of a pixel outside it,
    the image's outside included when ``frame`` (Cheng et al.'s ``G_d ∩ G``)."""
    return mask & (window_count(~mask, d, outside=frame) > 0)


def contour(mask: Tensor) -> Tensor:
    """``(H, W)`` bool: pixels of ``mask`` with a 4-neighbour inside the image not in it."""
    edge = torch.zeros_like(mask)
    edge[1:] |= mask[1:] != mask[:-1]
    edge[:-1] |= mask[:-1] != mask[1:]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    return mask & edge


def boundary_counts(pred: Tensor, target: Tensor, num_classes: int, iou_ratio: float = IOU_RATIO,
                    f_ratio: float = F_RATIO) -> Tensor:
    """One image's ``(C, 6)`` int64 counts per class: boundary intersection and union, predicted
    contour pixels and their hits, ground-truth contour pixels and theirs.

    Args:
        pred, target: ``(H, W)`` integer label maps; target pixels outside ``[0, C)`` are not
            counted (nodata).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred, target = pred.long(), target.long()
    valid = (target >= 0) & (target < num_classes)
    d, t = distance_of(tuple(target.shape), iou_ratio), distance_of(tuple(target.shape), f_ratio)
    out = torch.zeros((num_classes, 6), dtype=torch.int64)
    for c in range(num_classes):
        g, p = target == c, pred == c
        if not (g.any() or p.any()):
            continue
        gb, pb = boundary_region(g, d) & valid, boundary_region(p, d) & valid
        gc, pc = contour(g) & valid, contour(p) & valid
        out[c, INTER] = int((gb & pb).sum())
        out[c, UNION] = int((gb | pb).sum())
        out[c, PRED_CONTOUR] = int(pc.sum())
        out[c, PRED_HITS] = int((pc & (window_count(gc, t, outside=False) > 0)).sum())
        out[c, GT_CONTOUR] = int(gc.sum())
        out[c, GT_HITS] = int((gc & (window_count(pc, t, outside=False) > 0)).sum())
    return out


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, float("nan")))


def _mean(values: Tensor, counted: Tensor) -> float:
    defined = counted & ~values.isnan()
    return float(values[defined].mean()) if defined.any() else float("nan")


def boundary_scores(counts: Tensor, in_mean: Sequence[bool] | None = None) -> dict[str, Any]:
    """Scores of summed ``(C, 6)`` counts.

    Returns:
        ``{"boundary_iou": [C], "boundary_miou", "boundary_f": [C], "boundary_mf",
        "boundary_precision": [C], "boundary_recall": [C]}``: NaN for a class with no
        boundary in either map (and left out of the means, as ``in_mean`` false classes are).
        A class with contours on one side only has F = 0.
    """
    counts = torch.as_tensor(counts)
    counted = torch.ones(counts.shape[0], dtype=torch.bool) if in_mean is None else torch.tensor(list(in_mean))
    iou = _ratio(counts[:, INTER], counts[:, UNION])
    precision = _ratio(counts[:, PRED_HITS], counts[:, PRED_CONTOUR])
    recall = _ratio(counts[:, GT_HITS], counts[:, GT_CONTOUR])
    p0, r0 = precision.nan_to_num(0.0), recall.nan_to_num(0.0)
    any_contour = (counts[:, PRED_CONTOUR] + counts[:, GT_CONTOUR]) > 0
    f = torch.where(p0 + r0 > 0, 2 * p0 * r0 / (p0 + r0).clamp_min(1e-300), torch.zeros_like(p0))
    f = torch.where(any_contour, f, torch.full_like(f, float("nan")))
    return {
        "boundary_iou": [float(v) for v in iou],
        "boundary_miou": _mean(iou, counted),
        "boundary_f": [float(v) for v in f],
        "boundary_mf": _mean(f, counted),
        "boundary_precision": [float(v) for v in precision],
        "boundary_recall": [float(v) for v in recall],
    }


class BoundaryTally:
    """Boundary counts summed over many images (``update`` each, or ``+=`` a tally or a
    ``(C, 6)`` table from elsewhere), then ``scores``."""

    def __init__(self, num_classes: int, in_mean: Sequence[bool] | None = None,
                 iou_ratio: float = IOU_RATIO, f_ratio: float = F_RATIO) -> None:
        self.num_classes = num_classes
        self.in_mean = list(in_mean) if in_mean is not None else [True] * num_classes
        self.iou_ratio, self.f_ratio = iou_ratio, f_ratio
        self.counts = torch.zeros((num_classes, 6), dtype=torch.int64)

    def update(self, pred: Tensor, target: Tensor) -> Tensor:
        """Add one image; returns its own counts."""
        counts = boundary_counts(pred, target, self.num_classes, self.iou_ratio, self.f_ratio)
        self.counts += counts
        return counts

    def __iadd__(self, other: "BoundaryTally | Tensor") -> "BoundaryTally":
        self.counts += other.counts if isinstance(other, BoundaryTally) else torch.as_tensor(other)
        return self

    def scores(self) -> dict[str, Any]:
        return boundary_scores(self.counts, self.in_mean)
