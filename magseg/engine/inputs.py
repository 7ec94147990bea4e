"""The backbone's inputs: each window of an image at a stage, made at the magnification the
backbone was trained at (``magseg.engine.pyramid.grown_input``).

A stage's window is an image window seen at the stage's size; the backbone sees it resized
once more, to its input. Where the stage shrinks the image by whole factors (the stages
below the image's size of a pyramid of doubling scales over an image those scales divide:
DeepGlobe's 612 and 1224 over 2448 px), the window covers whole source pixels, and its
input is made from them in one antialiased filter: the stage's pixels are never made. That
is one filter instead of two, and a sharper input for it (two triangle filters in a row
blur as one wider one); docs/performance.md#the-backbones-input-and-output.

Training keeps the two filters (``magseg.training.samples``: the window at the stage, then
resized, ``crop_probs``): a backbone trained on one-filter samples scored about a point
lower on the demo, while one-filter inputs cost models trained on two-filter samples
nothing measurable (docs/training.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from magseg.engine.backbone import padded_input
from magseg.engine.fused import can_shrink, shrink_planes
from magseg.engine.pyramid import Size, resize
from magseg.engine.resample import Source, resample_windows, window_pieces
from magseg.geometry import Rect


def backbone_inputs(image: Source, size: Size, windows: list[Rect], input_size: Size, multiple: int = 1, *,
                    compiled: bool = False, reading: bool = False) -> Tensor:
    """The backbone's input ``(B, C_in, ih', iw')`` of each of the equally sized ``windows``
    of ``image`` at the stage ``size``: the window resized to ``input_size``, then padded to
    the backbone's ``multiple`` (``padded_input``, as ``run_backbone`` would).

    Where the stage shrinks the image by whole factors and a window lies inside it
    (``window_pieces``), the window's source pixels are resized to the input in one
    antialiased filter (``F.interpolate``'s, or ``shrink_planes``' to float rounding);
    otherwise the window at the stage (``resample_windows``) is resized to the input.

    Args:
        compiled: the compiled loops for the stage's windows (a stage a compiled pass pays
            for, ``worth_fusing``); reading: for what reads the image itself (a window's
            source pixels, or the image resampled to the stage).
    """
    pieces = window_pieces(image, size, windows)
    # Each window by its own pixels, whatever else its batch holds (a context window may
    # leave the grid where its crop's does not): a crop's input never depends on its batch.
    whole = [i for i, piece in enumerate(pieces) if piece is not None]
    staged = [i for i, piece in enumerate(pieces) if piece is None]
    parts = []
    if whole:
        parts.append((whole, resized_input([pieces[i] for i in whole], input_size, multiple, reading)))
    if staged:
        at_stage = resample_windows(image, size, [windows[i] for i in staged], reading)
        parts.append((staged, resized_input(at_stage, input_size, multiple, compiled)))
    if len(parts) == 1:
        return parts[0][1]
    out = parts[0][1].new_empty((len(windows), *parts[0][1].shape[1:]))
    for rows, batch in parts:
        out[rows] = batch
    return out


def resized_input(maps: Tensor | list[Tensor], input_size: Size, multiple: int = 1, compiled: bool = False) -> Tensor:
    """``maps`` (a batch, or a list of equally sized ``(C, h, w)``) resized to ``input_size``
    and padded to ``multiple``: ``(B, C, ih', iw')``, by the compiled shrink when asked and
    it applies."""
    if compiled and can_shrink(maps, input_size) and tuple(maps[0].shape[-2:]) != tuple(input_size):
        return shrink_planes(maps, input_size, multiple)  # padded as it shrinks
    batch = torch.stack(maps) if isinstance(maps, list) else maps
    return padded_input(resize(batch, input_size), multiple)
