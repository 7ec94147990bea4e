"""The formats polygons are written in, listed once: ``--vector FORMAT`` of predict and
``--format`` of vectorize offer these names, ``magseg.io.vector`` writes with their OGR
driver and predict names the file with their suffix.

Nothing heavy is imported here: the CLI reads the names when it builds its options.
"""

from __future__ import annotations

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
