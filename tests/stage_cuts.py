"""Reference cuts of a whole stage image, for tests: what the engine's crop-by-crop windows
(magseg.engine.resample) must equal. The engine itself never makes the whole image."""

from __future__ import annotations

from torch import Tensor

from magseg.engine.pyramid import (
    CropBox,
    Size,
    context_windows,
    crop_windows,
    extract_windows,
)
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
