"""The formats polygons are written in, listed once, and the options of a layer:
``--vector FORMAT`` of predict and ``--format`` of vectorize offer these names,
``magseg.io.vector`` writes with their OGR driver and predict names the file with their
suffix; ``VectorOptions`` and the tag a layer carries for them.

Nothing heavy is imported here (``magseg.io.vector`` brings shapely and rasterio's
features): the CLI reads the names when it builds its options, and predict carries the
options and checks the tags of its outputs without making a polygon.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import NamedTuple


class VectorFormat(NamedTuple):
    """One polygon format: its OGR driver and the suffix of its (one-file) layer."""

    driver: str
    suffix: str


VECTOR_FORMATS: dict[str, VectorFormat] = {
    "gpkg": VectorFormat("GPKG", ".gpkg"),
    "fgb": VectorFormat("FlatGeobuf", ".fgb"),
    "geojson": VectorFormat("GeoJSON", ".geojson"),
}


@dataclass(frozen=True)
class VectorOptions:
    """``min_area``: polygons smaller than this (CRS units squared, m² when projected) are
    dropped. ``simplify``: Douglas-Peucker tolerance in CRS units (0: exact pixel edges;
    polygons are simplified one by one, so neighbours may no longer share edges exactly)."""

    format: str = "gpkg"
    min_area: float = 0.0
    simplify: float = 0.0
    strip_rows: int | None = None  # None: magseg.io.vector.STRIP_PIXELS // width

    def __post_init__(self) -> None:
        if self.format not in VECTOR_FORMATS:
            raise ValueError(f"unknown vector format {self.format!r}; choose {', '.join(VECTOR_FORMATS)}")
        if not (math.isfinite(self.min_area) and self.min_area >= 0):
            raise ValueError(f"--min-area must be a number >= 0, got {self.min_area}")
        if not (math.isfinite(self.simplify) and self.simplify >= 0):
            raise ValueError(f"--simplify must be a number >= 0, got {self.simplify}")
        if self.strip_rows is not None and self.strip_rows < 1:
            raise ValueError(f"strip_rows must be >= 1, got {self.strip_rows}")


VECTOR_OPTIONS_TAG = "MAGSEG_VECTOR_OPTIONS"


def options_tag(options: VectorOptions) -> str:
    """``VECTOR_OPTIONS_TAG``'s value for ``options`` (the format is the file's suffix)."""
    return json.dumps({"min_area": options.min_area, "simplify": options.simplify}, sort_keys=True)
