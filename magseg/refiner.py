"""The refinement module: fine and coarse class maps in, refined logits out.

MagNet's refiner is a full-resolution conv net with 64-128 channels; on a CPU it costs more
than the backbone (see DESIGN.md, "Where the time goes"). This one keeps the interface (the
two C-channel probability maps, concatenated fine first) but does its learned work at
1/``context_stride`` of the crop's resolution, where 3x3 convolutions (one dilated) see a
neighbourhood of about 10 * stride pixels, and returns

    refined logits = log(fine) + upsample(correction)

A residual in log-probability space: where the fine prediction is confident (a 2 px road)
a smooth correction cannot overturn it; where it is unsure (two classes that look alike up
close) the correction, learned from the coarse map and the surroundings, decides. The last
convolution starts at zero, so an untrained refiner returns the fine prediction, and
training only has to learn the correction. A full-resolution 1x1 branch was tried and
dropped: on a CPU it cost more than all the rest of the refinement together.
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
        self.context = nn.Sequential(
            nn.Conv2d(2 * classes, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, classes, 1),
        )
        nn.init.zeros_(self.context[-1].weight)
        nn.init.zeros_(self.context[-1].bias)

    def correction(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """The learned correction at reduced resolution: ``(B, C, ceil(H/s), ceil(W/s))``."""
        s = self.context_stride
        if s > 1:  # pooling commutes with concatenation: pool first, concatenate small maps
            fine, coarse = (F.avg_pool2d(m, s, ceil_mode=True) for m in (fine, coarse))
        return self.context(refiner_input(fine, coarse))

    def _full_size(self, delta: Tensor, like: Tensor) -> Tensor:
        if self.context_stride == 1:
            return delta
        return F.interpolate(delta, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """Refined logits (for training); ``softmax`` of them equals ``fine`` while the last
        conv is zero."""
        delta = self._full_size(self.correction(fine, coarse), fine)
        return fine.clamp_min(_EPS).log() + delta

    def probs(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """Refined probabilities (for inference): ``softmax(forward(fine, coarse))``, computed
        as ``fine * exp(d) / sum(fine * exp(d))`` without the full-resolution log and
        softmax passes (equal up to the log floor: a 0 stays 0 instead of ~1e-6)."""
        delta = self.correction(fine, coarse)
        # Shift by the per-pixel max so exp never overflows; it cancels in the ratio.
        delta = delta - delta.amax(dim=1, keepdim=True)
        # In place on the one full-resolution buffer the upsampling made: each extra buffer of
        # a 2448 px stage's crops is tens of MB to allocate and fault in.
        weighted = self._full_size(delta, fine).exp_().mul_(fine)
        return weighted.div_(weighted.sum(dim=1, keepdim=True).clamp_min_(1e-30))
