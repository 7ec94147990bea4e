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
    return (x - m) / s
