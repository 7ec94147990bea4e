"""The segmentation loss both phases train with."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from magseg.data.scenes import IGNORE


def segmentation_loss(logits: Tensor, target: Tensor, ohem: float | None = None) -> Tensor:
    """Pixel cross-entropy, ignoring ``IGNORE`` pixels (padding, nodata).

    Args:
        logits: ``(B, C, H, W)``; target: ``(B, H, W)`` int64 class ids.
        ohem: keep only this fraction of the labelled pixels, the ones with the highest loss
            (online hard example mining); None keeps all.
    Returns:
        the mean loss over the kept pixels (0, with a gradient, when none is labelled).
    """
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    loss = loss[target != IGNORE]
    if loss.numel() == 0:
        return logits.sum() * 0.0
    if ohem is not None and ohem < 1:
        loss = loss.topk(max(1, int(ohem * loss.numel()))).values
    return loss.mean()
