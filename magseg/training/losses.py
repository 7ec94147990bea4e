"""The segmentation losses both phases train with, and the refiner's loss pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from magseg.data.scenes import IGNORE


def segmentation_loss(logits: Tensor, target: Tensor, ohem: float | None = None,
                      balance: float = 0.0) -> Tensor:
    """Pixel cross-entropy, ignoring ``IGNORE`` pixels (padding, nodata).

    Args:
        logits: ``(B, C, H, W)`` (or ``(B, C, N)`` at sampled points); target: ``(B, H, W)``
            (``(B, N)``) int64 class ids.
        ohem: keep only this fraction of the labelled pixels, the ones with the highest loss
            (online hard example mining); None keeps all.
        balance: class balancing, 0 (plain mean) to 1: each pixel is weighted by
            ``n_c ** -balance``, ``n_c`` the batch's labelled pixels of its class, and the
            weights are scaled to average 1. At 1 every class present weighs the same in
            the loss, however few its pixels: a class of 4 % does not count for only 4 %.
    Returns:
        the (weighted) mean loss over the kept pixels (0, with a gradient, when none is
        labelled).
    """
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    labelled = target != IGNORE
    loss = loss[labelled]
    if loss.numel() == 0:
        return logits.sum() * 0.0
    if balance > 0:
        classes = target[labelled]
        counts = torch.bincount(classes, minlength=logits.shape[1]).to(loss.dtype)
        weight = counts.clamp_min(1).pow(-balance)[classes]
        loss = loss * (weight / weight.mean())
    if ohem is not None and ohem < 1:
        loss = loss.topk(max(1, int(ohem * loss.numel()))).values
    return loss.mean()


def margin_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of a prediction, ``-(top1 - top2)`` of its probabilities over dim 1:
    0 where two classes tie, -1 where one takes everything (PointRend's measure, on
    probabilities so that it reads like ``magseg.engine.certainty``)."""
    top2 = logits.detach().float().softmax(dim=1).topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


def uncertain_points(uncertainty: Tensor, count: int, oversample: float = 3.0,
                     importance: float = 0.75, generator: torch.Generator | None = None) -> Tensor:
    """PointRend's training points: draw ``oversample * count`` distinct candidate pixels at
    random, keep the ``importance * count`` most uncertain of them, add
    ``(1 - importance) * count`` pixels drawn uniformly (so the easy majority is still seen).

    Args:
        uncertainty: ``(B, H, W)``, higher = less sure (e.g. ``margin_uncertainty``).
        count: points per map, N.
    Returns:
        ``(B, N)`` int64 flat pixel indices into ``H * W`` (may repeat).
    """
    b, h, w = uncertainty.shape
    pixels = h * w
    device = uncertainty.device
    flat = uncertainty.reshape(b, pixels)
    hard = min(int(round(importance * count)), count)
    candidates = min(max(int(round(oversample * count)), hard), pixels)
    picked = []
    if hard > 0:
        # Distinct candidates (a random subset), so no hard point is taken twice.
        cand = torch.rand(b, pixels, generator=generator, device=device).topk(candidates, dim=1).indices
        top = flat.gather(1, cand).topk(min(hard, candidates), dim=1).indices
        picked.append(cand.gather(1, top))
    if count - hard > 0:
        picked.append(torch.randint(pixels, (b, count - hard), generator=generator, device=device))
    return torch.cat(picked, dim=1)


def gather_points(values: Tensor, index: Tensor) -> Tensor:
    """``values`` ``(B, C, H, W)`` (or ``(B, H, W)``) at flat pixel ``index`` ``(B, N)``:
    ``(B, C, N)`` (or ``(B, N)``)."""
    if values.dim() == 3:
        return values.flatten(1).gather(1, index)
    flat = values.flatten(2)
    return flat.gather(2, index[:, None].expand(-1, flat.shape[1], -1))
