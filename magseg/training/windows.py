"""Training windows: a crop-sized window of a scene seen at one stage's magnification.

A window is cut the way the engine cuts its crops (``magseg.engine.pyramid``): the scene resized to
the stage's size, a box of crop size inside it, zero padding where the stage image is
smaller than the crop. Masks are resized with nearest-exact sampling and padded with
``IGNORE``, so padding never counts in the loss.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from magseg.data.scenes import IGNORE
from magseg.engine.pyramid import CropBox, Size, Window, context_windows, crop_windows, resize


def random_box(rng: np.random.Generator, size: Size, crop: Size) -> CropBox:
    """A window of ``crop`` (H, W) at a uniformly random position in an image of ``size``,
    clipped to the image along an axis shorter than the crop. The box owns all of itself."""
    (h, w), (ch, cw) = size, crop
    top = int(rng.integers(0, max(h - ch, 0) + 1))
    left = int(rng.integers(0, max(w - cw, 0) + 1))
    height, width = min(ch, h), min(cw, w)
    return CropBox(top, left, height, width, top, left, height, width)


def resize_mask(mask: Tensor, size: Size) -> Tensor:
    """``(H, W)`` integer labels -> ``(h, w)`` int64 labels, nearest-exact."""
    if tuple(mask.shape) == tuple(size):
        return mask.long()
    return resize(mask[None].float(), size, mode="nearest")[0].round().long()


def mask_window(mask: Tensor, box: CropBox, crop: Size) -> Tensor:
    """Cut ``box`` out of a stage mask ``(h, w)`` as ``crop`` (ch, cw) int64, padded with IGNORE."""
    out = torch.full(tuple(crop), IGNORE, dtype=torch.long)
    out[: box.height, : box.width] = mask[box.window]
    return out


def image_windows(stage_image: Tensor, box: CropBox, crop: Size, ratios: tuple[float, ...] = ()
                  ) -> tuple[Tensor, list[Tensor]]:
    """The window ``(C, ch, cw)`` and, for a multi-context backbone (FCtL), one context window
    per ratio ``(C, r*ch, r*cw)``, cut by the engine's own ``backbone_inputs``."""
    from magseg.engine.stages import backbone_inputs

    crops, contexts = backbone_inputs(stage_image, crop_windows([box], crop), ratios)
    return crops[0], [c[0] for c in contexts or []]


# --------------------------------------------------------------------------------------------
# Windows read from the source scene: a sample reads and resizes only the part of the scene
# its window needs, and gets exactly what cutting the window out of the whole resized stage
# image gives (tests/test_sample_windows.py).

Region = tuple[int, int, int, int]  # (top, left, height, width) inside a stage image


def region_plan(src: int, dst: int, start: int, length: int) -> tuple[int, int, int, int]:
    """One axis of a ``src -> dst`` resize: the output range ``[o0, o1)`` to compute and the
    source range ``[s0, s1)`` it is computed from, so that output pixels ``[start, start +
    length)`` come out as resizing the whole axis gives them.

    ``pyramid.resize`` maps output pixel ``i`` to source ``(i + 0.5) * src / dst - 0.5`` and
    reads a filter's support around it (antialiased when shrinking). A piece of the axis
    resized on its own reproduces this when (a) the piece's own scale is the same number,
    and (b) it holds each kept pixel's whole support, so edge clamping happens only where
    the axis itself ends. For (a) the piece starts and ends on output multiples of ``q``
    and source multiples of ``p`` (``src / dst = p / q`` in lowest terms): its scale is then
    the same rational, and float division rounds both to the same float. For (b) the output
    range reaches a few pixels beyond the kept ones (the support of an antialiased bilinear
    filter is one output pixel when shrinking, ``1 / scale`` output pixels when growing).

    With integer or power-of-two ratios (every pyramid of doubling scales, on scenes of
    ``scales[-1]``) the filter centres ``scale * (i + 0.5)`` are exact in float and the
    piece is bit-identical to the whole; other ratios differ by float rounding of the
    centres (about 1e-6 of the pixel range).
    """
    if src == dst:
        return start, start + length, start, start + length
    g = math.gcd(src, dst)
    p, q = src // g, dst // g
    scale = src / dst
    margin = 3 if scale >= 1 else 2 + math.ceil(2 / scale)
    o0 = max(start - margin, 0) // q * q
    o1 = min(-(-(start + length + margin) // q) * q, dst)
    # PyTorch's bilinear upsampling picks another kernel, with other rounding, for outputs
    # of height + width <= 128 (see magseg.engine.resample._SAME_KERNEL): keep pieces above 64 a side.
    while o1 - o0 < 65 and (o0 > 0 or o1 < dst):
        o0, o1 = max(o0 - q, 0), min(o1 + q, dst)
    return o0, o1, o0 * p // q, o1 * p // q


def resized_region(read: Callable[[slice, slice], Tensor], src_size: Size, dst_size: Size,
                   region: Region) -> Tensor:
    """``resize(whole, dst_size)[:, region]`` where ``read(rows, cols)`` gives ``(C, h, w)``
    float pieces of ``whole`` (``(C, *src_size)``), reading only the source the region needs
    (``region_plan``).
    """
    top, left, height, width = region
    r0, r1, sr0, sr1 = region_plan(src_size[0], dst_size[0], top, height)
    c0, c1, sc0, sc1 = region_plan(src_size[1], dst_size[1], left, width)
    part = resize(read(slice(sr0, sr1), slice(sc0, sc1)), (r1 - r0, c1 - c0))
    return part[:, top - r0 : top - r0 + height, left - c0 : left - c0 + width]


@functools.lru_cache(maxsize=256)
def nearest_indices(src: int, dst: int) -> np.ndarray:
    """The source index of each output pixel of a nearest-exact ``src -> dst`` resize, taken
    from PyTorch's own kernel (``resize_mask``), so masks cut this way are exactly the same."""
    if src == dst:
        return np.arange(dst)
    index = resize(torch.arange(src, dtype=torch.float32).view(1, src, 1), (dst, 1), mode="nearest")
    return index.view(-1).round().long().numpy()


def window_regions(box: CropBox, crop: Size, size: Size, ratios: tuple[float, ...] = ()
                   ) -> tuple[Region, list[Window]]:
    """The part of a stage image of ``size`` that a training window (and its FCtL context
    windows) reads, and the window in that part's coordinates (for ``image_windows``).

    Windows reach past the image where it is smaller than the crop (or for contexts near an
    edge); the region is their union clipped to the image, so what lies outside it is what
    lies outside the image: zero padding, as before.
    """
    (window,) = crop_windows([box], crop)
    every = [window] + [w for r in ratios for w in context_windows([window], r)]
    top, left = max(min(w[0] for w in every), 0), max(min(w[1] for w in every), 0)
    bottom = min(max(w[0] + w[2] for w in every), size[0])
    right = min(max(w[1] + w[3] for w in every), size[1])
    return (top, left, bottom - top, right - left), [(window[0] - top, window[1] - left, *window[2:])]
