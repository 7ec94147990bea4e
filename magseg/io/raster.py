"""Raster reading and writing with rasterio: the only module that knows about windows,
transforms and GDAL.

Bands are 1-based as in GDAL; arrays are ``(C, H, W)``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.io
import rasterio.shutil
from affine import Affine
from rasterio._err import CPLE_BaseError
from rasterio.enums import MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from magseg.errors import ConfigError, RasterError, RasterWriteError
from magseg.geometry import Rect
from magseg.io.aoi import AreaOfInterest, inside
from magseg.io.sources import gdal_name, gdal_path, is_virtual


def open_raster(path: str | Path):
    """``rasterio.open`` with magseg's errors: a missing, empty or non-raster file raises
    RasterError naming it. A name GDAL opens that is not a local file (magseg.io.sources) goes
    to GDAL as it is, and its failure carries GDAL's own message."""
    if is_virtual(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return rasterio.open(gdal_name(path))
        except RasterioIOError as exc:
            raise RasterError(f"{path}: cannot be read ({exc})") from None
    path = Path(path)
    if not path.exists():
        raise RasterError(f"{path}: no such file")
    if path.is_dir():
        raise RasterError(f"{path}: is a directory, not a raster")
    if path.stat().st_size == 0:
        raise RasterError(f"{path}: empty file (0 bytes), not a raster")
    # A name that is not UTF-8 is opened through a link with a UTF-8 name (gdal_path),
    # kept while the dataset lives.
    names = contextlib.ExitStack()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            dataset = rasterio.open(names.enter_context(gdal_path(path)))
    except RasterioIOError as exc:
        names.close()
        raise RasterError(f"{path}: not a readable raster ({exc})") from None
    weakref.finalize(dataset, names.close)
    return dataset


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


def read_array(path: str | Path, bands: tuple[int, ...] | None = None, window: Rect | None = None) -> np.ndarray:
    """Read ``bands`` of ``path`` (optionally one window) as ``(C, H, W)`` in its own dtype.

    Raises:
        RasterError: missing, empty, not a raster, truncated/corrupt data, bad band list.
    """
    with open_raster(path) as src:
        indexes = select_bands(path, src.count, bands)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                return src.read(indexes, window=None if window is None else gdal_window(window))
        except RasterioIOError as exc:
            raise RasterError(f"{path}: cannot read pixels, file is truncated or corrupt ({exc})") from None


# --------------------------------------------------------------------------------------------
# Windows: where a raster is read and written, in pixel coordinates (row, col), (H, W) sizes.

# Output tile size of the streamed GeoTIFFs (GDAL's default for tiled GTiff). Scene windows
# write whole tiles, so window cores are whole multiples of it: a smaller tile wastes less of
# the scene on margin. DeepGlobe's 2448 px scene with its 306 px minimum margin keeps a
# 1792 px core with 256 px tiles but only 1536 px with 512 px tiles: 1.36x more windows.
BLOCK = 256
# Cloud-optimised outputs are re-tiled on conversion: 512 is what COG readers are tuned for.
COG_BLOCK = 512


def gdal_window(rect: Rect) -> Window:
    """``rect`` as rasterio's window (column first), for GDAL's reads and writes."""
    return Window(rect.left, rect.top, rect.width, rect.height)


CACHE_BYTES = 64 * 1024 * 1024


@contextlib.contextmanager
def io_env(cache_bytes: int = CACHE_BYTES) -> Iterator[None]:
    """The GDAL settings magseg streams rasters with (a bounded block cache)."""
    with rasterio.Env(GDAL_CACHEMAX=cache_bytes):
        yield


@dataclass(frozen=True)
class GeoInfo:
    """Where a raster lies, in whichever of GDAL's three ways the input says it.

    ``crs`` and ``transform``: an affine georeference (None when there is none). ``gcps``:
    ground control points (rasterio ``GroundControlPoint``) in ``crs``, for scenes that are not
    orthorectified (then ``transform`` is None). ``rpcs``: rational polynomial coefficients of
    a raw satellite product (a rasterio ``RPC``). All are copied to the outputs: an output
    pixel is the input pixel at the same position, so whatever locates the one locates the
    other.
    """

    crs: Any
    transform: Any
    gcps: tuple[Any, ...] = ()
    rpcs: Any = None

    @property
    def georeferenced(self) -> bool:
        return (self.crs is not None or self.transform is not None or bool(self.gcps)
                or self.rpcs is not None)


class RasterReader:
    """Reads chosen bands of a raster one window at a time, with a validity mask.

    Args:
        path: any raster GDAL reads (GeoTIFF, JPEG2000, PNG, JPEG, VRT...).
        bands: 1-based band indices in the order the model wants them (None = all).
    Raises:
        RasterError: missing, empty or not a raster; bands out of range.
    """

    def __init__(self, path: str | Path, bands: Sequence[int] | None = None,
                 nodata: float | None = None):
        self.path = path if is_virtual(path) else Path(path)
        # A nodata value the user declares (--nodata), over whatever the file declares.
        self.nodata = nodata
        self._src = open_raster(self.path)
        # The part of the file this reader shows (restrict) and the AOI's polygons in the
        # raster's CRS; the whole file by default.
        self._shown = Rect.of_size((self._src.height, self._src.width))
        self._aoi: list[dict] | None = None
        try:
            self.select(bands)
        except RasterError:
            self._src.close()
            raise

    def select(self, bands: Sequence[int] | None) -> None:
        """Choose the bands ``read`` returns (1-based, in order; None = all)."""
        self.bands = select_bands(self.path, self._src.count, tuple(bands) if bands else None)
        complex_bands = [b for b in self.bands if "complex" in self._src.dtypes[b - 1]]
        if complex_bands:
            raise RasterError(
                f"{self.path}: band(s) {','.join(map(str, complex_bands))} hold complex values "
                f"({self._src.dtypes[complex_bands[0] - 1]}); magseg segments real-valued bands: "
                "convert them first (e.g. the amplitude, with gdal_calc.py --calc 'absolute(A)')"
            )
        flags = [self._src.mask_flag_enums[b - 1] for b in self.bands]
        # A mask is "declared" by a nodata value, an alpha band or an internal/.msk mask;
        # GDAL reports all_valid for bands that have none.
        self._declared_mask = any(f != [MaskFlags.all_valid] for f in flags)

    @property
    def file_count(self) -> int:
        """Number of bands in the file."""
        return self._src.count

    def restrict(self, aoi: "AreaOfInterest") -> None:
        """Show only the window that covers ``aoi`` (clipped to the raster): ``size``,
        ``geo`` and ``read`` are then the window's, and pixels outside its polygons read as
        invalid (nodata).

        Raises:
            RasterError: the AOI does not overlap the raster, or the raster is not georeferenced.
        """
        src = self._src
        self._shown, self._aoi = aoi.window(src.transform, (src.height, src.width), src.crs, self.path)

    def _window(self, window: Rect) -> Window:
        """``window`` of the shown part as a rasterio window of the file."""
        return gdal_window(window.shifted(self._shown.top, self._shown.left))

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` in pixels (of the AOI's window after ``restrict``)."""
        return self._shown.size

    @property
    def file_size(self) -> tuple[int, int]:
        """``(H, W)`` of the whole file, ``restrict`` or not."""
        return self._src.height, self._src.width

    @property
    def origin(self) -> tuple[int, int]:
        """``(row, col)`` of the shown part's top-left pixel in the file ((0, 0) unless
        ``restrict``ed)."""
        return self._shown.top, self._shown.left

    @property
    def count(self) -> int:
        """Number of bands read (after band selection)."""
        return len(self.bands)

    @property
    def dtype(self) -> str:
        return self._src.dtypes[self.bands[0] - 1]

    @property
    def geo(self) -> GeoInfo:
        src = self._src
        # GDAL reports the identity transform for rasters without one (a plain PNG); writing
        # it back would make the output claim a georeference the input never had.
        transform = None if src.transform.is_identity else src.transform
        if self._aoi is not None:  # a window of a georeferenced raster: its own transform only
            return GeoInfo(src.crs, window_transform(gdal_window(self._shown), src.transform), (), None)
        gcps, gcp_crs = src.gcps
        return GeoInfo(src.crs or (gcp_crs if gcps else None), transform, tuple(gcps), src.rpcs)

    def read(self, window: Rect) -> tuple[np.ndarray, np.ndarray]:
        """Pixels ``(C, h, w)`` in the file's dtype and a validity mask ``(h, w)`` bool.

        Invalid (nodata) pixels, by GDAL's rule: those the file declares invalid (a nodata
        value on every band, alpha 0, an internal or ``.msk`` mask); when it declares nothing,
        none. A ``nodata`` given to the reader replaces what the file declares: pixels equal
        to it on every band (NaN: NaN on every band) are invalid. Non-finite floats are
        always invalid.

        Raises:
            RasterError: truncated or corrupt data.
        """
        return self._read(self._window(window), window.size)

    def read_overview(self, max_side: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole shown raster, decimated (nearest) so that its longer side is at most
        ``max_side``: pixels ``(C, h, w)`` and validity ``(h, w)``, as ``read`` gives them.
        GDAL reads from overviews where the file has them; a quick look at statistics."""
        height, width = self._shown.size
        factor = max(1, -(-max(height, width) // max_side))
        shape = (max(1, height // factor), max(1, width // factor))
        return self._read(gdal_window(self._shown), shape)

    def _read(self, win: Window, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """``win`` of the file read at ``shape`` (its own size, or decimated)."""
        out_shape = (len(self.bands), *shape)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                pixels = self._src.read(self.bands, window=win, out_shape=out_shape)
                if self.nodata is not None:
                    nodata = np.isnan(pixels) if np.isnan(self.nodata) else pixels == self.nodata
                    valid = ~nodata.all(axis=0)
                elif self._declared_mask:
                    valid = self._src.read_masks(self.bands, window=win, out_shape=out_shape).any(axis=0)
                else:
                    valid = np.ones(shape, bool)
        except RasterioIOError as exc:
            raise RasterError(
                f"{self.path}: cannot read pixels, file is truncated or corrupt ({exc})"
            ) from None
        if pixels.dtype.kind == "f":
            valid &= np.isfinite(pixels).all(axis=0)
        if self._aoi is not None:
            transform = window_transform(win, self._src.transform) @ Affine.scale(
                win.width / shape[1], win.height / shape[0])
            valid &= inside(self._aoi, transform, valid.shape)
        return pixels, valid

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> "RasterReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The nodata value of class maps: class ids are 0..254.
NODATA = 255
# Continuous outputs (probabilities, uncertainty) store value x VALUE_MAX, 0..254, so that
# 255 is free to be their nodata too: GDAL before 3.8 computes statistics (and QGIS draws
# transparency) from the nodata value alone, not from the internal mask.
VALUE_MAX = 254


def colormap(colors: Sequence[tuple[int, int, int]]) -> dict[int, tuple[int, int, int, int]]:
    """A GDAL colour table for class ids ``0..n-1``; nodata (255) is transparent black."""
    table = {i: (int(r), int(g), int(b), 255) for i, (r, g, b) in enumerate(colors)}
    table[NODATA] = (0, 0, 0, 0)
    return table


def _write_error(path: Path, message: str) -> RasterWriteError:
    """A RasterWriteError about the file at ``path`` (kept as ``.path``, so that
    magseg.io.atomic.atomic_write can tell which output failed)."""
    error = RasterWriteError(f"{path}: {message}")
    error.path = path  # type: ignore[attr-defined]
    return error


# Pixels per band read at a time when a written raster is read back (``verify_raster``).
VERIFY_PIXELS = 1 << 22


def verify_raster(path: str | Path, size: tuple[int, int], count: int, masked: bool = False) -> None:
    """Check that a raster just written and closed is complete: it opens with ``size`` and
    ``count`` bands, every block was written, and every pixel (and mask) decodes.

    GDAL writes the blocks it holds in its cache, and the file's directory, when the file is
    closed, and reports a failure there (a full disk) only on stderr: the file is then short
    or lacks its directory, and only reading it back shows it. Reading is a fraction of the
    work that made the pixels (about 0.1 s per 10 Mpx on one core).

    Raises:
        RasterWriteError: the file does not open, has another shape, or lacks or cannot
            decode some block.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                if (src.height, src.width, src.count) != (*size, count):
                    raise _write_error(path, f"reads back as {src.count} band(s) of "
                                       f"{src.height} x {src.width} px instead of {count} of "
                                       f"{size[0]} x {size[1]}: not written completely")
                bh, bw = src.block_shapes[0]
                for i in range(-(-src.height // bh)):
                    for j in range(-(-src.width // bw)):
                        src.block_size(1, i, j)  # raises for a block that was never written
                step = max(bw, VERIFY_PIXELS // bh // bw * bw)
                for row in range(0, src.height, bh):
                    for col in range(0, src.width, step):
                        window = Window(col, row, min(step, src.width - col), min(bh, src.height - row))
                        src.read(window=window)
                        if masked:
                            src.read_masks(1, window=window)
    except (RasterioError, CPLE_BaseError, OSError) as exc:
        raise _write_error(path, f"does not read back complete after writing ({exc}); the disk "
                           "may be full or failing") from None


class RasterWriter:
    """A tiled (``BLOCK``), DEFLATE-compressed GeoTIFF written window by window.

    ``BIGTIFF=IF_SAFER`` switches to BigTIFF when the file could pass 4 GB. Each ``write``
    goes to disk through GDAL's block cache; the whole raster is never held. ``close``
    reads the closed file back (``verify_raster``): GDAL's failures to write at close only
    print a message, and a file that is not complete must never be taken for a result.

    Args:
        path: where to write (magseg writes to a temporary name and renames it).
        size: ``(H, W)``.
        count: bands; all uint8.
        geo: CRS, transform, GCPs and RPCs copied from the input (each left out when it has none).
        nodata: the nodata value (None: no nodata value).
        mask: store validity in an internal mask band (``write(..., valid=)``): for outputs
            where every value 0..255 means something, such as probabilities.
        colors: class colours -> a colour table on band 1 (class maps).
        tags: dataset metadata (strings).
        descriptions: one name per band.
        scale: stored as the bands' scale factor (value x scale = physical value).
        creation_options: GDAL GTiff creation options over magseg's defaults (``--co``).
    """

    def __init__(
        self,
        path: str | Path,
        size: tuple[int, int],
        count: int,
        geo: GeoInfo,
        *,
        nodata: int | None = NODATA,
        mask: bool = False,
        colors: Sequence[tuple[int, int, int]] | None = None,
        tags: Mapping[str, str] | None = None,
        descriptions: Sequence[str] | None = None,
        scale: float | None = None,
        creation_options: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        profile: dict[str, Any] = dict(
            driver="GTiff", height=size[0], width=size[1], count=count, dtype="uint8",
            tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate",
            BIGTIFF="IF_SAFER", nodata=nodata,
        )
        # The user's GDAL creation options (--co) over these defaults.
        profile.update({k.lower(): v for k, v in (creation_options or {}).items()})
        if geo.crs is not None:
            profile["crs"] = geo.crs
        if geo.transform is not None:
            profile["transform"] = geo.transform
        if geo.gcps:
            profile["gcps"] = list(geo.gcps)
        if geo.rpcs is not None:
            profile["rpcs"] = geo.rpcs
        self._masked = mask
        self._size, self._count = (int(size[0]), int(size[1])), count
        self._failed = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._dst = rasterio.open(self.path, "w", **profile)
        except (RasterioIOError, OSError) as exc:
            raise _write_error(self.path, f"cannot create output raster ({exc})") from None
        dst = self._dst
        try:
            with _gdal_call(self.path, "cannot create output raster"):
                if mask:
                    # The mask band before any pixel: GDAL creating it on a full disk after
                    # blocks were cached leaves a dataset that crashes when closed.
                    dst.write_mask(np.full((1, 1), 255, np.uint8), window=Window(0, 0, 1, 1))
                if colors is not None:
                    dst.write_colormap(1, colormap(colors))
                if tags:
                    dst.update_tags(**{k: str(v) for k, v in tags.items()})
                for i, text in enumerate(descriptions or (), start=1):
                    dst.set_band_description(i, text)
                if scale is not None:
                    dst.scales = (scale,) * count
        except RasterWriteError:
            self._abandon()
            raise

    def write(self, array: np.ndarray, window: Rect, valid: np.ndarray | None = None) -> None:
        """Write ``array`` ``(count, h, w)`` uint8 at ``window``; ``valid`` ``(h, w)`` bool
        feeds the internal mask (writers made with ``mask=True``; None = all valid).

        Raises:
            RasterWriteError: GDAL failed to write (raised or only recorded as its last
                error); the writer is then failed: no further write, and ``close`` only
                releases the file (its cached blocks dropped, never written again).
        """
        if self._failed:
            raise _write_error(self.path, "cannot write output after a failed write")
        try:
            with _gdal_call(self.path, "cannot write output"):
                self._dst.write(array, window=gdal_window(window))
                if self._masked:
                    mask = np.full(array.shape[-2:], 255, np.uint8) if valid is None else valid * np.uint8(255)
                    self._dst.write_mask(mask, window=gdal_window(window))
        except RasterWriteError:
            self._failed = True
            raise

    def close(self) -> None:
        """Flush, close and read the file back (``verify_raster``): it is complete afterwards.

        Raises:
            RasterWriteError: a write failed before, closing failed, or the file does not
                read back complete.
        """
        if self._failed:
            self._abandon()
            raise _write_error(self.path, "not written completely (a write failed)")
        try:
            with _gdal_call(self.path, "cannot finish writing output"):
                self._dst.close()
        except RasterWriteError:
            self._failed = True
            self._abandon()
            raise
        verify_raster(self.path, self._size, self._count, self._masked)

    def _abandon(self) -> None:
        """Release a file that will be thrown away: its cached blocks dropped unwritten
        (magseg.io.gdal_lib.drop_cache), then closed, errors ignored."""
        if self._dst.closed:
            return
        from magseg.io import gdal_lib

        with contextlib.suppress(Exception):
            gdal_lib.drop_cache(self.path)
        with contextlib.suppress(Exception):
            self._dst.close()

    def __enter__(self) -> "RasterWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._dst.closed:
            return
        if exc_type is not None:
            # Already failing: release the file, nothing more (the caller removes it).
            self._abandon()
            return
        self.close()


@contextlib.contextmanager
def _gdal_call(path: Path, what: str) -> Iterator[None]:
    """GDAL calls on the dataset writing ``path``: a failure, whether rasterio raises it or
    GDAL only records it as its last error, becomes a RasterWriteError ``what (...)`` at once,
    before the dataset is touched again."""
    from magseg.io import gdal_lib

    gdal_lib.reset_error()
    try:
        yield
    except (RasterioError, CPLE_BaseError, OSError) as exc:
        raise _write_error(path, f"{what} ({exc})") from None
    failure = gdal_lib.last_failure()
    if failure is not None:
        raise _write_error(path, f"{what} ({failure})")


def write_categories(path: str | Path, classes: Sequence[tuple[int, str, tuple[int, int, int]]]) -> None:
    """The class names of a class map for GIS tools: a GDAL PAM sidecar (``<map>.aux.xml``)
    with band 1's category names and a thematic raster attribute table (value, class name,
    colour), which ``gdalinfo`` lists and QGIS shows in place of bare ids. rasterio has no
    API for either, and GDAL keeps both for GeoTIFFs in this sidecar.

    Args:
        path: the sidecar to write.
        classes: ``(id, name, (r, g, b))`` per class; ids ``0..n-1``.
    """
    from xml.etree import ElementTree as ET

    names = {i: name for i, name, _ in classes}
    dataset = ET.Element("PAMDataset")
    band = ET.SubElement(dataset, "PAMRasterBand", band="1")
    categories = ET.SubElement(band, "CategoryNames")
    for i in range(max(names) + 1):
        ET.SubElement(categories, "Category").text = names.get(i, "")
    table = ET.SubElement(band, "GDALRasterAttributeTable", tableType="thematic")
    # GDAL's field types (0 integer, 2 string) and usages (5 min-max, 2 name, 6-8 r, g, b).
    for index, (name, kind, usage) in enumerate([("Value", 0, 5), ("Class_Name", 2, 2), ("Red", 0, 6),
                                                 ("Green", 0, 7), ("Blue", 0, 8)]):
        field = ET.SubElement(table, "FieldDefn", index=str(index))
        for tag, text in (("Name", name), ("Type", kind), ("Usage", usage)):
            ET.SubElement(field, tag).text = str(text)
    for row, (i, name, color) in enumerate(sorted(classes)):
        element = ET.SubElement(table, "Row", index=str(row))
        for value in (i, name, *color):
            ET.SubElement(element, "F").text = str(value)
    ET.indent(dataset)
    try:
        ET.ElementTree(dataset).write(path, encoding="utf-8", xml_declaration=False)
    except OSError as exc:
        raise _write_error(Path(path), f"cannot write the class names ({exc.strerror})") from None


def raster_style(classes: Sequence[tuple[int, str, tuple[int, int, int]]]) -> str:
    """A QGIS style (``.qml``) for a class map: a paletted renderer of band 1 with each
    class's colour and name; nodata (255) stays transparent. QGIS applies ``<map>.qml``
    beside ``<map>.tif`` when it opens the map.

    Args:
        classes: ``(id, name, (r, g, b))`` per class.
    """
    from xml.etree import ElementTree as ET

    qgis = ET.Element("qgis", version="3.28", styleCategories="Symbology")
    pipe = ET.SubElement(qgis, "pipe")
    renderer = ET.SubElement(pipe, "rasterrenderer", type="paletted", band="1", opacity="1",
                             alphaBand="-1", nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for i, name, (r, g, b) in sorted(classes):
        ET.SubElement(palette, "paletteEntry", value=str(i), color=f"#{r:02x}{g:02x}{b:02x}", label=name,
                      alpha="255")
    ET.indent(qgis)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(qgis, "unicode") + "\n"


def write_raster_style(path: str | Path, classes: Sequence[tuple[int, str, tuple[int, int, int]]]) -> None:
    """``raster_style`` written to ``path`` (``<map>.qml``)."""
    try:
        Path(path).write_text(raster_style(classes), encoding="utf-8")
    except OSError as exc:
        raise _write_error(Path(path), f"cannot write the QGIS style ({exc.strerror})") from None


def check_creation_options(driver: str, options: Mapping[str, str]) -> None:
    """Refuse creation options ``driver`` does not take, with GDAL's own message, before any
    work: GDAL itself only warns about an unknown key and then ignores it.

    Raises:
        ConfigError: an unknown key, or a value GDAL refuses.
    """
    if not options:
        return
    refused: list[str] = []

    class _Refusals(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "creation option" in record.getMessage():
                refused.append(record.getMessage().split(" in ", 1)[-1])

    handler = _Refusals(logging.WARNING)
    gdal_log = logging.getLogger("rasterio._env")
    gdal_log.addHandler(handler)
    try:
        with warnings.catch_warnings(), rasterio.io.MemoryFile() as memory:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            if driver == "COG":  # the COG driver only copies: make a source, copy it
                with memory.open(driver="GTiff", width=8, height=8, count=1, dtype="uint8") as tiny:
                    tiny.write(np.zeros((1, 8, 8), np.uint8))
                with rasterio.io.MemoryFile() as out:
                    rasterio.shutil.copy(memory.name, out.name, driver="COG", **options)
            else:
                with memory.open(driver=driver, width=8, height=8, count=1, dtype="uint8", **options):
                    pass
    except (RasterioError, CPLE_BaseError) as exc:
        refused.append(re.sub(r"^\S+\.tif: ", "", str(exc)))  # the probe's own file name
    finally:
        gdal_log.removeHandler(handler)
    if refused:
        raise ConfigError(f"--co: {'; '.join(refused)} (the {driver} driver's options: "
                          f"https://gdal.org/drivers/raster/{driver.lower()}.html)")


def convert_to_cog(src: str | Path, dst: str | Path, resampling: str,
                   creation_options: Mapping[str, str] | None = None) -> None:
    """Copy a finished tiled GeoTIFF to a Cloud-Optimised GeoTIFF with overviews.

    Converting a finished file is what keeps memory flat: GDAL's COG driver, given a dataset
    being written, buffers the whole raster. ``resampling``: overview resampling, ``MODE`` or
    ``NEAREST`` for class maps (no blended ids), ``AVERAGE`` for continuous values.

    Raises:
        RasterWriteError: the copy failed or does not read back complete (``verify_raster``).
    """
    dst = Path(dst)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(src) as source:
                size, count = (source.height, source.width), source.count
                masked = any(f == [MaskFlags.per_dataset] for f in source.mask_flag_enums)
            options = {"COMPRESS": "DEFLATE", "BLOCKSIZE": COG_BLOCK, "OVERVIEW_RESAMPLING": resampling,
                       "BIGTIFF": "IF_SAFER"}
            options.update({k.upper(): v for k, v in (creation_options or {}).items()})
            rasterio.shutil.copy(str(src), str(dst), driver="COG", **options)
    except (RasterioError, CPLE_BaseError, OSError) as exc:
        raise _write_error(dst, f"cannot write cloud-optimised GeoTIFF ({exc})") from None
    verify_raster(dst, size, count, masked)
