"""Reference cuts of a whole stage image, for tests: what the engine's crop-by-crop windows
(magseg.engine.resample) and its backbone inputs (magseg.engine.inputs) must equal. The
engine itself never makes the whole image."""

from __future__ import annotations

import torch
from torch import Tensor

from magseg.engine.pyramid import (
    CropBox,
    Size,
    context_windows,
    crop_windows,
    extract_windows,
    resize,
)
from magseg.engine.resample import TensorSource, resample_window
from magseg.geometry import Rect


def backbone_inputs(
    image: Tensor, windows: list[Rect], ratios: tuple[float, ...] = ()
) -> tuple[Tensor, list[Tensor] | None]:
    """The crops ``(B, C, h, w)`` of ``windows`` of ``image`` (C, H, W) and, for a
    multi-context backbone, one batch of context crops ``(B, C, r*h, r*w)`` per ratio ``r``
    (None for a plain backbone), zero beyond the image."""
    crops = extract_windows(image, windows)
    if not ratios:
        return crops, None
    return crops, [extract_windows(image, context_windows(windows, r)) for r in ratios]


def image_windows(stage_image: Tensor, box: CropBox, crop: Size, ratios: tuple[float, ...] = ()
                  ) -> tuple[Tensor, list[Tensor]]:
    """The window ``(C, ch, cw)`` of ``box`` and one context window ``(C, r*ch, r*cw)`` per
    ratio, cut out of a whole stage image."""
    crops, contexts = backbone_inputs(stage_image, crop_windows([box], crop), ratios)
    return crops[0], [c[0] for c in contexts or []]


def window_input(image: Tensor, size: Size, window: Rect, input_size: Size) -> Tensor:
    """The reference backbone input of ``window`` of ``image`` at the stage ``size``: where
    the stage divides the image by whole factors and the window lies inside it, the
    window's source pixels resized to the input; else the window cut from the whole stage
    image (zero past it) and resized."""
    (height, width), (h, w) = image.shape[-2:], size
    if height % h == 0 and width % w == 0 and window.intersection(Rect.of_size(size)) == window:
        f, g = height // h, width // w
        piece = image[:, window.top * f : window.bottom * f, window.left * g : window.right * g]
        return resize(piece, input_size)
    stage = resample_window(TensorSource(image), size, Rect.of_size(size))
    cut = torch.zeros((image.shape[0], *window.size))
    inside = window.intersection(Rect.of_size(size))
    cut[(slice(None), *inside.within(window))] = stage[(slice(None), *inside.slices)]
    return resize(cut, input_size)
