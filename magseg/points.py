"""PointRend-style point selection, sampling and scattering on per-crop maps.

Points are indices into a crop's flattened ``H * W`` grid, or normalised ``(x, y)`` in
[0, 1] as ``grid_sample`` expects; a pixel's centre is ``((col + 0.5) / W, (row + 0.5) / H)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def num_points(points: int | float, available: int) -> int:
    """K for a crop with ``available`` candidate pixels: an int is a count, a float a fraction."""
    if isinstance(points, float):
        return min(available, round(points * available))
    return min(available, int(points))


def top_k_points(score: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """Indices of the ``k`` highest-scoring pixels of one map.

    Args:
        score: ``(H, W)`` score.
        k: how many; must not exceed the number of pixels allowed by ``mask``.
        mask: ``(H, W)`` bool; False pixels are never picked.
    Returns:
        ``(k,)`` int64 indices into the flattened ``H * W`` grid, highest score first.
    """
    flat = score.reshape(-1)
    if mask is not None:
        flat = flat.masked_fill(~mask.reshape(-1), float("-inf"))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    return flat.topk(k, sorted=True).indices


def pixel_centres(index: Tensor, size: tuple[int, int]) -> Tensor:
    """Normalised ``(x, y)`` centres of flat pixel indices.

    Args:
        index: ``(..., P)`` int64 indices into a ``size`` = (H, W) grid.
    Returns:
        ``(..., P, 2)`` float in (0, 1).
    """
    h, w = size
    rows = torch.div(index, w, rounding_mode="floor")
    cols = index - rows * w
    return torch.stack(((cols.float() + 0.5) / w, (rows.float() + 0.5) / h), dim=-1)


def point_sample(features: Tensor, points: Tensor) -> Tensor:
    """Bilinearly sample ``features`` at normalised points (PointRend's ``point_sample``).

    Args:
        features: ``(B, C, H, W)``.
        points: ``(B, P, 2)`` normalised ``(x, y)`` in [0, 1].
    Returns:
        ``(B, C, P)``. At a pixel centre of the same grid this is that pixel's value exactly.
    """
    grid = (2.0 * points - 1.0).unsqueeze(2).to(features.dtype)
    out = F.grid_sample(features, grid, mode="bilinear", align_corners=False)
    return out.squeeze(3)


def scatter_points(target: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """Replace the pixels at ``index`` of ``target`` by ``values``; all others unchanged.

    Args:
        target: ``(B, C, H, W)``.
        index: ``(B, P)`` flat pixel indices.
        values: ``(B, C, P)``.
    Returns:
        a new ``(B, C, H, W)`` tensor.
    """
    b, c, h, w = target.shape
    idx = index.unsqueeze(1).expand(-1, c, -1)
    out = target.reshape(b, c, h * w).scatter(2, idx, values.to(target.dtype))
    return out.view(b, c, h, w)
