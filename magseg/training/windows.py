"""Training windows: a crop-sized window of a scene seen at one stage's magnification.

A window is cut the way the engine cuts its crops (``magseg.engine.pyramid``): a box of crop
size inside the stage image, zero padding where the stage image is smaller than the crop.
Image windows come from ``magseg.engine.resample.resample_window``, as the engine's do
(``magseg.training.samples.stage_crop``). Masks are resized with nearest-exact sampling and
padded with ``IGNORE``, so padding never counts in the loss.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from magseg.data.scenes import IGNORE
from magseg.engine.pyramid import CropBox, Size, resize
from magseg.geometry import Rect


def random_box(rng: np.random.Generator, size: Size, crop: Size) -> CropBox:
    """A window of ``crop`` (H, W) at a uniformly random position in an image of ``size``,
    clipped to the image along an axis shorter than the crop. The box owns all of itself."""
    (h, w), (ch, cw) = size, crop
    top = int(rng.integers(0, max(h - ch, 0) + 1))
    left = int(rng.integers(0, max(w - cw, 0) + 1))
    height, width = min(ch, h), min(cw, w)
    return CropBox.whole(Rect(top, left, height, width))


def resize_mask(mask: Tensor, size: Size) -> Tensor:
    """``(H, W)`` integer labels -> ``(h, w)`` int64 labels, nearest-exact."""
    if tuple(mask.shape) == tuple(size):
        return mask.long()
    return resize(mask[None].float(), size, mode="nearest")[0].round().long()


def mask_window(mask: Tensor, box: CropBox, crop: Size) -> Tensor:
    """Cut ``box`` out of a stage mask ``(h, w)`` as ``crop`` (ch, cw) int64, padded with IGNORE."""
    out = torch.full(tuple(crop), IGNORE, dtype=torch.long)
    out[: box.window.height, : box.window.width] = mask[box.window.slices]
    return out


@functools.lru_cache(maxsize=256)
def nearest_indices(src: int, dst: int) -> np.ndarray:
    """The source index of each output pixel of a nearest-exact ``src -> dst`` resize, taken
    from PyTorch's own kernel (``resize_mask``), so masks cut this way are exactly the same."""
    if src == dst:
        return np.arange(dst)
    index = resize(torch.arange(src, dtype=torch.float32).view(1, src, 1), (dst, 1), mode="nearest")
    return index.view(-1).round().long().numpy()
