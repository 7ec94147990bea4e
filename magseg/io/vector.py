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
import glob
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import shapes

from magseg.errors import MagsegError, WriteError
from magseg.geometry import Rect
from magseg.io.raster import VALUE_MAX, gdal_window
from magseg.io.vector_formats import VECTOR_FORMATS, VECTOR_OPTIONS_TAG, VectorOptions, options_tag

LAYER = "classes"
# Pixels per strip (256 rows of a 16384 px wide raster): one strip's polygons are made at
# once. Beyond the strip, memory holds the regions that cross its border: a road network
# connected across the whole raster is held until its last strip.
STRIP_PIXELS = 1 << 22
# Features handed to pyogrio per append.
FLUSH_EVERY = 20_000
# GeoPackage 1.2: GDAL's default (1.4 since GDAL 3.7) makes GDAL 3.6 and older warn that the
# file "may be only partially supported"; nothing here needs a later version.
GPKG_VERSION = "1.2"
# The table QGIS reads a GeoPackage layer's default style from (and writes it to).
STYLES_LAYER = "layer_styles"


class VectorError(MagsegError):
    """The class map could not be polygonised or written."""


class VectorWriteError(VectorError, WriteError):
    """The polygons could not be written (``path``: the file being written), e.g. a full
    disk: magseg.io.atomic names the output and says whether the disk is full."""


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
        self.options = {"VERSION": GPKG_VERSION} if driver == "GPKG" else None
        self.path, self.driver, self.crs, self.names = path, driver, crs, names
        # GDAL picks the layout by the name: FlatGeobuf makes a directory of layers for a
        # name without ``.fgb`` (magseg's temporary names end in ``.partial``). Written under
        # a name with the format's suffix, renamed to ``path`` when finished (``finish``).
        suffix = next(f.suffix for f in VECTOR_FORMATS.values() if f.driver == driver)
        self.gdal_path = path if path.suffix.lower() == suffix else path.with_name(path.name + suffix)
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
                # A class map without a CRS: predict's record says so, once.
                warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)
                pyogrio.raw.write(
                    str(self.gdal_path), shapely.to_wkb(geometries), columns, fields,
                    layer=LAYER, driver=self.driver, geometry_type="MultiPolygon", promote_to_multi=True,
                    crs=self.crs, append=self.started,
                    layer_metadata=None if self.started else self.metadata,
                    dataset_options=None if self.started else self.options,
                )
        except Exception as exc:  # pyogrio/GDAL errors of any kind: disk full, driver refusal
            raise VectorWriteError(f"cannot write polygons to {self.path}: {exc}", path=self.path) from exc
        self.started = True
        self.geometries.clear()
        self.values.clear()
        if self.confidence is not None:
            self.confidence.clear()

    def finish(self) -> None:
        """Write what is buffered and put the file at ``path``."""
        self.flush(final=True)
        if self.gdal_path != self.path:
            os.replace(self.gdal_path, self.path)

    def discard(self) -> None:
        """Remove the file of a write that failed (``path`` is its caller's to remove)."""
        if self.gdal_path != self.path:
            for leftover in (self.gdal_path, *self.gdal_path.parent.glob(glob.escape(self.gdal_path.name) + "-*")):
                with contextlib.suppress(OSError):
                    leftover.unlink()


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
    from magseg.errors import RasterError
    from magseg.io.raster import open_raster

    try:
        return open_raster(labels)  # also a name that is not UTF-8
    except RasterError as exc:
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


def vector_style(names: Sequence[str], colors: Sequence[tuple[int, int, int]]) -> str:
    """A QGIS style (QML) for the ``classes`` layer: polygons filled with their class's
    colour (categorised on ``class_id``), labelled by class name in the legend."""
    from xml.etree import ElementTree as ET

    qgis = ET.Element("qgis", version="3.28", styleCategories="Symbology")
    renderer = ET.SubElement(qgis, "renderer-v2", type="categorizedSymbol", attr="class_id",
                             symbollevels="0", enableorderby="0", forceraster="0")
    categories = ET.SubElement(renderer, "categories")
    symbols = ET.SubElement(renderer, "symbols")
    for i, (name, (r, g, b)) in enumerate(zip(names, colors)):
        ET.SubElement(categories, "category", value=str(i), label=name, symbol=str(i), render="true")
        symbol = ET.SubElement(symbols, "symbol", type="fill", name=str(i), alpha="1",
                               clip_to_extent="1", force_rhr="0")
        layer = ET.SubElement(symbol, "layer", {"class": "SimpleFill", "enabled": "1", "locked": "0",
                                                "pass": "0"})
        props = {"color": f"{r},{g},{b},255", "outline_color": "35,35,35,255", "outline_style": "solid",
                 "outline_width": "0.1", "outline_width_unit": "MM", "style": "solid"}
        option = ET.SubElement(layer, "Option", type="Map")  # QGIS >= 3.26
        for k, v in props.items():
            ET.SubElement(option, "Option", type="QString", name=k, value=v)
        for k, v in props.items():  # earlier QGIS 3 reads these
            ET.SubElement(layer, "prop", k=k, v=v)
    ET.indent(qgis)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(qgis, "unicode") + "\n"


def _write_style(path: Path, qml: str) -> None:
    """``qml`` as the default style of the ``classes`` layer of the GeoPackage at ``path``:
    a row of QGIS's ``layer_styles`` table, which QGIS applies when it opens the layer."""
    import datetime

    import pyogrio.raw

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    row = {"f_table_catalog": "", "f_table_schema": "", "f_table_name": LAYER, "f_geometry_column": "geom",
           "styleName": "magseg classes", "styleQML": qml, "styleSLD": "", "useAsDefault": True,
           "description": "class colours and names (magseg)", "owner": "", "ui": "", "update_time": now}
    try:
        with warnings.catch_warnings():
            # The temporary name again (see _Writer.flush), as GDAL words it when reopening.
            warnings.filterwarnings("ignore", "The filename extension should be", RuntimeWarning)
            warnings.filterwarnings("ignore", ".*non conformant file extension", RuntimeWarning)
            pyogrio.raw.write(str(path), None, [np.asarray([v]) if isinstance(v, bool) else
                                                np.asarray([v], dtype=object) for v in row.values()],
                              list(row), layer=STYLES_LAYER, driver="GPKG")
    except Exception as exc:  # pyogrio/GDAL errors of any kind
        raise VectorError(f"cannot write the layer style to {path}: {exc}") from exc


def polygonize(labels: str | Path, out: str | Path, class_names: Sequence[str],
               options: VectorOptions = VectorOptions(),
               metadata: Mapping[str, str] | None = None,
               colors: Sequence[tuple[int, int, int]] | None = None,
               uncertainty: str | Path | None = None) -> VectorSummary:
    """Polygonise the class map ``labels`` (one band of class ids; its nodata left out) into
    the vector file ``out`` (one layer ``classes``: ``class_id``, ``class_name``, ``area``).

    Args:
        class_names: names of class ids ``0..n-1`` (ids beyond get their number as name).
        metadata: the layer's metadata (e.g. magseg.io.provenance tags; GeoPackage keeps it).
        colors: the classes' colours: a GeoPackage gets them as the layer's QGIS style
            (``layer_styles``).
        uncertainty: predict's uncertainty raster of the same grid (``(1 - certainty) x
            VALUE_MAX``): each polygon then also carries ``mean_confidence`` and
            ``min_confidence``, the mean and least certainty (top-1 minus top-2
            probability) of its pixels, so polygons can be filtered by trust.
    Returns:
        the polygon count and the total area per class written.
    Raises:
        VectorError: the raster cannot be read or the file cannot be written.
    """
    driver = VECTOR_FORMATS[options.format].driver
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
        try:
            # The parts of the previous strip that touch its bottom row, with their groups.
            open_parts: list[tuple[shapely.Polygon, _Group]] = []
            for top, bottom in _strips(height, rows):
                window = gdal_window(Rect(top, 0, bottom - top, width))
                strip = src.read(1, window=window)
                confidence = None if conf_src is None else \
                    1 - conf_src.read(1, window=window).astype(np.float64) / VALUE_MAX
                groups, touching = _group_strip(strip, top, height, nodata, open_parts, confidence)
                # A group is finished when none of its parts reaches into the next strip.
                for group in _finished(groups, touching):
                    _write_region(group, transform, options, writer, summary)
                open_parts = [(part, group.root()) for part, group in touching]
            writer.finish()
        except BaseException:
            writer.discard()
            raise
    if colors is not None and driver == "GPKG":
        _write_style(Path(out), vector_style(class_names, colors))
    return summary


# The layer metadata that records the polygon options a layer was made with (predict and
# ``magseg vectorize`` make a layer again when they differ).
def class_names(tags: Mapping[str, str]) -> list[str]:
    """The class names of a class map from its tags (predict writes ``MAGSEG_CLASSES``, and
    ``CLASS_<id>`` for other tools); none when it has neither (ids are then the names)."""
    import json

    try:
        classes = json.loads(tags.get("MAGSEG_CLASSES", "[]"))
        names = {int(c["id"]): str(c["name"]) for c in classes}
    except (ValueError, TypeError, KeyError):
        names = {}
    names = names or {int(k[6:]): v for k, v in tags.items() if k.startswith("CLASS_") and k[6:].isdigit()}
    return [names.get(i, str(i)) for i in range(max(names) + 1)] if names else []


@dataclass
class VectorizeResult:
    """One class map's outcome in ``magseg vectorize``: ``status`` ``ok``, ``skipped`` (the
    layer there was made from this class map with these options) or ``failed``."""

    input: Path
    output: Path
    status: str
    seconds: float = 0.0
    polygons: int | None = None
    area: dict[str, float] | None = None  # per class name, CRS units squared
    error: str | None = None

    def to_record(self) -> dict:
        return {"input": str(self.input), "output": str(self.output), "status": self.status,
                "seconds": round(self.seconds, 3), "polygons": self.polygons, "area": self.area,
                "error": self.error}


def vectorize(labels: str | Path, out_dir: str | Path | None, options: VectorOptions,
              overwrite: bool = False) -> VectorizeResult:
    """The polygons of the class map ``labels`` as ``<out_dir>/<stem><suffix>`` (beside the
    class map when ``out_dir`` is None), with the class map's provenance tags and the
    options in the layer's metadata, written atomically (magseg.io.atomic).

    An existing layer made from this class map (same provenance) with the same options is
    kept (``skipped``); one magseg made otherwise is replaced; any other file there fails
    the class map unless ``overwrite``.

    Raises:
        MagsegError: the class map cannot be read, the file is in the way, or it cannot be
            written (WriteError).
    """
    import time

    from magseg.io.atomic import atomic_write
    from magseg.io.provenance import Provenance, output_tags

    start = time.perf_counter()
    labels = Path(labels)
    target = Path(out_dir or labels.parent) / (labels.stem + VECTOR_FORMATS[options.format].suffix)
    result = VectorizeResult(labels, target, "ok")
    with _open_class_map(labels) as src:
        tags = dict(src.tags())
        if src.count != 1 or src.dtypes[0] not in ("uint8", "uint16", "int16", "int32", "uint32"):
            raise VectorError(f"{labels}: not a class map (one band of integer class ids); it has "
                              f"{src.count} band(s) of {src.dtypes[0]}")
    provenance = Provenance.from_tags(tags)
    metadata = {**(provenance.tags() if provenance else {}), VECTOR_OPTIONS_TAG: options_tag(options)}
    replace = overwrite
    if target.exists() and not overwrite:
        theirs = output_tags(target)
        if theirs is None or VECTOR_OPTIONS_TAG not in theirs:
            raise VectorError(f"{target} is in the way: it is not a layer magseg made; move it away, "
                              "or pass --overwrite to replace it")
        if all(theirs.get(k) == v for k, v in metadata.items()):
            result.status = "skipped"
            result.seconds = time.perf_counter() - start
            return result
        replace = True  # magseg's layer, of another class map or with other options
    Path(target.parent).mkdir(parents=True, exist_ok=True)
    names = class_names(tags)
    with atomic_write(target, replace) as temporary:
        summary = polygonize(labels, temporary, names, options, metadata=metadata)
    result.polygons = summary.polygons
    result.area = {(names[i] if i < len(names) else str(i)): a for i, a in sorted(summary.area.items())}
    result.seconds = time.perf_counter() - start
    return result
