"""What predict writes for each input, and how: ``PredictOptions`` (``magseg predict``'s
flags, as the library takes them)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from magseg.io.aoi import AreaOfInterest
from magseg.io.vector_formats import VectorOptions


@dataclass(frozen=True)
class PredictOptions:
    """What to write for each input, and how.

    ``probs``, ``uncertainty``, ``preview``, ``vector``: ask for the output kinds of those
    names (``magseg.run.outputs.OUTPUT_KINDS``; the class map and its companions are always
    written). ``bands``: 1-based bands in the model's order (None: the checkpoint's
    ``data.bands``, or all bands). ``scratch_dir``: where the stage maps go while an input
    runs (None: beside its outputs).
    """

    probs: bool = False
    uncertainty: bool = False
    cog: bool = False
    preview: bool = False
    overwrite: bool = False
    bands: tuple[int, ...] | None = None
    preview_size: int = 512
    vector: VectorOptions | None = None  # polygons of the class map, in this format
    # GDAL creation options for the GeoTIFF outputs (--co), over magseg's defaults; with
    # cog, for the COG driver.
    creation_options: tuple[tuple[str, str], ...] = ()
    # The outputs' <stem> (-o FILE.tif for one input); None: the input's.
    stem: str | None = None
    # Only this area: read, segmented and written over its window (magseg.io.aoi).
    aoi: AreaOfInterest | None = None
    scratch_dir: Path | None = None
    # --nodata: pixels equal to it on every band are nodata, whatever the file declares.
    nodata: float | None = None


# The tag an output carries for what of its input was read (``read_options_tag``).
READ_OPTIONS_TAG = "MAGSEG_READ_OPTIONS"


def read_options_tag(options: PredictOptions) -> str:
    """What of the input a run reads, as its outputs record it (``READ_OPTIONS_TAG``): the
    bands, ``--nodata`` and the area of interest (its polygons' digest). These decide the
    pixels as the model does: an output read otherwise is not this run's, whatever the model
    (``magseg.run.existing``). Canonical JSON; an output from before the tag reads as the
    defaults (all of ``read_options_tag(PredictOptions())``)."""
    area = None
    if options.aoi is not None:
        shapes = json.dumps([options.aoi.geometries, options.aoi.crs], sort_keys=True, default=str)
        area = {"source": options.aoi.source, "sha256": hashlib.sha256(shapes.encode()).hexdigest()[:16]}
    return json.dumps({"bands": None if options.bands is None else list(options.bands),
                       "nodata": options.nodata, "area": area}, sort_keys=True)


def describe_read(tag: str) -> str:
    """``read_options_tag``'s value in words, for an error message (a value magseg did not
    write, quoted as it is)."""
    try:
        data = json.loads(tag)
        bands, nodata, area = data["bands"], data["nodata"], data["area"]
        where = "the whole raster" if area is None else f"the area of {area['source']} ({area['sha256']})"
    except (ValueError, KeyError, TypeError):
        return f"unknown: {tag!r}"
    return ", ".join([f"bands {bands or 'default'}", f"--nodata {'none' if nodata is None else nodata}", where])
