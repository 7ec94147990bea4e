"""What predict writes for an input ``<stem>``: one ``OutputKind`` per file, all of them in
``OUTPUT_KINDS``, each with its writer.

    made crop by crop        the last stage hands each crop's owned window to their writers
                             (magseg.run.streaming.RasterSink): the GeoTIFFs, the preview
    made from the class map  once the class map is finished: its class names, its QGIS
                             style, its polygons

The output paths, the sink's writers, the --cog conversion, the re-run checks
(magseg.run.existing) and README's outputs table (tests/test_outputs.py) all read this
registry; a name that is not in it is an error (``output_kind``). Adding a kind: one entry
here and its writer (CONTRIBUTING.md, "Adding an output kind").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from magseg.config import ClassSpec
from magseg.errors import ConfigError
from magseg.io.preview import PreviewCanvas
from magseg.io.raster import NODATA, VALUE_MAX, GeoInfo, RasterWriter, write_categories, write_raster_style
from magseg.io.sources import stem as source_stem
from magseg.io.vector_formats import VECTOR_OPTIONS_TAG, VectorOptions, options_tag
from magseg.io.vector_formats import VECTOR_FORMATS
from magseg.run.options import PredictOptions
from magseg.run.streaming import CropResult, CropWriter


class OutputWriter(CropWriter, Protocol):
    """The writer of an output made crop by crop: ``write`` each crop, then ``close`` to
    finish the file (read back complete); as a context manager, it releases the file of a
    run that fails instead."""

    def close(self) -> None: ...

    def __enter__(self) -> OutputWriter: ...

    def __exit__(self, *exc: Any) -> None: ...


@dataclass(frozen=True)
class OutputContext:
    """What the writers of one input's outputs need, and nothing of the model that made them."""

    size: tuple[int, int]  # (H, W) of every raster output
    geo: GeoInfo  # copied to every GeoTIFF
    source: str  # the input's readable name: MAGSEG_SOURCE, the preview's title
    classes: tuple[ClassSpec, ...]
    provenance: Mapping[str, str]  # what made it (magseg.io.provenance tags)
    # GDAL GTiff creation options (--co; none with --cog, where they go to the COG copy).
    creation_options: Mapping[str, str] = field(default_factory=dict)
    preview_size: int = 512
    vector: VectorOptions | None = None
    # The class map the class-map kinds are made from (this run's, or the one there) and
    # the uncertainty raster beside it (None: there is none).
    labels: Path | None = None
    uncertainty: Path | None = None


class GeoTiffOutput:
    """A uint8 GeoTIFF written crop by crop: ``bands(crop)`` ``(count, h, w)`` at the crop's
    window, through a ``RasterWriter`` (tiled, compressed, read back complete on close)."""

    def __init__(self, writer: RasterWriter, bands: Callable[[CropResult], np.ndarray]) -> None:
        self.writer, self.bands = writer, bands

    def write(self, crop: CropResult) -> None:
        self.writer.write(self.bands(crop), crop.window, crop.valid)

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> GeoTiffOutput:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.writer.__exit__(*exc)  # a failing run's file is released, never finished


class PreviewOutput:
    """The preview PNG: its canvas filled crop by crop (no second read of the raster), drawn
    on close (magseg.io.preview)."""

    def __init__(self, target: Path, out: OutputContext) -> None:
        self.target, self.out = target, out
        self.canvas = PreviewCanvas(out.size, out.preview_size)

    def write(self, crop: CropResult) -> None:
        self.canvas.add(crop.window, crop.raw, crop.labels, crop.uncertainty_uint8, crop.valid)

    def close(self) -> None:
        self.canvas.save(self.target, self.out.classes, title=self.out.source, metadata=self.out.provenance)

    def __enter__(self) -> PreviewOutput:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _labels_writer(target: Path, out: OutputContext) -> GeoTiffOutput:
    """The class map: class ids, the colour table, the class names in its tags."""
    tags = {
        **out.provenance,
        "MAGSEG_CLASSES": json.dumps([{"id": c.id, "name": c.name, "color": list(c.color)} for c in out.classes]),
        "MAGSEG_SOURCE": out.source,
        **{f"CLASS_{c.id}": c.name for c in out.classes},
    }
    writer = RasterWriter(target, out.size, 1, out.geo, nodata=NODATA, tags=tags,
                          colors=[c.color for c in out.classes], descriptions=["class"],
                          creation_options=out.creation_options)
    return GeoTiffOutput(writer, lambda crop: crop.labels[None])


def _probs_writer(target: Path, out: OutputContext) -> GeoTiffOutput:
    """One band per class, probability x VALUE_MAX, with an internal mask."""
    writer = RasterWriter(target, out.size, len(out.classes), out.geo, nodata=NODATA, mask=True,
                          descriptions=[c.name for c in out.classes], scale=1 / VALUE_MAX,
                          tags={"MAGSEG_VALUES": f"probability x {VALUE_MAX}", "MAGSEG_SOURCE": out.source,
                                **out.provenance}, creation_options=out.creation_options)
    return GeoTiffOutput(writer, lambda crop: crop.probs_uint8)


def _uncertainty_writer(target: Path, out: OutputContext) -> GeoTiffOutput:
    """(1 - certainty) x VALUE_MAX, with an internal mask."""
    writer = RasterWriter(target, out.size, 1, out.geo, nodata=NODATA, mask=True,
                          descriptions=["uncertainty"], scale=1 / VALUE_MAX,
                          tags={"MAGSEG_VALUES": f"(1 - certainty) x {VALUE_MAX}; certainty = top-1 minus "
                                "top-2 probability", "MAGSEG_SOURCE": out.source, **out.provenance},
                          creation_options=out.creation_options)
    return GeoTiffOutput(writer, lambda crop: crop.uncertainty_uint8[None])


def _class_table(out: OutputContext) -> list[tuple[int, str, tuple[int, int, int]]]:
    return [(c.id, c.name, tuple(c.color)) for c in out.classes]


def _make_polygons(target: Path, out: OutputContext) -> None:
    """The class map's polygons (magseg.io.vector, styled), with their mean and least
    confidence when there is an uncertainty raster; the layer records the options."""
    from magseg.io.vector import polygonize  # shapely and rasterio's features: only for polygons

    assert out.labels is not None and out.vector is not None
    polygonize(out.labels, target, [c.name for c in out.classes], out.vector,
               metadata={**out.provenance, VECTOR_OPTIONS_TAG: options_tag(out.vector)},
               colors=[tuple(c.color) for c in out.classes], uncertainty=out.uncertainty)


@dataclass(frozen=True, eq=False)  # one object per kind: compared and hashed by identity
class OutputKind:
    """One file predict may write for an input ``<stem>``.

    Exactly one of ``writer`` (the file is made crop by crop by the last stage: it opens an
    ``OutputWriter``) and ``make`` (the file is made from the finished class map,
    ``out.labels``).
    """

    name: str  # the key in the record's ``outputs``
    # The file name after <stem>; or, by format name, the suffix of each format
    # (options.<asked_by>.format picks one).
    suffix: str | Mapping[str, str]
    asked_by: str | None  # the PredictOptions field that asks for it; None: always written
    writer: Callable[[Path, OutputContext], OutputWriter] | None = None
    make: Callable[[Path, OutputContext], None] | None = None
    needs_probs: bool = False  # its writer reads the probabilities (or the uncertainty)
    # A GeoTIFF: the resampling of its overviews under --cog (class ids must not be blended).
    cog_resampling: str | None = None
    # The file carries the provenance tags, so a re-run can tell whose it is; one that
    # cannot describes the class map and is made with it, and only with it.
    tagged: bool = True

    def __post_init__(self) -> None:
        if (self.writer is None) == (self.make is None):
            raise ValueError(f"output kind {self.name!r}: give a writer (made crop by crop) or a make "
                             "(made from the class map), one of them")

    @property
    def flag(self) -> str:
        """How a user asks for it, as README's outputs table says it: the flag of its option."""
        return "always" if self.asked_by is None else f"--{self.asked_by}"

    @property
    def from_crops(self) -> bool:
        """Written crop by crop by the last stage (else made from the finished class map)."""
        return self.writer is not None

    def asked(self, options: PredictOptions) -> bool:
        return self.asked_by is None or getattr(options, self.asked_by) not in (None, False)

    def file_suffix(self, options: PredictOptions) -> str:
        """The suffix this run's file of this kind takes (its format's, for polygons)."""
        if isinstance(self.suffix, str):
            return self.suffix
        assert self.asked_by is not None
        return self.suffix[getattr(options, self.asked_by).format]

    def all_suffixes(self) -> dict[str, str]:
        """Every name a file of this kind may take, by ``<kind>`` or ``<kind> <format>``."""
        if isinstance(self.suffix, str):
            return {self.name: self.suffix}
        return {f"{self.name} {fmt}": suffix for fmt, suffix in self.suffix.items()}


OUTPUT_KINDS: tuple[OutputKind, ...] = (
    OutputKind("labels", ".tif", None, writer=_labels_writer, cog_resampling="MODE"),
    OutputKind("probs", "_probs.tif", "probs", writer=_probs_writer, needs_probs=True,
               cog_resampling="AVERAGE"),
    OutputKind("uncertainty", "_uncertainty.tif", "uncertainty", writer=_uncertainty_writer,
               needs_probs=True, cog_resampling="AVERAGE"),
    OutputKind("preview", "_preview.png", "preview", writer=PreviewOutput, needs_probs=True),
    OutputKind("vector", {name: f.suffix for name, f in VECTOR_FORMATS.items()}, "vector",
               make=_make_polygons),
    # Class names for GIS tools (GDAL's PAM sidecar), and the QGIS style applied on opening.
    OutputKind("categories", ".tif.aux.xml", None, tagged=False,
               make=lambda target, out: write_categories(target, _class_table(out))),
    OutputKind("style", ".qml", None, tagged=False,
               make=lambda target, out: write_raster_style(target, _class_table(out))),
)
OUTPUTS: dict[str, OutputKind] = {kind.name: kind for kind in OUTPUT_KINDS}


def output_kind(name: str) -> OutputKind:
    """The kind called ``name``.

    Raises:
        ConfigError: no kind has that name.
    """
    try:
        return OUTPUTS[name]
    except KeyError:
        raise ConfigError(f"unknown output kind {name!r}; predict writes {', '.join(OUTPUTS)}") from None


def output_paths(path: str | Path, out_dir: str | Path, options: PredictOptions) -> dict[str, Path]:
    """The files predict writes for input ``path``, by kind: those always written, and those
    ``options`` ask for."""
    stem = options.stem or source_stem(path)
    return {kind.name: Path(out_dir) / (stem + kind.file_suffix(options))
            for kind in OUTPUT_KINDS if kind.asked(options)}


def tiled_path(target: Path) -> Path:
    """Where a GeoTIFF output is written before its --cog copy to ``target`` (a temporary:
    magseg.io.atomic.fresh_partial_path of it)."""
    return target.with_name(target.name + ".tiled")


def possible_outputs(path: str | Path, out_dir: str | Path, options: PredictOptions) -> dict[str, Path]:
    """Every file a predict run may make for this input, whatever its flags, by kind
    (polygons in each format as ``vector <format>``)."""
    stem = options.stem or source_stem(path)
    return {key: Path(out_dir) / (stem + suffix)
            for kind in OUTPUT_KINDS for key, suffix in kind.all_suffixes().items()}
