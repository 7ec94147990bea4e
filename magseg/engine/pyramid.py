"""Scale-pyramid geometry: stage sizes, crop boxes that cover an image, cutting and stitching.

Every stage image of size ``(H, W)`` is tiled with crops of size ``(ch, cw)``. Along each
axis the crops start at ``0, c, 2c, ...`` and the last one is flush with the far edge, so
crops overlap only when the size is not a multiple of the crop. Where two crops overlap the
pixels are split at the middle of the overlap: every pixel is *owned* by exactly one crop,
which is the one that writes it when crops are stitched back. An axis shorter than the crop
gets one crop of the axis' length (the backbone sees it zero-padded to the crop size, which
keeps the magnification the model was trained at).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# How pyramid.scales and pyramid.scene size the stages of any image: config's to say, the
# engine's to use (magseg.engine.pyramid.stage_sizes, as callers name it).
from magseg.config import stage_sizes  # noqa: F401
from magseg.engine.opencv import can_enlarge, enlarge_planes
from magseg.geometry import Rect

Size = tuple[int, int]


@dataclass(frozen=True, slots=True)
class CropBox:
    """A crop of a stage image: its ``window``, and ``owned``, the part of it the crop owns.

    ``window``: clipped to the image (so its height may be smaller than the crop size when
    the image is). ``owned``: in image coordinates, always inside the window.
    """

    window: Rect
    owned: Rect

    @classmethod
    def whole(cls, window: Rect) -> CropBox:
        """A crop that owns all of its ``window``."""
        return cls(window, window)

    @property
    def owned_in_crop(self) -> tuple[slice, slice]:
        """The owned region's slices in the crop's own coordinates."""
        return self.owned.within(self.window)


def axis_tiles(length: int, crop: int) -> list[tuple[int, int, int, int]]:
    """Tiles of one axis as ``(start, size, own_start, own_end)``."""
    if length <= crop:
        return [(0, length, 0, length)]
    count = math.ceil(length / crop)
    starts = [i * crop for i in range(count - 1)] + [length - crop]
    tiles = []
    for i, start in enumerate(starts):
        own_start = 0 if i == 0 else tiles[-1][3]
        if i == count - 1:
            own_end = length
        else:
            nxt = starts[i + 1]
            # Split the overlap [nxt, start + crop) at its middle: pixels nearer a crop's
            # centre have more context in that crop.
            own_end = (nxt + start + crop) // 2 if nxt < start + crop else start + crop
        tiles.append((start, crop, own_start, own_end))
    return tiles


def crop_boxes(size: Size, crop: Size) -> list[CropBox]:
    """Crop boxes covering an image of ``size`` (H, W), row-major; owned regions partition it."""
    (h, w), (ch, cw) = size, crop
    if min(h, w) < 1:
        raise ValueError(f"cannot tile an empty image of size {size}")
    boxes = []
    for top, height, own_top, own_bottom in axis_tiles(h, ch):
        for left, width, own_left, own_right in axis_tiles(w, cw):
            boxes.append(CropBox(Rect(top, left, min(height, h), min(width, w)),
                                 Rect(own_top, own_left, own_bottom - own_top, own_right - own_left)))
    return boxes


def resize(x: Tensor, size: Size, mode: str = "bilinear") -> Tensor:
    """Resize ``(B, C, H, W)`` or ``(C, H, W)`` to ``size``; antialiased when shrinking.
    Enlarging float32 maps on a CPU outside autograd takes ``magseg.engine.opencv.
    enlarge_planes``: the same values up to float rounding.

    ``align_corners=False`` throughout, so pixel centres map onto pixel centres.
    """
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    if tuple(x.shape[-2:]) != tuple(size):
        if mode == "nearest":
            x = F.interpolate(x, size=size, mode="nearest-exact")
        elif mode == "bilinear" and can_enlarge(x, size):  # inference on a CPU: OpenCV's, faster
            x = enlarge_planes(x, size)
        else:
            shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
            x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=shrink)
    return x.squeeze(0) if squeeze else x


def extract_windows(image: Tensor, windows: list[Rect]) -> Tensor:
    """Cut equally sized ``windows`` out of ``image`` (C, H, W) as ``(B, C, h, w)``.

    Windows may reach past any border; what lies outside the image is zero (the mean colour,
    after normalisation).
    """
    bounds = Rect.of_size(image.shape[-2:])
    h, w = windows[0].size
    # Zero-filling is a whole extra pass over the batch; skip it when every window is filled.
    inside = all(bounds.contains(window) for window in windows)
    out = (image.new_empty if inside else image.new_zeros)((len(windows), image.shape[0], h, w))
    for i, window in enumerate(windows):
        if window.size != (h, w):
            raise ValueError(f"windows must share one size, got {(h, w)} and {window.size}")
        part = window.intersection(bounds)
        if not part.empty:
            out[(i, slice(None), *part.within(window))] = image[(slice(None), *part.slices)]
    return out


def crop_windows(boxes: list[CropBox], crop: Size) -> list[Rect]:
    """The full crop-sized window of each box (reaching past the image when it is smaller)."""
    return [Rect(b.window.top, b.window.left, crop[0], crop[1]) for b in boxes]


def extract_crops(image: Tensor, boxes: list[CropBox], crop: Size) -> Tensor:
    """Cut ``boxes`` out of ``image`` (C, H, W) as a batch ``(B, C, ch, cw)``.

    Windows smaller than the crop (image smaller than the crop) are zero-padded at the
    bottom and right.
    """
    return extract_windows(image, crop_windows(boxes, crop))


def context_windows(windows: list[Rect], ratio: float) -> list[Rect]:
    """FCtL's context windows: ``ratio`` times each window's extent, centred on it.

    A window of size ``(h, w)`` gets the window of size ``(round(ratio * h), round(ratio *
    w))`` with the same centre (rounded down to whole pixels); parts outside the image are
    padded by ``extract_windows``.
    """
    out = []
    for r in windows:
        ch, cw = round(ratio * r.height), round(ratio * r.width)
        out.append(Rect(r.top - (ch - r.height) // 2, r.left - (cw - r.width) // 2, ch, cw))
    return out


def stitch_crops(dest: Tensor, crops: Tensor, boxes: list[CropBox]) -> Tensor:
    """Write the owned region of each crop ``(B, C, ch, cw)`` into ``dest`` (C, H, W), in place."""
    for crop, box in zip(crops, boxes):
        dest[(slice(None), *box.owned.slices)] = crop[(slice(None), *box.owned_in_crop)]
    return dest


def owned_mask(boxes: list[CropBox], crop: Size, device: torch.device | None = None) -> Tensor:
    """``(B, ch, cw)`` bool: True on the pixels each crop owns (False on padding and overlap
    given to a neighbour)."""
    mask = torch.zeros((len(boxes), crop[0], crop[1]), dtype=torch.bool, device=device)
    for i, box in enumerate(boxes):
        mask[(i, *box.owned_in_crop)] = True
    return mask


def grown_extent(length: int, crop: int, margin: int) -> int:
    """The window a crop's backbone sees along an axis of ``length``: the crop and ``margin``
    pixels each side, no longer than the axis (only real pixels), and the crop itself when
    the axis is no longer than a crop (one crop, zero-padded as without a margin)."""
    if margin <= 0 or length <= crop:
        return crop
    return min(crop + 2 * margin, length)


def _grown_start(start: int, length: int, crop: int, margin: int) -> int:
    """Where the grown window of a crop starting at ``start`` begins: ``margin`` before it,
    moved inside the axis where that would leave it (the margin then all on the inner side)."""
    extent = grown_extent(length, crop, margin)
    if extent == crop:
        return start
    return min(max(start - margin, 0), length - extent)


def grown_windows(boxes: list[CropBox], crop: Size, size: Size, margin: Size
                  ) -> tuple[list[Rect], list[tuple[int, int]], Size]:
    """The windows the backbone sees for ``boxes`` of a stage of ``size`` with ``margin``
    ``(my, mx)`` stage pixels of context: ``(windows, offsets, extent)``.

    Every window has the one ``extent`` (``grown_extent`` per axis, the same for every crop of
    a stage, so crops batch), lies inside the stage image wherever the image is at least that
    large, and holds its crop at ``offsets[i]`` ``(dy, dx)``. Without a margin these are the
    crops' own windows (``crop_windows``) at offset 0.
    """
    (h, w), (ch, cw), (my, mx) = size, crop, margin
    extent = (grown_extent(h, ch, my), grown_extent(w, cw, mx))
    windows, offsets = [], []
    for b in boxes:
        top, left = _grown_start(b.window.top, h, ch, my), _grown_start(b.window.left, w, cw, mx)
        windows.append(Rect(top, left, *extent))
        offsets.append((b.window.top - top, b.window.left - left))
    return windows, offsets, extent


def grown_input(input_size: Size, crop: Size, extent: Size) -> Size:
    """The backbone input for a window of ``extent``: ``input_size`` scaled as the window is
    to the crop, so the magnification is the one the backbone was trained at (exactly when
    ``margin * input / crop`` is whole)."""
    return tuple(round(i * e / c) for i, e, c in zip(input_size, extent, crop))


def cut_crops(windows: Tensor, offsets: list[tuple[int, int]], crop: Size) -> Tensor:
    """Each crop's own part ``(B, C, ch, cw)`` of its grown window ``(B, C, eh, ew)``."""
    if tuple(windows.shape[-2:]) == tuple(crop):
        return windows
    return torch.stack([w[:, dy : dy + crop[0], dx : dx + crop[1]] for w, (dy, dx) in zip(windows, offsets)])
