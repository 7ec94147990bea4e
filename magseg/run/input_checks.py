"""What predict says about an input before its first stage: a raster that lies nowhere (no
georeference), pixels on another scale than the training data's, and whether there is any
valid pixel to segment at all. Each finding is a warning; the input is segmented anyway."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from magseg.geometry import Rect
from magseg.io.raster import RasterReader
from magseg.normalization import SCALE_MIN_PIXELS, ChannelStats, scale_mismatches

# The early look reads the raster decimated to at most this many pixels a side.
OVERVIEW_SIDE = 1024


def early_look(reader: RasterReader, normalize: Callable[[np.ndarray], Tensor],
               mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> tuple[bool, list[str]]:
    """Before any expensive stage: the raster decimated, for the pixel-scale check against
    the training data's ``mean`` and ``std`` and the nodata statistics. Returns whether the
    raster has any valid pixel (a decimated read that finds none is confirmed at full
    resolution, so a small valid area is never missed) and the warnings (``scale_warnings``)."""
    pixels, valid = reader.read_overview(OVERVIEW_SIDE)
    if pixels.dtype.kind == "f":  # valid as the stages see it: finite once normalised
        valid &= torch.isfinite(normalize(pixels)).all(dim=0).numpy()
    observed = ChannelStats(reader.count)  # the valid pixels' statistics, raw units
    if valid.any():
        observed.update(pixels[:, valid])
    warnings = scale_warnings(reader, observed, mean, std)
    if valid.any():
        return True, warnings
    height, width = reader.size
    step = max(1, (64 << 20) // max(1, width * reader.count * 8))  # rows per read: ~64 MB
    return any(reader.read(Rect(r, 0, min(step, height - r), width))[1].any()
               for r in range(0, height, step)), warnings


def georeference_warnings(reader: RasterReader) -> list[str]:
    """A warning for a raster that says nowhere where it lies: its outputs are in pixel
    coordinates (GDAL and pyogrio would each print their own lines about it)."""
    if reader.geo.georeferenced:
        return []
    return [f"{reader.path}: has no georeference (no CRS, transform, GCPs or RPCs), so its "
            "outputs are in pixel coordinates, polygons included, and do not line up with other "
            "data in a GIS; georeference the input first (e.g. gdal_translate -a_srs -a_ullr) "
            "if they must"]


def scale_warnings(reader: RasterReader, observed: ChannelStats, mean: tuple[float, ...] | None,
                   std: tuple[float, ...] | None) -> list[str]:
    """A warning when some band's pixels are on another scale than the training data's
    ``mean`` and ``std`` (``scale_mismatches``): the outputs are written all the same, but
    they are likely wrong. None for fewer than ``SCALE_MIN_PIXELS`` valid pixels, too few to
    judge a scale by, or without the training data's statistics."""
    if observed.pixels < SCALE_MIN_PIXELS or mean is None or std is None:
        return []
    off = scale_mismatches(observed, mean, std)
    if not off:
        return []
    seen_mean, seen_std = observed.result()
    bands = "; ".join(
        f"band {reader.bands[c]} mean {seen_mean[c]:.4g} std {seen_std[c]:.4g}, "
        f"{f'{ratio:.3g} times' if ratio > 1 else f'1/{1 / ratio:.3g} of'} training's "
        f"(mean {mean[c]:.4g} std {std[c]:.4g})"
        for c, ratio in off
    )
    return [
        f"{reader.path}: pixel values on another scale than the model's training data, so the "
        f"classes are likely wrong: {bands}. Check --bands, rescale the input to the training "
        "data's range (e.g. gdal_translate -ot Byte -scale), or train on such data"
    ]
