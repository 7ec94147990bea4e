"""Class maps to polygons, streamed: one polygon per connected region of a class, with its
class id, class name and area, written with pyogrio (GeoPackage, FlatGeobuf or GeoJSON).

    labels raster --strips of rows--> rasterio.features.shapes (pixel coordinates)
        regions touching the border between two strips are joined to the regions of the
        next strip they share an edge with (same class); a group is finished when none of
        its parts reaches the strip below, then unioned, moved to the raster's CRS, filtered
        by --min-area, simplified, and appended to the layer

Memory holds one strip and the regions that cross the current strip border, not the
raster (scripts/bench_vector.py measures it).

pyogrio rather than fiona: it writes whole arrays of WKB geometries and columns per call
(shapely 2 makes them in bulk), where fiona goes feature by feature through Python dicts.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import shapes
from rasterio.windows import Window

from magseg.errors import MagsegError

# --vector FORMAT -> (OGR driver, file suffix).
VECTOR_FORMATS = {"gpkg": ("GPKG", ".gpkg"), "fgb": ("FlatGeobuf", ".fgb"), "geojson": ("GeoJSON", ".geojson")}
LAYER = "classes"
# Pixels per strip (256 rows of a 16384 px wide raster): one strip's polygons are made at
# once. Beyond the strip, memory holds the regions that cross its border: a road network
# connected across the whole raster is held until its last strip.
STRIP_PIXELS = 1 << 22
# Features handed to pyogrio per append.
FLUSH_EVERY = 20_000


class VectorError(MagsegError):
    """The class map could not be polygonised or written."""


@dataclass(frozen=True)
class VectorOptions:
    """``min_area``: polygons smaller than this (CRS units squared, m² when projected) are
    dropped. ``simplify``: Douglas-Peucker tolerance in CRS units (0: exact pixel edges;
    polygons are simplified one by one, so neighbours may no longer share edges exactly)."""

    format: str = "gpkg"
    min_area: float = 0.0
    simplify: float = 0.0
    strip_rows: int | None = None  # None: STRIP_PIXELS // width

    def __post_init__(self) -> None:
        if self.format not in VECTOR_FORMATS:
            raise ValueError(f"unknown vector format {self.format!r}; choose {', '.join(VECTOR_FORMATS)}")
        if not (math.isfinite(self.min_area) and self.min_area >= 0):
            raise ValueError(f"--min-area must be a number >= 0, got {self.min_area}")
        if not (math.isfinite(self.simplify) and self.simplify >= 0):
            raise ValueError(f"--simplify must be a number >= 0, got {self.simplify}")
        if self.strip_rows is not None and self.strip_rows < 1:
            raise ValueError(f"strip_rows must be >= 1, got {self.strip_rows}")


@dataclass
class VectorSummary:
    """What ``polygonize`` wrote: polygon count and area per class id (after ``min_area``)."""

    polygons: int = 0
    area: dict[int, float] = field(default_factory=dict)


@dataclass(eq=False)
class _Group:
    """Parts of one region (pixel coordinates); ``into`` is the group it was merged into.
    ``confidence``: its pixels' (count, sum, minimum) confidence, when there is a raster of it."""

    value: int
    parts: list[shapely.Polygon]
    into: "_Group | None" = None
    confidence: tuple[int, float, float] | None = None

    def add_confidence(self, stats: tuple[int, float, float] | None) -> None:
        if stats is not None:
            mine = self.confidence or (0, 0.0, math.inf)
            self.confidence = (mine[0] + stats[0], mine[1] + stats[1], min(mine[2], stats[2]))

    def root(self) -> "_Group":
        group = self
        while group.into is not None:
            group = group.into
        return group


def _strips(height: int, rows: int) -> Iterator[tuple[int, int]]:
    for top in range(0, height, rows):
        yield top, min(height, top + rows)


def _strip_polygons(labels: np.ndarray, top: int, nodata: int | None) -> list[tuple[int, shapely.Polygon]]:
    """``(class id, polygon in pixel coordinates)`` of every 4-connected region of a strip
    whose first row is row ``top`` of the raster."""
    mask = None if nodata is None else labels != nodata
    return [(int(value), shapely.geometry.shape(geom))
            for geom, value in shapes(labels, mask=mask, connectivity=4,
                                      transform=Affine.translation(0, top))]


def _strip_regions(labels: np.ndarray, top: int, nodata: int | None, confidence: np.ndarray
                   ) -> list[tuple[int, shapely.Polygon, tuple[int, float, float]]]:
    """``_strip_polygons`` with each region's (pixel count, summed and minimum confidence)
    from ``confidence`` ``(rows, W)`` in [0, 1]: the strip's 4-connected regions of one
    class are labelled (OpenCV), and their polygons traced from the region ids."""
    import cv2

    ids = np.zeros(labels.shape, np.int32)
    classes = [0]  # class of each region id (id 0: none)
    for value in np.unique(labels):
        if nodata is not None and value == nodata:
            continue
        count, comp = cv2.connectedComponents((labels == value).astype(np.uint8), connectivity=4,
                                              ltype=cv2.CV_32S)
        inside = comp > 0
        ids[inside] = comp[inside] + len(classes) - 1
        classes += [int(value)] * (count - 1)
    n = len(classes)
    flat, conf = ids.ravel(), confidence.ravel().astype(np.float64)
    counts = np.bincount(flat, minlength=n)
    sums = np.bincount(flat, weights=conf, minlength=n)
    mins = np.full(n, math.inf)
    np.minimum.at(mins, flat, conf)
    return [(classes[int(i)], shapely.geometry.shape(geom), (int(counts[int(i)]), float(sums[int(i)]),
                                                             float(mins[int(i)])))
            for geom, i in shapes(ids, mask=ids > 0, connectivity=4, transform=Affine.translation(0, top))]


def _to_crs(geometry: shapely.Geometry, transform: Affine) -> shapely.Geometry:
    """Pixel coordinates -> the raster's CRS by its affine transform."""
    a, b, c, d, e, f = transform[:6]
    return shapely.transform(geometry, lambda xy: np.column_stack(
        (a * xy[:, 0] + b * xy[:, 1] + c, d * xy[:, 0] + e * xy[:, 1] + f)))


class _Writer:
    """Buffers finished polygons and appends them to the layer ``FLUSH_EVERY`` at a time."""

    def __init__(self, path: Path, driver: str, crs: str | None, names: Sequence[str],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path, self.driver, self.crs, self.names = path, driver, crs, names
        self.metadata = dict(metadata) if metadata else None
        self.geometries: list[shapely.Geometry] = []
        self.values: list[int] = []
        self.confidence: list[tuple[float, float]] | None = None  # (mean, min) per polygon
        self.started = False

    def add(self, geometry: shapely.Geometry, value: int,
            confidence: tuple[int, float, float] | None = None) -> None:
        self.geometries.append(geometry)
        self.values.append(value)
        if self.confidence is not None:
            n, total, low = confidence or (0, 0.0, math.nan)
            self.confidence.append((total / n if n else math.nan, low))
        if len(self.geometries) >= FLUSH_EVERY:
            self.flush()

    def flush(self, final: bool = False) -> None:
        if not self.geometries and (self.started or not final):
            return  # an empty map still gets its (empty) layer, so the file always opens
        import pyogrio.raw

        values = np.asarray(self.values, dtype=np.int32)
        geometries = np.asarray(self.geometries, dtype=object)
        names = np.asarray([self.names[v] if 0 <= v < len(self.names) else str(v) for v in self.values],
                           dtype=object)
        areas = shapely.area(geometries) if len(geometries) else np.zeros(0)
        columns = [values, names, np.asarray(areas, np.float64)]
        fields = ["class_id", "class_name", "area"]
        if self.confidence is not None:
            pairs = np.asarray(self.confidence, np.float64).reshape(-1, 2)
            columns += [pairs[:, 0], pairs[:, 1]]
            fields += ["mean_confidence", "min_confidence"]
        try:
            with warnings.catch_warnings():
                # Written under a temporary name (magseg.io.atomic): GDAL's GPKG driver warns that
                # the name does not end in .gpkg; the published file does.
                warnings.filterwarnings("ignore", "The filename extension should be", RuntimeWarning)
                pyogrio.raw.write(
                    str(self.path), shapely.to_wkb(geometries), columns, fields,
                    layer=LAYER, driver=self.driver, geometry_type="MultiPolygon", promote_to_multi=True,
                    crs=self.crs, append=self.started,
                    layer_metadata=None if self.started else self.metadata,
                )
        except Exception as exc:  # pyogrio/GDAL errors of any kind: disk full, driver refusal
            raise VectorError(f"cannot write polygons to {self.path}: {exc}") from exc
        self.started = True
        self.geometries.clear()
        self.values.clear()
        if self.confidence is not None:
            self.confidence.clear()


def _join(polygon: shapely.Polygon, value: int, top: int,
          open_parts: list[tuple[shapely.Polygon, _Group]], index: shapely.STRtree | None) -> _Group | None:
    """Add ``polygon`` (class ``value``, pixel coordinates) to the group of every open part
    above the strip border ``top`` it shares an edge with, merging those groups; None when
    it continues no region of the previous strip."""
    if index is None or polygon.bounds[1] != top:
        return None
    group: _Group | None = None
    for i in index.query(polygon):
        part, other = open_parts[int(i)]
        other = other.root()
        # Same class and a shared edge (a corner alone is no 4-connection): one region.
        if other.value != value or other is group or shapely.intersection(part, polygon).length == 0:
            continue
        if group is None:
            group = other
            group.parts.append(polygon)
        else:
            group.parts.extend(other.parts)
            group.add_confidence(other.confidence)
            other.parts, other.into, other.confidence = [], group, None
    return group


def _open_class_map(labels: str | Path) -> rasterio.DatasetReader:
    """The class map opened for reading; VectorError when rasterio cannot open it."""
    try:
        return rasterio.open(labels)
    except rasterio.errors.RasterioIOError as exc:
        raise VectorError(f"cannot read class map {labels}: {exc}") from exc


def _group_strip(strip: np.ndarray, top: int, height: int, nodata: int | None,
                 open_parts: list[tuple[shapely.Polygon, _Group]],
                 confidence: np.ndarray | None = None,
                 ) -> tuple[list[_Group], list[tuple[shapely.Polygon, _Group]]]:
    """Join the regions of ``strip`` ``(rows, W)`` class ids (first row: row ``top`` of a
    raster ``height`` rows high) to the open parts of the strip above.

    Returns every group this strip may finish (those of ``open_parts`` and the new ones) and
    the parts that touch the strip's bottom row, with their groups.
    """
    bottom = top + strip.shape[0]
    index = shapely.STRtree([part for part, _ in open_parts]) if open_parts else None
    groups = [group for _, group in open_parts]
    touching: list[tuple[shapely.Polygon, _Group]] = []
    regions = (_strip_regions(strip, top, nodata, confidence) if confidence is not None else
               [(value, polygon, None) for value, polygon in _strip_polygons(strip, top, nodata)])
    for value, polygon, stats in regions:
        group = _join(polygon, value, top, open_parts, index)
        if group is None:
            group = _Group(value, [polygon])
            groups.append(group)
        group.add_confidence(stats)
        if polygon.bounds[3] == bottom and bottom < height:
            touching.append((polygon, group))
    return groups, touching


def _finished(groups: list[_Group], touching: list[tuple[shapely.Polygon, _Group]]) -> list[_Group]:
    """The root groups of ``groups`` that none of the ``touching`` parts continues into the
    next strip, each once, in the order of ``groups`` (the order they are written in)."""
    alive = {id(group.root()) for _, group in touching}
    roots = {id(g.root()): g.root() for g in groups}
    return [group for key, group in roots.items() if key not in alive]


def _write_region(group: _Group, transform: Affine, options: VectorOptions, writer: _Writer,
                  summary: VectorSummary) -> None:
    """Union the parts of a finished group, move it to the CRS by ``transform``, and hand it
    to ``writer`` (counted in ``summary``) unless it is under ``options.min_area``.

    The area is taken before simplifying, so --min-area and the summary see the exact region.
    """
    region = group.parts[0] if len(group.parts) == 1 else shapely.union_all(group.parts)
    region = _to_crs(region, transform)
    area = float(shapely.area(region))
    if area < options.min_area:
        return
    if options.simplify > 0:
        region = shapely.simplify(region, options.simplify, preserve_topology=True)
    writer.add(region, group.value, group.confidence)
    summary.polygons += 1
    summary.area[group.value] = summary.area.get(group.value, 0.0) + area


def polygonize(labels: str | Path, out: str | Path, class_names: Sequence[str],
               options: VectorOptions = VectorOptions(),
               metadata: Mapping[str, str] | None = None,
               uncertainty: str | Path | None = None) -> VectorSummary:
    """Polygonise the class map ``labels`` (one band of class ids; its nodata left out) into
    the vector file ``out`` (one layer ``classes``: ``class_id``, ``class_name``, ``area``).

    Args:
        class_names: names of class ids ``0..n-1`` (ids beyond get their number as name).
        metadata: the layer's metadata (e.g. magseg.io.provenance tags; GeoPackage keeps it).
        uncertainty: predict's uncertainty raster of the same grid (``(1 - certainty) x
            255``): each polygon then also carries ``mean_confidence`` and
            ``min_confidence``, the mean and least certainty (top-1 minus top-2
            probability) of its pixels, so polygons can be filtered by trust.
    Returns:
        the polygon count and the total area per class written.
    Raises:
        VectorError: the raster cannot be read or the file cannot be written.
    """
    driver = VECTOR_FORMATS[options.format][0]
    summary = VectorSummary()
    with _open_class_map(labels) as src, contextlib.ExitStack() as stack:
        conf_src = None if uncertainty is None else stack.enter_context(_open_class_map(uncertainty))
        height, width = src.height, src.width
        transform, nodata = src.transform, src.nodata
        crs = src.crs.to_wkt() if src.crs else None
        rows = options.strip_rows or max(1, STRIP_PIXELS // max(1, width))
        writer = _Writer(Path(out), driver, crs, class_names, metadata)
        if conf_src is not None:
            writer.confidence = []
        # The parts of the previous strip that touch its bottom row, with their groups.
        open_parts: list[tuple[shapely.Polygon, _Group]] = []
        for top, bottom in _strips(height, rows):
            strip = src.read(1, window=Window(0, top, width, bottom - top))
            confidence = None if conf_src is None else \
                1 - conf_src.read(1, window=Window(0, top, width, bottom - top)).astype(np.float64) / 255
            groups, touching = _group_strip(strip, top, height, nodata, open_parts, confidence)
            # A group is finished when none of its parts reaches into the next strip.
            for group in _finished(groups, touching):
                _write_region(group, transform, options, writer, summary)
            open_parts = [(part, group.root()) for part, group in touching]
        writer.flush(final=True)
    return summary
