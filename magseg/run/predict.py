"""Segment rasters of any size with a trained model: the pyramid over the whole raster.

    outputs there  kept, remade or refused by whose they are (magseg.run.existing)
    raster --decimated read--> pixel-scale check and nodata statistics, a warning at once
                  (magseg.run.input_checks); the bands to read (magseg.run.bands)
    stage 0 .. n  the engine's stage loop (magseg.engine.stages.run_stages) with the raster as
                  its image, read crop by crop at each stage's magnification, and each stage's
                  probabilities in a scratch directory (magseg.run.raster_stages, streaming)
    last stage    each crop straight into the writers of the outputs made crop by crop
                  (magseg.run.outputs); then those made from the class map
    finished files are renamed into place (and converted to COG when asked)

The result is ``segment`` on the whole image, bit for bit, without windows to stitch (an
AOI is a clip of it, magseg.run.clip; crop borders inside a stage: pyramid.margin). Memory
holds a few crop batches and GDAL's bounded block cache (magseg.io.raster.io_env), whatever
the raster's size; the scratch space grows with it (``scratch_bytes`` in the record).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from magseg.engine.pyramid import crop_boxes
from magseg.errors import MagsegError
from magseg.io.atomic import atomic_writes, fresh_partial_path
from magseg.io.raster import NODATA, RasterReader, convert_to_cog, io_env
from magseg.io.sources import base_name, is_virtual, readable_name
from magseg.run.bands import band_order, default_bands_as_default
from magseg.run.existing import prepare_outputs, remove_leftovers, remove_stale
from magseg.run.input_checks import early_look, georeference_warnings
from magseg.run.options import READ_OPTIONS_TAG, PredictOptions, read_options_tag
from magseg.run.outputs import (
    OutputContext,
    OutputKind,
    output_kind,
    output_paths,
    possible_outputs,
    tiled_path,
)
from magseg.run.pools import Pool
from magseg.run.raster_stages import run_raster_stages, scratch_for
from magseg.run.result import PredictResult
from magseg.run.seam_record import finest_seam_scores
from magseg.run.streaming import RasterSink, RasterSource
from magseg.segmenter import Segmenter

__all__ = ["INPUT_SUFFIXES", "PredictOptions", "PredictResult", "failed_record", "output_paths",
           "predict_input", "predict_raster"]

# Inputs a directory argument is searched for.
INPUT_SUFFIXES = (".tif", ".tiff", ".jp2", ".png", ".jpg", ".jpeg", ".vrt")


@contextlib.contextmanager
def _scratch(path: Path) -> Iterator[Path]:
    """A temporary file that is removed when the block ends, however it ends."""
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def predict_raster(
    segmenter: Segmenter,
    path: str | Path,
    out_dir: str | Path,
    options: PredictOptions = PredictOptions(),
    on_progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    pool: Pool | None = None,
) -> PredictResult:
    """Segment one raster and write its outputs into ``out_dir``.

    Every output is written under a temporary name and read back complete once closed; only
    then are this input's outputs renamed into place (magseg.io.atomic.atomic_writes). Outputs that
    exist are kept unless ``options.overwrite``; when all exist the input is ``skipped``.
    Without ``options.overwrite`` an output that another run wrote meanwhile is kept too.

    Args:
        on_progress: called as ``on_progress(done, total)`` after each batch of crops, counted
            over all stages (progress).
        on_warning: called with each warning as soon as it is known (the pixel-scale check
            runs before any stage); the warnings are in the result too.
        pool: run each stage's crop batches on this pool's workers (``magseg.run.pools``),
            which see the raster and ``options.scratch_dir`` (or ``out_dir``); the outputs
            are written here, identical to a run without a pool.
    Returns:
        a PredictResult with status ``ok`` or ``skipped``.
    Raises:
        RasterError: unreadable input, wrong band count, output not writable.
        WriteError: an output could not be written completely (a full disk); the files
            already there are unchanged.
        OutputExistsError: an output appeared while this run wrote it (no --overwrite).
    """
    start = time.perf_counter()
    path = path if is_virtual(path) else Path(path)
    config = segmenter.config
    with io_env(), RasterReader(path, nodata=options.nodata) as reader:
        # Before anything is tagged or compared: a --bands that is the default reading is none.
        options = default_bands_as_default(options, reader, config.model.in_channels, config.data.bands)
        targets = output_paths(path, out_dir, options)
        result = PredictResult(input=path, output=targets["labels"], status="ok", outputs=targets,
                               runtime=segmenter.runtime)
        mine = segmenter.provenance
        remove_leftovers(possible_outputs(path, out_dir, options), options.scratch_dir)
        todo, replace = prepare_outputs(path, out_dir, targets, options, mine)
        if options.aoi is not None:
            reader.restrict(options.aoi)
        result.height, result.width = reader.size
        if not todo:
            result.status = "skipped"
            result.seconds = time.perf_counter() - start
            return result
        overwrite = options.overwrite or replace
        result.warn(georeference_warnings(reader), on_warning)
        if not any(output_kind(kind).from_crops for kind in todo):  # the class map is there: segment nothing
            with atomic_writes(todo, overwrite) as temps:
                _from_class_map(temps, _context(segmenter, reader, options, result, temps))
            result.seconds = time.perf_counter() - start
            return result
        reader.select(band_order(reader, config.model.in_channels, options.bands, config.data.bands))
        counts = _run(segmenter, reader, todo, options, on_progress, result, on_warning, pool, overwrite)
    if options.overwrite:
        result.removed = remove_stale(path, out_dir, targets, options, mine)

    result.histogram = {c.name: int(counts[i]) for i, c in enumerate(segmenter.config.classes)}
    result.histogram["nodata"] = int(counts[NODATA])
    result.seconds = time.perf_counter() - start
    return result


def predict_input(
    segmenter: Segmenter,
    path: str | Path,
    out_dir: str | Path,
    options: PredictOptions = PredictOptions(),
    on_progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    pool: Pool | None = None,
) -> dict[str, Any]:
    """``predict_raster`` for one input of a batch: never raises for that input's problems.

    Returns:
        its NDJSON record, with ``status`` ``failed`` and the ``error`` when anything went
        wrong (one bad input never aborts a batch; the local loop and Ray workers share this).
    """
    start = time.perf_counter()
    path = path if is_virtual(path) else Path(path)
    target = output_paths(path, out_dir, options)["labels"]
    try:
        return predict_raster(segmenter, path, out_dir, options, on_progress, on_warning, pool).to_record()
    except MagsegError as exc:
        error = str(exc)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001  a bug or a library error: report it, go on
        error = f"{type(exc).__name__}: {exc}"
    return failed_record(path, target, error, time.perf_counter() - start, segmenter.runtime)


def failed_record(path: Path, target: Path, error: str, seconds: float = 0.0,
                  runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """The NDJSON record of an input that failed (``runtime``: what would have run it)."""
    return PredictResult(input=path, output=target, status="failed", error=error,
                         seconds=seconds, runtime=runtime or {}).to_record()


def _context(segmenter: Segmenter, reader: RasterReader, options: PredictOptions, result: PredictResult,
             temps: Mapping[str, Path]) -> OutputContext:
    """What the writers of this input's outputs take; the class map and uncertainty the
    class-map kinds are made from are this run's temporaries, or the files there."""
    return OutputContext(
        size=reader.size, geo=reader.geo, source=readable_name(base_name(reader.path)),
        classes=tuple(segmenter.config.classes),
        provenance={**segmenter.provenance.tags(), READ_OPTIONS_TAG: read_options_tag(options)},
        creation_options={} if options.cog else dict(options.creation_options),
        preview_size=options.preview_size, vector=options.vector,
        labels=temps.get("labels", result.outputs["labels"]),
        uncertainty=temps.get("uncertainty", result.outputs.get("uncertainty")))


def _from_class_map(temps: Mapping[str, Path], out: OutputContext) -> None:
    """The outputs being made from the finished class map ``out.labels``, into ``temps``."""
    for name, temp in temps.items():
        kind = output_kind(name)
        if kind.make is not None:
            kind.make(temp, out)


def _run(
    segmenter: Segmenter,
    reader: RasterReader,
    todo: dict[str, Path],
    options: PredictOptions,
    on_progress: Callable[[int, int], None] | None,
    result: PredictResult,
    on_warning: Callable[[str], None] | None = None,
    pool: Pool | None = None,
    overwrite: bool | set[str] = False,
) -> np.ndarray:
    """The whole raster through the stage loop, its last stage written to every output
    being made (``overwrite``: as ``atomic_writes``). Returns the pixel count of each class
    id (and nodata, 255)."""
    config = segmenter.config
    any_valid, warnings = early_look(reader, segmenter.normalize, config.data.mean, config.data.std)
    result.warn(warnings, on_warning)
    kinds = [output_kind(name) for name in todo]
    with contextlib.ExitStack() as stack:
        # Entered first, left last: temporaries are renamed into place only after every
        # writer below has been closed and read back (and the COG copies made); all of this
        # input's new outputs are put in place, or none.
        # Sized and made before any output: an input without the room fails with nothing made.
        scratch = None
        if any_valid:
            directory = Path(options.scratch_dir) if options.scratch_dir else result.output.parent
            scratch = stack.enter_context(scratch_for(reader.size, config.pyramid, segmenter.num_classes,
                                                      config.refine.crf.enabled, directory, result.output.name,
                                                      str(result.input), pool is not None))
        temps = stack.enter_context(atomic_writes(todo, overwrite))
        out = _context(segmenter, reader, options, result, temps)
        # With --cog a GeoTIFF is written to a temporary and copied to its COG once finished:
        # GDAL's COG driver, given a dataset being written, buffers all of it.
        written = {kind.name: stack.enter_context(_scratch(fresh_partial_path(tiled_path(todo[kind.name]))))
                   if options.cog and kind.cog_resampling else temps[kind.name]
                   for kind in kinds if kind.from_crops}
        writers = {kind.name: stack.enter_context(kind.writer(written[kind.name], out))
                   for kind in kinds if kind.writer is not None}
        source = RasterSource(reader, segmenter.normalize)
        sink = RasterSink(source, segmenter.num_classes, list(writers.values()),
                          any(kind.needs_probs for kind in kinds), temperature=segmenter.temperature)
        if scratch is not None:
            run_raster_stages(segmenter, source, sink, scratch, result, on_progress, options.aoi, pool)
        else:  # nothing to segment: no engine run at all
            sink.write_nodata(crop_boxes(reader.size, config.pyramid.crop))

        for name, writer in writers.items():
            writer.close()
            _to_cog(output_kind(name), written[name], temps[name], options)
        _from_class_map(temps, out)
        whole = None if options.aoi is None else (reader.file_size, reader.origin)  # a clip's grid
        assert out.labels is not None
        result.seam_score = finest_seam_scores(out.labels, temps.get("uncertainty"), reader.size, config.pyramid,
                                               whole=whole)
    return sink.counts


def _to_cog(kind: OutputKind, written: Path, target: Path, options: PredictOptions) -> None:
    """With --cog, the finished GeoTIFF ``written`` copied to ``target`` as a COG with the
    kind's overview resampling (``--co`` goes to the COG driver)."""
    if options.cog and kind.cog_resampling:
        convert_to_cog(written, target, kind.cog_resampling, dict(options.creation_options))
