"""Areas of interest: predict only the part of a raster a bounding box or polygons cover.

``--bbox minx,miny,maxx,maxy`` (in ``--bbox-crs``, the raster's CRS by default) or
``--aoi shapes.geojson`` (any vector file pyogrio reads, in its own CRS). The raster is read,
segmented and written only over the AOI's bounding window, clipped to the raster; the
outputs' transform and size are that window's, and pixels outside the AOI's polygons are
nodata.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.features import geometry_mask
from rasterio.warp import transform_geom
from rasterio.windows import from_bounds

from magseg.errors import ConfigError, RasterError
from magseg.geometry import Rect


@dataclass(frozen=True)
class AreaOfInterest:
    """GeoJSON-like polygons (``{"type": "Polygon", ...}``) in ``crs`` (None: the raster's)."""

    geometries: tuple[dict[str, Any], ...]
    crs: str | None = None
    source: str = "--bbox"

    def in_crs(self, crs: CRS | None, raster: str | Path) -> list[dict[str, Any]]:
        """The polygons in the raster's CRS ``crs``."""
        if self.crs is None:
            return list(self.geometries)
        if crs is None:
            raise RasterError(f"{raster}: has no CRS, so the AOI ({self.source}, in {self.crs}) cannot "
                              "be placed on it")
        return [transform_geom(self.crs, crs, g) for g in self.geometries]

    def window(self, transform: Affine, size: tuple[int, int], crs: CRS | None,
               raster: str | Path) -> tuple[Rect, list[dict[str, Any]]]:
        """The raster window ``(row, col)``-aligned that covers the AOI, clipped to the
        raster of ``size`` ``(H, W)``, and the polygons in the raster's CRS.

        Raises:
            RasterError: the AOI does not overlap the raster, or the raster has no transform.
        """
        if transform is None or transform.is_identity:
            raise RasterError(f"{raster}: has no georeference, so an AOI cannot be placed on it")
        shapes = self.in_crs(crs, raster)
        xs, ys = [], []
        for shape in shapes:
            for x, y in _coordinates(shape["coordinates"]):
                xs.append(x)
                ys.append(y)
        window = from_bounds(min(xs), min(ys), max(xs), max(ys), transform)
        row0, col0 = math.floor(window.row_off + 1e-9), math.floor(window.col_off + 1e-9)
        row1 = math.ceil(window.row_off + window.height - 1e-9)
        col1 = math.ceil(window.col_off + window.width - 1e-9)
        row0, col0 = max(row0, 0), max(col0, 0)
        row1, col1 = min(row1, size[0]), min(col1, size[1])
        if row1 <= row0 or col1 <= col0:
            raise RasterError(f"{raster}: the area of interest ({self.source}) lies outside the raster "
                              f"(its bounds in the raster's CRS: {_bounds((min(xs), min(ys), max(xs), max(ys)))}; "
                              f"{self._extent(transform, size, crs)})")
        return Rect(row0, col0, row1 - row0, col1 - col0), shapes


    def _extent(self, transform: Affine, size: tuple[int, int], crs: CRS | None) -> str:
        """The raster's extent, in its CRS, and in the AOI's CRS where that is another."""
        from rasterio.transform import array_bounds
        from rasterio.warp import transform_bounds

        west, south, east, north = array_bounds(size[0], size[1], transform)
        text = f"the raster covers {_bounds((west, south, east, north))}"
        if crs is not None:
            text += f" in {crs.to_string() or 'its CRS'}"
            if self.crs is not None and CRS.from_user_input(self.crs) != crs:
                theirs = transform_bounds(crs, self.crs, west, south, east, north)
                text += f", {_bounds(theirs)} in {self.crs}"
        return text


def _bounds(box: Sequence[float]) -> str:
    """``minx,miny,maxx,maxy`` as --bbox takes it."""
    return ",".join(f"{v:.10g}" for v in box)


def inside(shapes: Sequence[dict[str, Any]], transform: Affine, shape: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` bool: pixels whose centre lies inside the polygons, on a window's grid."""
    return geometry_mask(shapes, out_shape=shape, transform=transform, invert=True)


def _coordinates(nested: Any):
    if isinstance(nested[0], (int, float)):
        yield nested[0], nested[1]
        return
    for item in nested:
        yield from _coordinates(item)


def bbox(text: str, crs: str | None = None) -> AreaOfInterest:
    """``--bbox minx,miny,maxx,maxy`` [``--bbox-crs``] as an AOI.

    Raises:
        ConfigError: not four numbers with min < max, or an unknown CRS.
    """
    try:
        minx, miny, maxx, maxy = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--bbox {text!r}: give minx,miny,maxx,maxy (four numbers)") from None
    if not all(map(math.isfinite, (minx, miny, maxx, maxy))) or minx >= maxx or miny >= maxy:
        raise ConfigError(f"--bbox {text!r}: needs minx < maxx and miny < maxy")
    polygon = {"type": "Polygon", "coordinates": [[(minx, miny), (maxx, miny), (maxx, maxy),
                                                   (minx, maxy), (minx, miny)]]}
    return AreaOfInterest((polygon,), _crs(crs, "--bbox-crs"), f"--bbox {text}")


def from_file(path: str | Path) -> AreaOfInterest:
    """The polygons of a vector file (GeoJSON, GeoPackage, ...) as an AOI, in its CRS.

    Raises:
        ConfigError: unreadable, or no polygons in it.
    """
    import pyogrio.raw
    import shapely

    try:
        meta, _, geometries, _ = pyogrio.raw.read(path, read_geometry=True, columns=[])
    except Exception as exc:  # pyogrio raises its own DataSourceError, OSError, ...
        raise ConfigError(f"--aoi {path}: cannot read it as a vector file ({exc})") from None
    shapes = [shapely.geometry.mapping(g) for g in shapely.from_wkb(geometries)
              if g is not None and shapely.get_type_id(g) in (3, 6)]  # Polygon, MultiPolygon
    if not shapes:
        raise ConfigError(f"--aoi {path}: holds no polygons")
    return AreaOfInterest(tuple(shapes), meta["crs"] or "EPSG:4326", f"--aoi {path}")


def _crs(text: str | None, flag: str) -> str | None:
    if text is None:
        return None
    try:
        # Inside an Env, GDAL's errors reach rasterio's handler (and this exception) instead
        # of being printed as an "ERROR 1: PROJ: ..." line before magseg's own.
        with rasterio.Env():
            return CRS.from_user_input(text).to_string()
    except (CRSError, ValueError) as exc:  # ValueError: "EPSG:" followed by no number
        raise ConfigError(f"{flag} {text!r}: not a CRS GDAL knows ({exc}); e.g. EPSG:4326") from None
