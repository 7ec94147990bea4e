"""Where to label next: the windows of a batch of rasters where the model is least sure.

Each raster is cut into a grid of ``size x size`` pixel windows (non-overlapping by
construction; windows at the right and bottom edges are clipped). A window's score is the
mean uncertainty (``1 - certainty``, certainty = top-1 minus top-2 probability, with the
checkpoint's temperature) over its valid pixels; windows less than half valid (nodata, or
clipped to under half a window at an edge) are left out. The ``n`` highest windows of the
whole batch are written ranked to a GeoPackage (layer ``to_label``), each with its
predicted class shares, for a labeller to open in QGIS.

The uncertainty comes from ``<stem>_uncertainty.tif`` and ``<stem>.tif`` that ``magseg
predict --uncertainty`` wrote into the predictions directory, when their provenance tags
name this checkpoint and config (magseg.io.provenance); otherwise predict runs into a
scratch directory (removed after). Both are read in strips of one window row, so memory
does not depend on the raster's size.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from magseg.errors import DataError, MagsegError, RasterError
from magseg.geometry import Rect
from magseg.io.atomic import atomic_write
from magseg.io.provenance import Provenance
from magseg.io.raster import NODATA, VALUE_MAX, gdal_window

LAYER = "to_label"
MIN_VALID = 0.5  # a window needs at least this share of a full window's pixels valid
SCORE_NOTE = "mean uncertainty (1 - certainty; certainty = top-1 minus top-2 probability) of the window's valid pixels"


@dataclass(frozen=True)
class Candidate:
    """One ``window`` of one raster, in its pixels."""

    score: float
    raster: int  # index of the raster in the batch
    window: Rect
    valid: float  # valid pixels / a full window's pixels


@dataclass
class RasterPrediction:
    """Where a raster's class map and uncertainty are, and whether predict had to run."""

    raster: Path
    labels: Path
    uncertainty: Path
    reused: bool
    size: int  # window side in pixels
    crs: Any = None
    transform: Any = None


@dataclass
class Suggestion:
    """What ``suggest`` wrote: the ranked windows with their class shares."""

    windows: list[dict[str, Any]] = field(default_factory=list)
    rasters: list[dict[str, Any]] = field(default_factory=list)


def window_size(size: int | None, ground_size: float | None, transform: Any, crs: Any, path: Path) -> int:
    """The window side in pixels: ``size``, or ``ground_size`` (CRS units, metres when
    projected) over the raster's pixel size.

    Raises:
        DataError: ``ground_size`` for a raster with no projected georeference.
    """
    if ground_size is None:
        return int(size or 256)
    if transform is None or transform.is_identity or crs is None or not crs.is_projected:
        raise DataError(f"{path}: --ground-size needs a raster in a projected CRS (metres); "
                        "this one has none: give --size in pixels")
    pixel = math.sqrt(abs(transform.a * transform.e - transform.b * transform.d))
    return max(1, round(ground_size / pixel))


def _matches(path: Path, mine: Provenance) -> bool:
    """``path`` exists and its provenance tags name this model."""
    if not path.is_file():
        return False
    try:
        with rasterio.open(path) as src:
            theirs = Provenance.from_tags(src.tags())
    except rasterio.errors.RasterioIOError:
        return False
    return theirs is not None and theirs.same_model(mine)


def find_prediction(raster: Path, predictions: Path | None, mine: Provenance) -> tuple[Path, Path] | None:
    """``(class map, uncertainty)`` predict wrote for ``raster`` into ``predictions``, when
    both are there and this model's; None otherwise."""
    if predictions is None:
        return None
    stem = raster.stem
    labels, uncertainty = predictions / f"{stem}.tif", predictions / f"{stem}_uncertainty.tif"
    if _matches(labels, mine) and _matches(uncertainty, mine):
        return labels, uncertainty
    return None


def score_windows(uncertainty: Path, size: int) -> Iterator[tuple[float, int, int, int, int, float]]:
    """``(mean uncertainty, row, col, height, width, valid share)`` of every window of the
    ``size`` grid over ``uncertainty`` with at least ``MIN_VALID`` valid, reading one row of
    windows at a time."""
    with rasterio.open(uncertainty) as src:
        height, width = src.height, src.width
        # predict writes (1 - certainty) x VALUE_MAX as uint8 and records the scale back to
        # [0, 1] in the file (GDAL's band scale); a file without one is read as predict's.
        scale = src.scales[0] if src.scales and src.scales[0] not in (0, 1) else 1 / VALUE_MAX
        for top in range(0, height, size):
            rows = min(size, height - top)
            strip_window = gdal_window(Rect(top, 0, rows, width))
            strip = src.read(1, window=strip_window).astype(np.float64) * scale
            valid = src.read_masks(1, window=strip_window) > 0
            for left in range(0, width, size):
                cols = min(size, width - left)
                v = valid[:, left:left + cols]
                share = float(v.sum()) / (size * size) if min(height, width) >= size else float(v.mean())
                if share < MIN_VALID or not v.any():
                    continue
                yield float(strip[:, left:left + cols][v].mean()), top, left, rows, cols, share


def class_shares(labels: Path, window: Rect, classes: int) -> list[float]:
    """Share of each class among the window's labelled pixels (nodata left out)."""
    with rasterio.open(labels) as src:
        ids = src.read(1, window=gdal_window(window))
    ids = ids[ids != NODATA]
    counts = np.bincount(ids.ravel(), minlength=classes)[:classes].astype(np.float64)
    total = counts.sum()
    return [float(c / total) if total else 0.0 for c in counts]


def top_windows(predictions: Sequence[RasterPrediction], n: int) -> list[Candidate]:
    """The ``n`` highest-scoring windows of all rasters, best first (ties: batch order,
    then position)."""
    heap: list[tuple[float, int, int, int, Candidate]] = []
    for index, pred in enumerate(predictions):
        for score, row, col, h, w, valid in score_windows(pred.uncertainty, pred.size):
            # Ties broken towards earlier rasters and positions: -index, -row, -col.
            item = (score, -index, -row, -col, Candidate(score, index, Rect(row, col, h, w), valid))
            if len(heap) < n:
                heapq.heappush(heap, item)
            elif item[:4] > heap[0][:4]:
                heapq.heapreplace(heap, item)
    return [item[-1] for item in sorted(heap, key=lambda it: it[:4], reverse=True)]


def _footprint(pred: RasterPrediction, c: Candidate):
    """The window as a polygon in the raster's CRS (pixel coordinates without one)."""
    import shapely
    from affine import Affine

    t = pred.transform if pred.transform is not None and not pred.transform.is_identity else Affine.identity()
    w = c.window
    corners = [(w.left, w.top), (w.right, w.top), (w.right, w.bottom), (w.left, w.bottom)]
    return shapely.Polygon([t @ xy for xy in corners])


def _common_crs(predictions: Sequence[RasterPrediction]) -> Any:
    """The CRS the layer is written in: the rasters' own when they share one, else WGS 84."""
    crss = {None if p.crs is None else p.crs.to_wkt() for p in predictions}
    if len(crss) == 1:
        return predictions[0].crs if predictions else None
    return rasterio.crs.CRS.from_epsg(4326)


def write_layer(path: Path, predictions: Sequence[RasterPrediction], chosen: Sequence[Candidate],
                class_names: Sequence[str], metadata: dict[str, str], overwrite: bool) -> list[dict[str, Any]]:
    """Write the chosen windows to the GeoPackage ``path`` (atomically); returns their records."""
    import pyogrio.raw
    import shapely
    from rasterio.warp import transform_geom

    crs = _common_crs(predictions)
    records, geometries = [], []
    for rank, c in enumerate(chosen, start=1):
        pred = predictions[c.raster]
        geom = _footprint(pred, c)
        if crs is not None and pred.crs is not None and pred.crs != crs:
            geom = shapely.geometry.shape(transform_geom(pred.crs, crs, shapely.geometry.mapping(geom)))
        shares = class_shares(pred.labels, c.window, len(class_names))
        records.append({"rank": rank, "raster": str(pred.raster), "row": c.window.top, "col": c.window.left,
                        "height": c.window.height, "width": c.window.width, "mean_uncertainty": c.score,
                        "valid_share": c.valid, "dominant_class": class_names[int(np.argmax(shares))],
                        "shares": dict(zip(class_names, shares))})
        geometries.append(geom)
    columns = {k: [r[k] for r in records] for k in
               ("rank", "raster", "row", "col", "height", "width", "mean_uncertainty", "valid_share",
                "dominant_class")}
    for name in class_names:
        columns[f"share_{name}"] = [r["shares"][name] for r in records]
    dtypes = {"rank": np.int32, "row": np.int64, "col": np.int64, "height": np.int32, "width": np.int32,
              "mean_uncertainty": np.float64, "valid_share": np.float64}
    arrays = [np.asarray(v, dtype=dtypes.get(k, np.float64 if k.startswith("share_") else object))
              for k, v in columns.items()]
    with atomic_write(path, overwrite=overwrite) as tmp:
        with warnings.catch_warnings():
            # The temporary name does not end in .gpkg; the published file does.
            warnings.filterwarnings("ignore", "The filename extension should be", RuntimeWarning)
            pyogrio.raw.write(str(tmp), shapely.to_wkb(np.asarray(geometries, dtype=object)), arrays,
                              list(columns), layer=LAYER, driver="GPKG", geometry_type="Polygon",
                              crs=None if crs is None else crs.to_wkt(), layer_metadata=metadata)
    return records


@contextlib.contextmanager
def scratch_directory(near: Path) -> Iterator[Path]:
    """A directory for predictions made on the way, beside ``near``; removed after."""
    path = Path(tempfile.mkdtemp(prefix=".suggest.", suffix=".partial", dir=near))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def prepare(segmenter, raster: Path, predictions: Path | None, scratch: Path, size: int | None,
            ground_size: float | None, run_predict: Callable[[Path, Path], dict[str, Any]]) -> RasterPrediction:
    """The class map and uncertainty of ``raster``: predict's, when they are this model's,
    else made by ``run_predict(raster, scratch)`` (predict with --uncertainty).

    Raises:
        RasterError, DataError: the raster cannot be read or predicted.
    """
    found = find_prediction(raster, predictions, segmenter.provenance)
    reused = found is not None
    if found is None:
        record = run_predict(raster, scratch)
        if record.get("status") == "failed":
            raise RasterError(record.get("error") or f"{raster}: predict failed")
        found = (Path(record["outputs"]["labels"]), Path(record["outputs"]["uncertainty"]))
    labels, uncertainty = found
    with rasterio.open(labels) as src:
        crs, transform = src.crs, src.transform
    side = window_size(size, ground_size, transform, crs, raster)
    return RasterPrediction(raster, labels, uncertainty, reused, side, crs, transform)


def describe_failure(raster: Path, exc: BaseException) -> str:
    return str(exc) if isinstance(exc, MagsegError) else f"{raster}: {type(exc).__name__}: {exc}"
