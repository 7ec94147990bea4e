"""The refinement module: fine and coarse class maps in, refined logits out.

MagNet's refiner is a full-resolution conv net with 64-128 channels; on a CPU it costs more
than the backbone (see DESIGN.md, "Where the time goes"). This one keeps the interface (the
two C-channel probability maps, concatenated fine first) and splits the work in two:

- a point branch at full resolution made of 1x1 convolutions (a per-pixel MLP, as in
  PointRend's point head): a few hundred multiply-adds per pixel;
- a context branch at 1/``context_stride`` resolution with 3x3 convolutions (one dilated)
  that sees a neighbourhood of about 10 * stride pixels, upsampled back.

The output is a residual on the fine prediction's log-probabilities and both branches end
in zero-initialised convolutions, so an untrained refiner returns the fine prediction
exactly (refined = fine), and training only has to learn the correction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Floor for log-probabilities; keeps log(0) finite.
_EPS = 1e-6


def refiner_input(fine: Tensor, coarse: Tensor) -> Tensor:
    """The one channel order shared by training and inference: ``cat([fine, coarse])``.

    Args:
        fine, coarse: ``(B, C, H, W)`` probabilities.
    Returns:
        ``(B, 2C, H, W)``.
    """
    if fine.shape != coarse.shape:
        raise ValueError(f"fine {tuple(fine.shape)} and coarse {tuple(coarse.shape)} differ")
    return torch.cat([fine, coarse], dim=1)


class Refiner(nn.Module):
    """Refines fine probabilities using coarse ones: ``(B, C, H, W) x 2 -> (B, C, H, W)`` logits."""

    def __init__(self, classes: int, channels: int = 32, context_stride: int = 4) -> None:
        super().__init__()
        self.classes = classes
        self.context_stride = context_stride
        self.point = nn.Sequential(
            nn.Conv2d(2 * classes, channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, classes, 1),
        )
        self.context = nn.Sequential(
            nn.Conv2d(2 * classes, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, classes, 1),
        )
        for head in (self.point[-1], self.context[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """Refined logits; ``softmax`` of them equals ``fine`` while the heads are zero."""
        x = refiner_input(fine, coarse)
        h, w = x.shape[-2:]
        s = self.context_stride
        ctx_in = F.avg_pool2d(x, s, ceil_mode=True) if s > 1 else x
        ctx = self.context(ctx_in)
        if s > 1:
            ctx = F.interpolate(ctx, size=(h, w), mode="bilinear", align_corners=False)
        return fine.clamp_min(_EPS).log() + self.point(x) + ctx
