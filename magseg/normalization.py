"""Pixel normalisation: raw band values (uint8, uint16 or float) to model input.

The statistics are per model channel, in raw pixel units, computed from the training split
(or given in the config) and stored in the checkpoint's config (``data.mean``, ``data.std``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def normalize(pixels: np.ndarray | Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(pixels - mean) / std`` per channel.

    Args:
        pixels: ``(C, H, W)`` raw values of any numeric dtype.
        mean, std: ``C`` values each.
    Returns:
        ``(C, H, W)`` float32 tensor.
    """
    x = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, Tensor) else pixels)
    x = x.to(torch.float32)
    if x.dim() != 3 or x.shape[0] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"pixels of shape {tuple(x.shape)} do not match {len(mean)} normalisation channels"
        )
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1).clamp_min(1e-8)
    return torch.sub(x, m).div_(s)  # one new tensor, not two


class ChannelStats:
    """Per-channel running sums for mean and std over many images (in raw pixel units).

    Sums are float64, so uint16 imagery over thousands of scenes keeps its precision; the
    sums of several workers or ranks add up (``merge``, or an all-reduce of ``tensor()``).
    """

    def __init__(self, channels: int) -> None:
        self.sums = torch.zeros((3, channels), dtype=torch.float64)  # count, sum, sum of squares

    def update(self, pixels: np.ndarray | Tensor) -> None:
        """Add a ``(C, H, W)`` image."""
        x = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, Tensor) else pixels)
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        self.sums[0] += x.shape[1]
        self.sums[1] += x.sum(1)
        self.sums[2] += (x * x).sum(1)

    def merge(self, other: "ChannelStats | Tensor") -> None:
        self.sums += other.sums if isinstance(other, ChannelStats) else other

    @property
    def pixels(self) -> int:
        """How many pixels have been added."""
        return int(self.sums[0, 0]) if self.sums.shape[1] else 0

    def tensor(self) -> Tensor:
        """The ``(3, C)`` sums (count, sum, sum of squares), e.g. to all-reduce."""
        return self.sums

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` per channel; a constant channel gets std 1 (nothing to scale)."""
        count, total, squares = self.sums
        if (count == 0).any():
            raise ValueError("no pixels were added")
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0)
        std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# How many times larger or smaller than the training data's a raster's pixels may be before
# predict says they are on another scale. The mistakes it is for are one or more orders of
# magnitude: uint16 reflectance (0..10000) fed to a model trained on 8-bit RGB, 0..1 floats
# to one trained on 0..255, or the other way round. An 8-bit scene of a different landscape
# (dark water, bright desert) stays within a factor of three or so.
SCALE_FACTOR = 8.0
# Below this many valid pixels a raster's statistics say nothing about its scale (one dark
# pixel of a 1 x 1 raster is not a raster on another scale): predict skips the check.
SCALE_MIN_PIXELS = 1024


def scale_mismatches(
    observed: ChannelStats, mean: tuple[float, ...], std: tuple[float, ...], factor: float = SCALE_FACTOR
) -> list[tuple[int, float]]:
    """Channels whose pixels are on another scale than the training data's.

    A channel's scale is its typical magnitude ``|mean| + std``, in raw pixel units (``|mean|``
    so that signed data such as SAR in dB compares too). A channel is off when the observed
    scale is more than ``factor`` times the training one, or less than ``1 / factor`` of it.

    Args:
        observed: statistics of the pixels about to be segmented (``C`` channels).
        mean, std: the training statistics (the checkpoint's ``data.mean``/``data.std``).
    Returns:
        ``(channel index, observed / training scale)`` for each channel that is off.
    """
    seen_mean, seen_std = observed.result()
    out = []
    for c, (m, s, sm, ss) in enumerate(zip(mean, std, seen_mean, seen_std)):
        trained, seen = abs(m) + s, abs(sm) + ss
        if trained > 0 and not 1 / factor <= seen / trained <= factor:
            out.append((c, seen / trained))
    return out
