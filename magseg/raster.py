"""Raster reading and writing with rasterio: the only module that knows about windows,
transforms and GDAL.

Bands are 1-based as in GDAL; arrays are ``(C, H, W)``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from magseg.errors import RasterError


def open_raster(path: str | Path):
    """``rasterio.open`` with magseg's errors: a missing, empty or non-raster file raises
    RasterError naming it."""
    path = Path(path)
    if not path.exists():
        raise RasterError(f"{path}: no such file")
    if path.is_dir():
        raise RasterError(f"{path}: is a directory, not a raster")
    if path.stat().st_size == 0:
        raise RasterError(f"{path}: empty file (0 bytes), not a raster")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as exc:
        raise RasterError(f"{path}: not a readable raster ({exc})") from None


def select_bands(path: str | Path, count: int, bands: tuple[int, ...] | None) -> list[int]:
    """Validate 1-based ``bands`` against a raster with ``count`` bands (None = all)."""
    if bands is None:
        return list(range(1, count + 1))
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise RasterError(
            f"{path}: has {count} band(s) but bands {bad} were asked for; "
            f"choose bands among 1..{count} (e.g. --bands {','.join(map(str, range(1, min(count, 3) + 1)))})"
        )
    return list(bands)


def read_array(path: str | Path, bands: tuple[int, ...] | None = None, window: Window | None = None) -> np.ndarray:
    """Read ``bands`` of ``path`` (optionally one window) as ``(C, H, W)`` in its own dtype.

    Raises:
        RasterError: missing, empty, not a raster, truncated/corrupt data, bad band list.
    """
    with open_raster(path) as src:
        indexes = select_bands(path, src.count, bands)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return src.read(indexes, window=window)
        except RasterioIOError as exc:
            raise RasterError(f"{path}: cannot read pixels, file is truncated or corrupt ({exc})") from None
