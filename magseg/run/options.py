"""What predict writes for each input, and how: ``PredictOptions`` (``magseg predict``'s
flags, as the library takes them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from magseg.io.aoi import AreaOfInterest
from magseg.io.vector import VectorOptions


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
