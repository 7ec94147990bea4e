"""Tiny GeoTIFFs (and other rasters) with a real CRS and transform, made inside a test.

    from geotiff import write_raster, smooth_image, UTM33

    path = write_raster(tmp_path / "a.tif", smooth_image(3, 150, 170))
    src = rasterio.open(path)   # EPSG:32633, 10 m pixels, origin (500000, 5000000)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning

UTM33 = CRS.from_epsg(32633)
# 10 m pixels, north-up, somewhere in UTM zone 33N.
TRANSFORM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0)


def write_raster(
    path: str | Path,
    array: np.ndarray,
    *,
    crs: CRS | str | None = UTM33,
    transform=TRANSFORM,
    nodata: float | None = None,
    driver: str = "GTiff",
    tiled: bool = False,
    **options,
) -> Path:
    """Write ``array`` ``(C, H, W)`` (any dtype GDAL takes) as one raster file.

    ``crs=None, transform=None`` makes a raster without georeference; ``driver`` picks the
    format (``PNG``, ``JPEG``, ``JP2OpenJPEG``); ``options`` are GDAL creation options.
    """
    path = Path(path)
    count, height, width = array.shape
    profile = dict(driver=driver, width=width, height=height, count=count, dtype=array.dtype.name,
                   **options)
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    if tiled:
        profile.update(tiled=True, blockxsize=16, blockysize=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(array)
    return path


def smooth_image(
    bands: int, height: int, width: int, *, cell: int = 8, seed: int = 0, dtype=np.uint8
) -> np.ndarray:
    """``(bands, H, W)`` smooth random colour fields (blobs about ``cell`` px across) in
    0..255, cast to ``dtype``: images whose segmentation depends on the content."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(bands, height // cell + 3, width // cell + 3)).astype(np.float32)
    big = [cv2.resize(b, ((width // cell + 3) * cell, (height // cell + 3) * cell),
                      interpolation=cv2.INTER_CUBIC) for b in base]
    image = np.stack([b[cell : cell + height, cell : cell + width] for b in big])
    return np.clip(127.5 + 70 * image, 0, 255).astype(dtype)


def read_raster(path: str | Path) -> tuple[np.ndarray, dict]:
    """``(array (C, H, W), profile)`` of a whole (small) raster, plus ``colormap``, ``tags``,
    ``descriptions``, ``scales``, ``masks`` and ``overviews`` of band 1 in the profile."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            profile = dict(src.profile)
            try:
                profile["colormap"] = src.colormap(1)
            except ValueError:
                profile["colormap"] = None
            profile["tags"] = src.tags()
            profile["descriptions"] = src.descriptions
            profile["scales"] = src.scales
            profile["masks"] = src.read_masks()
            profile["overviews"] = src.overviews(1)
            profile["mask_flags"] = src.mask_flag_enums
            profile["layout"] = src.tags(ns="IMAGE_STRUCTURE")
            return src.read(), profile
