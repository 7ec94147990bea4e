"""The reference for the refine step, not on the engine's path: PointRend-style point
selection, sampling and scattering on per-crop maps, MagNet's refinement step as
docs/design.md states it. tests/test_engine.py checks the engine against it.

Points are indices into a crop's flattened ``H * W`` grid, or normalised ``(x, y)`` in
[0, 1] as ``grid_sample`` expects; a pixel's centre is ``((col + 0.5) / W, (row + 0.5) / H)``.

The engine itself takes K from ``magseg.engine.refine_step.num_points``, picks pixels by counting
(``magseg.engine.certainty.top_error_pixels``) and takes R's values with one masked select.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top_k_points(score: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """Indices of the ``k`` highest-scoring pixels of one map, or of each map of a batch.

    Args:
        score: ``(H, W)`` or ``(B, H, W)`` score.
        k: how many per map; must not exceed the number of pixels allowed by ``mask``.
        mask: shaped like ``score``, bool; False pixels are never picked.
    Returns:
        ``(k,)`` or ``(B, k)`` int64 indices into the flattened ``H * W`` grid, in no
        particular order (sorting them costs ten times the selection, and scatter does not
        need it).
    """
    flat = score.flatten(-2)
    if mask is not None:
        flat = flat.masked_fill(~mask.flatten(-2), float("-inf"))
    if k == 0:
        return torch.zeros((*flat.shape[:-1], 0), dtype=torch.long, device=score.device)
    return flat.topk(k, dim=-1, sorted=False).indices


def pixel_centres(index: Tensor, size: tuple[int, int]) -> Tensor:
    """Normalised ``(x, y)`` centres of flat pixel indices, in float64.

    float64 because float32 cannot address the centres of a large grid exactly: at 2448 px
    a float32 coordinate is off by up to 1e-4 px, enough to blend neighbours.

    Args:
        index: ``(..., P)`` int64 indices into a ``size`` = (H, W) grid.
    Returns:
        ``(..., P, 2)`` float64 in (0, 1).
    """
    h, w = size
    rows = torch.div(index, w, rounding_mode="floor")
    cols = index - rows * w
    return torch.stack(((cols.double() + 0.5) / w, (rows.double() + 0.5) / h), dim=-1)


def _snap(coord: Tensor) -> Tensor:
    # Within 1e-6 px of a pixel centre is that centre: the weights become exactly 0 and 1, so
    # a sampled value cannot pick up a 1e-13 share of a neighbour (which, for a value near 0,
    # is more than float32's rounding absorbs).
    nearest = coord.round()
    return torch.where((coord - nearest).abs() < 1e-6, nearest, coord)


def point_sample(features: Tensor, points: Tensor) -> Tensor:
    """Bilinearly sample ``features`` at normalised points (PointRend's ``point_sample``).

    Same geometry as ``grid_sample(..., align_corners=False)`` (a point ``(x, y)`` lies at
    pixel coordinate ``(x * W - 0.5, y * H - 0.5)``), with edges clamped. Written as four
    gathers with weights computed in the points' precision (float64 from ``pixel_centres``)
    rather than with ``grid_sample``, which casts the grid to the features' float32: at a
    pixel centre this returns that pixel's value exactly, at any grid size.

    Args:
        features: ``(B, C, H, W)``.
        points: ``(B, P, 2)`` normalised ``(x, y)`` in [0, 1].
    Returns:
        ``(B, C, P)`` in the features' dtype.
    """
    b, c, h, w = features.shape
    pts = points.to(torch.float64)
    x = _snap(pts[..., 0] * w - 0.5)
    y = _snap(pts[..., 1] * h - 0.5)
    x0f, y0f = x.floor(), y.floor()
    wx, wy = (x - x0f).unsqueeze(1), (y - y0f).unsqueeze(1)  # (B, 1, P)
    x0, y0 = x0f.long(), y0f.long()
    x0c, x1c = x0.clamp(0, w - 1), (x0 + 1).clamp(0, w - 1)
    y0c, y1c = y0.clamp(0, h - 1), (y0 + 1).clamp(0, h - 1)
    flat = features.reshape(b, c, h * w)

    def at(yy: Tensor, xx: Tensor) -> Tensor:
        return flat.gather(2, (yy * w + xx).unsqueeze(1).expand(-1, c, -1)).double()

    top = at(y0c, x0c) * (1 - wx) + at(y0c, x1c) * wx
    bottom = at(y1c, x0c) * (1 - wx) + at(y1c, x1c) * wx
    return (top * (1 - wy) + bottom * wy).to(features.dtype)


def scatter_points(target: Tensor, index: Tensor, values: Tensor, inplace: bool = False) -> Tensor:
    """Replace the pixels at ``index`` of ``target`` by ``values``; all others unchanged.

    Args:
        target: ``(B, C, H, W)``, contiguous when ``inplace``.
        index: ``(B, P)`` flat pixel indices.
        values: ``(B, C, P)``.
        inplace: write into ``target`` (no copy) instead of returning a new tensor.
    Returns:
        the ``(B, C, H, W)`` result (``target`` itself when ``inplace``).
    """
    b, c, h, w = target.shape
    idx = index.unsqueeze(1).expand(-1, c, -1)
    flat = target.view(b, c, h * w) if inplace else target.reshape(b, c, h * w)
    if inplace:
        flat.scatter_(2, idx, values.to(target.dtype))
        return target
    return flat.scatter(2, idx, values.to(target.dtype)).view(b, c, h, w)
