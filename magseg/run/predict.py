"""Segment rasters of any size with a trained model: the pyramid over the whole raster.

    raster --decimated read--> pixel-scale check and nodata statistics (a warning at once)
    stage 0 .. n  the engine's stage loop (magseg.engine.stages.run_stages) with the raster as
                  its image, read crop by crop at each stage's magnification, and each stage's
                  probabilities in a scratch directory (magseg.run.streaming)
    last stage    labels (and probabilities, uncertainty, preview) straight into the outputs
    finished files are renamed into place (and converted to COG when asked)

The result is ``segment`` on the whole image, bit for bit, without windows to stitch (an
AOI is a clip of it, magseg.run.clip; crop borders inside a stage: pyramid.margin). Memory
holds a few crop batches and GDAL's bounded block cache (magseg.io.raster.io_env), whatever
the raster's size; the scratch space grows with it (``scratch_bytes`` in the record).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch

from magseg.config import Config
from magseg.engine.crf import CrfSink
from magseg.engine.pyramid import crop_boxes
from magseg.engine.stages import StageRun, run_stages
from magseg.errors import MagsegError, OutputExistsError, RasterError, WriteError
from magseg.geometry import Rect
from magseg.io.aoi import AreaOfInterest
from magseg.io.atomic import atomic_writes, fresh_partial_path, remove_stale_partials
from magseg.io.provenance import Provenance, output_tags
from magseg.run.clip import ClipSink, clip_stages
from magseg.io.raster import (
    NODATA,
    VALUE_MAX,
    RasterReader,
    RasterWriter,
    convert_to_cog,
    io_env,
    write_categories,
    write_raster_style,
)
from magseg.io.sources import base_name, is_virtual, readable_name
from magseg.run.seam_record import finest_seam_scores
from magseg.io.sources import stem as source_stem
from magseg.run.streaming import (
    PoolStages,
    RasterSink,
    RasterSource,
    Scratch,
    scratch_estimate,
    scratch_space,
)
from magseg.io.vector import VECTOR_FORMATS, VECTOR_OPTIONS_TAG, VectorOptions, options_tag, polygonize
from magseg.normalization import SCALE_MIN_PIXELS, ChannelStats, scale_mismatches
from magseg.run.pools import Pool
from magseg.segmenter import Segmenter

# What predict writes for an input <stem>: the class map and the optional extras.
OUTPUT_NAMES = {
    "labels": "{stem}.tif",
    "probs": "{stem}_probs.tif",
    "uncertainty": "{stem}_uncertainty.tif",
    "preview": "{stem}_preview.png",
    "vector": "{stem}{vector_suffix}",  # --vector: polygons of the class map
    "categories": "{stem}.tif.aux.xml",  # class names for GIS tools (GDAL's PAM sidecar)
    "style": "{stem}.qml",  # the class map's QGIS style (colours and names), applied on opening
}
# Outputs not written window by window: the preview, and those made from the class map alone.
_FROM_CLASS_MAP = {"vector", "categories", "style"}
_NOT_WINDOWED = _FROM_CLASS_MAP | {"preview"}

# Inputs a directory argument is searched for.
INPUT_SUFFIXES = (".tif", ".tiff", ".jp2", ".png", ".jpg", ".jpeg", ".vrt")

# Overview resampling of --cog outputs: class ids must not be blended.
_COG_RESAMPLING = {"labels": "MODE", "probs": "AVERAGE", "uncertainty": "AVERAGE"}


@dataclass(frozen=True)
class PredictOptions:
    """What to write for each input, and how.

    ``bands``: 1-based bands in the model's order (None: the checkpoint's ``data.bands``, or
    all bands). ``scratch_dir``: where the stage maps go while an input runs (None: beside
    its outputs).
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


@dataclass
class PredictResult:
    """One input's outcome; ``to_record`` is the NDJSON line ``magseg predict`` prints."""

    input: Path
    output: Path
    status: str  # "ok", "skipped" (outputs exist) or "failed"
    seconds: float = 0.0
    width: int | None = None
    height: int | None = None
    histogram: dict[str, int] | None = None
    windows: int = 0  # 1 when the raster was segmented (the whole raster is one scene)
    crops: int = 0  # crops that went through the backbone, all stages
    scratch_bytes: int = 0  # the most the stage maps took on disk at once
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None
    # Done, but the result is suspect: the pixels look unlike the training data's.
    warnings: list[str] = field(default_factory=list)
    # What computed it: device, resolved precision, CPU (magseg.engine.precision.runtime_info).
    runtime: dict[str, Any] = field(default_factory=dict)
    # The finest stage's seam score on the class map and uncertainty (magseg.run.seam_record).
    seam_score: dict[str, Any] | None = None
    # Outputs of this input another model (or no magseg run) made, removed so that all of
    # the input's outputs come from this run's model (--overwrite).
    removed: list[Path] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        return {
            "input": str(self.input),
            "output": str(self.output),
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "width": self.width,
            "height": self.height,
            "histogram": self.histogram,
            "windows": self.windows,
            "crops": self.crops,
            "scratch_bytes": self.scratch_bytes,
            "outputs": {k: str(v) for k, v in self.outputs.items()},
            "error": self.error,
            "warnings": list(self.warnings),
            "seam_score": self.seam_score,
            "removed": [str(p) for p in self.removed],
            **self.runtime,
        }


def output_paths(path: str | Path, out_dir: str | Path, options: PredictOptions) -> dict[str, Path]:
    """The files predict writes for input ``path``: ``labels`` always, the others when asked."""
    stem = options.stem or source_stem(path)
    wanted = {"labels": True, "probs": options.probs, "uncertainty": options.uncertainty,
              "preview": options.preview, "vector": options.vector is not None, "categories": True,
              "style": True}
    suffix = VECTOR_FORMATS[options.vector.format][1] if options.vector else ""
    return {k: Path(out_dir) / OUTPUT_NAMES[k].format(stem=stem, vector_suffix=suffix)
            for k, on in wanted.items() if on}


def _band_order(reader: RasterReader, segmenter: Segmenter, options: PredictOptions) -> list[int]:
    """The 1-based bands to read, checked against the raster and the model."""
    config = segmenter.config
    want = config.model.in_channels
    bands = options.bands or config.data.bands
    source = "--bands" if options.bands else "the checkpoint's data.bands"
    count = reader.file_count
    example = ",".join(str(b) for b in (range(1, want + 1) if count >= want else [1] * want))
    if bands is None:
        if count != want:
            raise RasterError(
                f"{reader.path}: has {count} band(s) but the model takes {want}; "
                f"choose {want} of them with --bands (e.g. --bands {example})"
            )
        return list(range(1, count + 1))
    if len(bands) != want:
        raise RasterError(
            f"{reader.path}: {source} lists {len(bands)} band(s) but the model takes {want}"
        )
    if max(bands) > count or min(bands) < 1:
        raise RasterError(
            f"{reader.path}: has {count} band(s) but {source} asks for bands "
            f"{','.join(map(str, bands))}; pass --bands with {want} band numbers among "
            f"1..{count} (e.g. --bands {example})"
        )
    return list(bands)


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
    on_window: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    pool: Pool | None = None,
) -> PredictResult:
    """Segment one raster and write its outputs into ``out_dir``.

    Every output is written under a temporary name and read back complete once closed; only
    then are this input's outputs renamed into place (magseg.io.atomic.atomic_writes). Outputs that
    exist are kept unless ``options.overwrite``; when all exist the input is ``skipped``.
    Without ``options.overwrite`` an output that another run wrote meanwhile is kept too.

    Args:
        on_window: called as ``on_window(done, total)`` after each batch of crops, counted
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
    targets = output_paths(path, out_dir, options)
    result = PredictResult(input=path, output=targets["labels"], status="ok", outputs=targets,
                           runtime=segmenter.runtime)
    _remove_leftovers(_possible_outputs(path, out_dir, options), options.scratch_dir)
    todo, replace = _prepare_outputs(path, out_dir, targets, options, segmenter)
    with io_env(), RasterReader(path, nodata=options.nodata) as reader:
        if options.aoi is not None:
            reader.restrict(options.aoi)
        result.height, result.width = reader.size
        if not todo:
            result.status = "skipped"
            result.seconds = time.perf_counter() - start
            return result
        overwrite = options.overwrite or replace
        _warn(result, _georeference_warnings(reader), on_warning)
        if set(todo) <= _FROM_CLASS_MAP:  # the class map is there: segment nothing
            with atomic_writes(todo, overwrite) as temps:
                _from_class_map(targets["labels"], temps, segmenter, options,
                                targets.get("uncertainty"))
            result.seconds = time.perf_counter() - start
            return result
        reader.select(_band_order(reader, segmenter, options))
        counts = _run(segmenter, reader, todo, options, on_window, result, on_warning, pool, overwrite)
    if options.overwrite:
        result.removed = _remove_stale(path, out_dir, targets, options, segmenter.provenance)

    result.histogram = {c.name: int(counts[i]) for i, c in enumerate(segmenter.config.classes)}
    result.histogram["nodata"] = int(counts[NODATA])
    result.seconds = time.perf_counter() - start
    return result


def predict_input(
    segmenter: Segmenter,
    path: str | Path,
    out_dir: str | Path,
    options: PredictOptions = PredictOptions(),
    on_window: Callable[[int, int], None] | None = None,
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
        return predict_raster(segmenter, path, out_dir, options, on_window, on_warning, pool).to_record()
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


def _run(
    segmenter: Segmenter,
    reader: RasterReader,
    todo: dict[str, Path],
    options: PredictOptions,
    on_window: Callable[[int, int], None] | None,
    result: PredictResult,
    on_warning: Callable[[str], None] | None = None,
    pool: Pool | None = None,
    overwrite: bool | set[str] = False,
) -> np.ndarray:
    """The whole raster through the stage loop, its last stage written to every output
    being made (``overwrite``: as ``atomic_writes``). Returns the pixel count of each class
    id (and nodata, 255)."""
    config = segmenter.config
    any_valid = _early_look(segmenter, reader, result, on_warning)
    preview = None
    if "preview" in todo:
        from magseg.io.preview import PreviewCanvas

        preview = PreviewCanvas(reader.size, options.preview_size)

    with contextlib.ExitStack() as stack:
        # Entered first, left last: temporaries are renamed into place only after every
        # writer below has been closed and read back (and the COG copies made); all of this
        # input's new outputs are put in place, or none.
        # Sized and made before any output: an input without the room fails with nothing made.
        scratch = stack.enter_context(_scratch_space(segmenter, reader, options, result)) if any_valid else None
        temps = stack.enter_context(atomic_writes(todo, overwrite))
        tiled = {
            k: stack.enter_context(_scratch(fresh_partial_path(p.with_name(p.name + ".tiled"))))
            if options.cog else temps[k]
            for k, p in todo.items() if k not in _NOT_WINDOWED
        }
        provenance = segmenter.provenance.tags()
        gtiff_options = {} if options.cog else dict(options.creation_options)
        writers = {k: stack.enter_context(_writer(k, p, reader, config, provenance, gtiff_options))
                   for k, p in tiled.items()}
        need_probs = any(k in todo for k in ("probs", "uncertainty", "preview"))
        source = RasterSource(reader, segmenter.normalize)
        sink = RasterSink(source, segmenter.num_classes, writers, preview, need_probs,
                          temperature=segmenter.temperature)
        if scratch is not None:
            _stages(segmenter, source, sink, scratch, result, on_window, options, pool)
        else:  # nothing to segment: no engine run at all
            sink.write_nodata(crop_boxes(reader.size, config.pyramid.crop))

        for kind, writer in writers.items():
            writer.close()
            if options.cog:
                convert_to_cog(tiled[kind], temps[kind], _COG_RESAMPLING[kind],
                               dict(options.creation_options))
        if preview is not None:
            preview.save(temps["preview"], config.classes, title=readable_name(base_name(reader.path)),
                         metadata=segmenter.provenance.tags())
        labels = temps.get("labels", result.outputs["labels"])  # this run's, or the one there
        uncertainty = temps.get("uncertainty", result.outputs.get("uncertainty"))
        _from_class_map(labels, {k: p for k, p in temps.items() if k in _FROM_CLASS_MAP}, segmenter, options,
                        uncertainty)
        whole = None if options.aoi is None else (reader.file_size, reader.origin)  # a clip's grid
        result.seam_score = finest_seam_scores(labels, temps.get("uncertainty"), reader.size, config.pyramid,
                                               whole=whole)
    return sink.counts


# The early look reads the raster decimated to at most this many pixels a side.
_OVERVIEW_SIDE = 1024


def _early_look(segmenter: Segmenter, reader: RasterReader, result: PredictResult,
                on_warning: Callable[[str], None] | None) -> bool:
    """Before any expensive stage: the raster decimated, for the pixel-scale check (its
    warning goes to ``on_warning`` at once and into the record) and the nodata statistics.
    Returns whether the raster has any valid pixel (a decimated read that finds none is
    confirmed at full resolution, so a small valid area is never missed)."""
    pixels, valid = reader.read_overview(_OVERVIEW_SIDE)
    if pixels.dtype.kind == "f":  # valid as the stages see it: finite once normalised
        valid &= torch.isfinite(segmenter.normalize(pixels)).all(dim=0).numpy()
    observed = ChannelStats(reader.count)  # the valid pixels' statistics, raw units
    if valid.any():
        observed.update(pixels[:, valid])
    _warn(result, _scale_warnings(reader, observed, segmenter.config), on_warning)
    if valid.any():
        return True
    height, width = reader.size
    step = max(1, (64 << 20) // max(1, width * reader.count * 8))  # rows per read: ~64 MB
    return any(reader.read(Rect(r, 0, min(step, height - r), width))[1].any()
               for r in range(0, height, step))


def _scratch_space(segmenter: Segmenter, reader: RasterReader, options: PredictOptions,
                   result: PredictResult):
    """The scratch directory for this input's stage maps (``magseg.run.streaming``)."""
    pyramid = segmenter.config.pyramid
    needed = scratch_estimate(pyramid.stage_sizes(reader.size), reader.size, segmenter.num_classes,
                              final_map=segmenter.config.refine.crf.enabled)
    directory = Path(options.scratch_dir) if options.scratch_dir else result.output.parent
    return scratch_space(directory, result.output.name, needed, pyramid.crop, str(result.input))


def _stages(segmenter: Segmenter, source: RasterSource, sink: RasterSink, scratch: Scratch,
            result: PredictResult, on_window: Callable[[int, int], None] | None,
            options: PredictOptions, pool: Pool | None = None) -> None:
    """``run_stages`` over the raster, the stage maps in ``scratch``; with ``pool``, each
    stage's crop batches run on its workers (``PoolStages``)."""
    config = segmenter.config
    with contextlib.ExitStack() as stack:
        plan = None
        if options.aoi is not None:  # a clip of the whole raster's result (magseg.run.clip)
            source, plan, window = stack.enter_context(clip_stages(source.reader, config, segmenter.normalize))
            sink = ClipSink(sink, window)
        _run_stages(segmenter, source, sink, scratch, result, on_window, options, pool, plan)


def _run_stages(segmenter: Segmenter, source: RasterSource, sink, scratch: Scratch, result: PredictResult,
                on_window: Callable[[int, int], None] | None, options: PredictOptions, pool, plan) -> None:
    config = segmenter.config
    sizes = config.pyramid.stage_sizes(source.size)
    total = (sum(len(crop_boxes(size, config.pyramid.crop)) for size in sizes) if plan is None
             else plan.crops)

    def on_crops(n: int) -> None:
        result.crops += n
        if on_window:
            on_window(result.crops, total)

    run = StageRun.create(segmenter.stage_backbone, config.pyramid, refiner=segmenter.refiner,
                          refine=config.refine, engine=config.engine, on_crops=on_crops)
    crf = config.refine.crf
    # With the CRF, the final probabilities go to one more map in the scratch space, then
    # through the CRF tile by tile (with its margin) into the outputs: as segment does.
    final = (CrfSink(sink, source, scratch.new_map(len(sizes), source.size), crf, config.data.std,
                     config.engine.device) if crf.enabled else sink)
    execute = None
    if pool is not None:
        # A clip's workers read the whole raster (plan is not None), as the engine here does.
        aoi = options.aoi if plan is None else None
        execute = PoolStages(pool, source.reader.path, source.reader.bands, aoi, final, on_crops)
    try:
        with torch.inference_mode():
            run_stages(run, source, scratch.new_map, final, execute=execute, plan=plan)
            if final is not sink:
                final.finish()
    except OSError as exc:
        if not str(exc.filename or "").startswith(str(scratch.directory)):
            raise
        failure = WriteError(
            f"{result.input}: its stage maps could not be written in {scratch.directory.parent} "
            f"({exc.strerror}); free some space there or pass --scratch-dir on a larger disk; "
            "nothing was written")
        failure.target = result.output  # attributed: the outputs' own handler keeps this message
        raise failure from None
    result.scratch_bytes = scratch.peak_bytes
    result.windows = 1


def _remove_leftovers(outputs: Mapping[str, Path], scratch_dir: Path | None) -> None:
    """Remove what runs that were killed (SIGKILL, the OOM killer) left for this input's
    ``outputs`` (``_possible_outputs``): temporaries, COG intermediates and the stage-map
    scratch folder, whatever this run then decides (a run that skips cleans up too). A
    live run's files are kept (magseg.io.atomic.remove_stale_partials)."""
    labels = outputs["labels"]
    for target in outputs.values():
        remove_stale_partials(target)
        remove_stale_partials(target.with_name(target.name + ".tiled"))
    remove_stale_partials((Path(scratch_dir) if scratch_dir else labels.parent) / f"{labels.name}.scratch")


def _prepare_outputs(path: str | Path, out_dir: str | Path, targets: Mapping[str, Path],
                     options: PredictOptions, segmenter: Segmenter) -> tuple[dict[str, Path], set[str]]:
    """The outputs to make and those of them that replace a file (``_outputs_to_make``),
    after refusing targets that would replace the input or are directories; ``out_dir`` is
    created when there is anything to make."""
    if not is_virtual(path) and Path(path).exists() and targets["labels"].resolve() == Path(path).resolve():
        raise RasterError(f"{path}: the output would replace the input; choose another --out-dir")
    for target in targets.values():
        if target.is_dir():
            raise RasterError(f"{path}: its output {target} is a directory; remove or rename it, "
                              "or choose another --out-dir")
    todo, replace = _outputs_to_make(targets, options, segmenter.provenance)
    if todo and not options.overwrite:
        # The class map is made now: no companion of another model may stay beside it.
        _check_companions(_companions(path, out_dir, targets, options), segmenter.provenance)
    if todo:
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RasterError(f"cannot create output directory {out_dir}: {exc.strerror}") from None
    return todo, replace


# Outputs whose tags say which model made them: a file of these kinds without them is not
# magseg's (the class names sidecar goes with the class map, and is made again with it).
_TAGGED = {"labels", "probs", "uncertainty", "preview", "vector"}
def _outputs_to_make(targets: Mapping[str, Path], options: PredictOptions,
                     mine: Provenance) -> tuple[dict[str, Path], set[str]]:
    """The outputs this run writes: all with ``--overwrite``; else those missing, and a
    vector layer this model made with other polygon options (or that cannot say which: a
    GeoJSON), made again from the class map (the second value: the kinds it replaces).
    Every other existing output must be this model's (``_existing``), or the input fails."""
    if options.overwrite:
        return dict(targets), set()
    todo = {k: p for k, p in targets.items() if not p.exists()}
    if "labels" not in todo:  # the class names and style go with the class map they describe
        todo.pop("categories", None)
        todo.pop("style", None)
    replace = set()
    for kind, path in targets.items():
        if kind in todo or kind not in _TAGGED:
            continue
        state = _existing(kind, path, mine, options)
        if state == "remake":
            todo[kind] = path
            replace.add(kind)
        elif state != "mine":
            raise OutputExistsError(state)
    return todo, replace


def _existing(kind: str, path: Path, mine: Provenance, options: PredictOptions) -> str:
    """``"mine"`` when the output at ``path`` carries this run's checkpoint and config
    digests (and, for polygons, this run's options), ``"remake"`` for polygons of this model
    with other options or none recorded, else the reason it cannot be kept (a message)."""
    tags = output_tags(path)
    if tags is None:
        return (f"{path} is in the way: it is not a readable {path.suffix} file, so not an output "
                "of magseg; move it away, or pass --overwrite to replace it")
    theirs = Provenance.from_tags(tags)
    if theirs is None and not (kind == "vector" and path.suffix.lower() == ".geojson"):
        return (f"{path} is in the way: it has no magseg provenance tags, so not an output of "
                "this model; move it away, or pass --overwrite to replace it")
    if theirs is not None and not theirs.same_model(mine):
        return (f"{path} was made by another model ({theirs.describe()}); this run is "
                f"{mine.describe()}. Pass --overwrite to replace it, or choose another --out-dir")
    if kind == "vector":
        assert options.vector is not None
        if theirs is None or tags.get(VECTOR_OPTIONS_TAG) != options_tag(options.vector):
            return "remake"
    return "mine"


def _possible_outputs(path: str | Path, out_dir: str | Path, options: PredictOptions) -> dict[str, Path]:
    """Every file a predict run may make for this input, whatever its flags, by kind
    (polygons in each format as ``vector <format>``)."""
    stem = options.stem or source_stem(path)
    names = {k: n for k, n in OUTPUT_NAMES.items() if k != "vector"}
    names.update({f"vector {f}": "{stem}" + suffix for f, (_, suffix) in VECTOR_FORMATS.items()})
    return {kind: Path(out_dir) / name.format(stem=stem) for kind, name in names.items()}


def _companions(path: str | Path, out_dir: str | Path, targets: Mapping[str, Path],
                options: PredictOptions) -> dict[str, Path]:
    """The files an earlier run may have made for this input that this run does not write
    (extras not asked for now, polygons in another format), by kind."""
    wanted = set(targets.values())
    return {kind: candidate for kind, candidate in _possible_outputs(path, out_dir, options).items()
            if kind != "categories" and candidate not in wanted and candidate.is_file()}


def _check_companions(companions: Mapping[str, Path], mine: Provenance) -> None:
    """Refuse to write a class map beside another model's outputs of the same input."""
    for kind, companion in companions.items():
        theirs = Provenance.from_tags(output_tags(companion) or {})
        if theirs is not None and not theirs.same_model(mine):
            raise OutputExistsError(
                f"{companion} was made by another model ({theirs.describe()}) and would stay beside "
                f"this run's outputs ({mine.describe()}); pass --overwrite to replace this input's "
                "outputs and remove it, or choose another --out-dir")


def _remove_stale(path: str | Path, out_dir: str | Path, targets: Mapping[str, Path],
                  options: PredictOptions, mine: Provenance) -> list[Path]:
    """After --overwrite made this input's outputs: remove the other files of this input
    (``_companions``) that do not carry this model's digests. Returns the removed paths."""
    removed = []
    for companion in _companions(path, out_dir, targets, options).values():
        theirs = Provenance.from_tags(output_tags(companion) or {})
        if theirs is None or not theirs.same_model(mine):
            with contextlib.suppress(FileNotFoundError):
                companion.unlink()
                removed.append(companion)
    return removed


def _from_class_map(labels: Path, temps: Mapping[str, Path], segmenter: Segmenter,
                    options: PredictOptions, uncertainty: Path | None = None) -> None:
    """The outputs made from the finished class map ``labels``: the class names for GIS
    tools (``categories``), its QGIS style (``style``) and, with ``--vector``, its polygons
    (magseg.io.vector, styled too), with their mean and least confidence when there is an
    ``uncertainty`` raster (--uncertainty)."""
    classes = segmenter.config.classes
    if "categories" in temps:
        write_categories(temps["categories"], [(c.id, c.name, tuple(c.color)) for c in classes])
    if "style" in temps:
        write_raster_style(temps["style"], [(c.id, c.name, tuple(c.color)) for c in classes])
    if "vector" in temps:
        assert options.vector is not None
        polygonize(labels, temps["vector"], [c.name for c in classes], options.vector,
                   metadata={**segmenter.provenance.tags(),
                             VECTOR_OPTIONS_TAG: options_tag(options.vector)},
                   colors=[tuple(c.color) for c in classes], uncertainty=uncertainty)


def _warn(result: PredictResult, warnings: list[str], on_warning: Callable[[str], None] | None) -> None:
    """Add ``warnings`` to the record, and tell ``on_warning`` each at once."""
    for warning in warnings:
        result.warnings.append(warning)
        if on_warning:
            on_warning(warning)


def _georeference_warnings(reader: RasterReader) -> list[str]:
    """A warning for a raster that says nowhere where it lies: its outputs are in pixel
    coordinates (GDAL and pyogrio would each print their own lines about it)."""
    if reader.geo.georeferenced:
        return []
    return [f"{reader.path}: has no georeference (no CRS, transform, GCPs or RPCs), so its "
            "outputs are in pixel coordinates, polygons included, and do not line up with other "
            "data in a GIS; georeference the input first (e.g. gdal_translate -a_srs -a_ullr) "
            "if they must"]


def _scale_warnings(reader: RasterReader, observed: ChannelStats, config: Config) -> list[str]:
    """A warning when some band's pixels are on another scale than the training data's
    (``scale_mismatches``): the outputs are written all the same, but they are likely wrong.
    None for fewer than ``SCALE_MIN_PIXELS`` valid pixels, too few to judge a scale by."""
    if observed.pixels < SCALE_MIN_PIXELS or config.data.mean is None or config.data.std is None:
        return []
    off = scale_mismatches(observed, config.data.mean, config.data.std)
    if not off:
        return []
    seen_mean, seen_std = observed.result()
    bands = "; ".join(
        f"band {reader.bands[c]} mean {seen_mean[c]:.4g} std {seen_std[c]:.4g}, "
        f"{f'{ratio:.3g} times' if ratio > 1 else f'1/{1 / ratio:.3g} of'} training's "
        f"(mean {config.data.mean[c]:.4g} std {config.data.std[c]:.4g})"
        for c, ratio in off
    )
    return [
        f"{reader.path}: pixel values on another scale than the model's training data, so the "
        f"classes are likely wrong: {bands}. Check --bands, rescale the input to the training "
        "data's range (e.g. gdal_translate -ot Byte -scale), or train on such data"
    ]


def _writer(kind: str, path: Path, reader: RasterReader, config: Config,
            provenance: Mapping[str, str], creation_options: Mapping[str, str]) -> RasterWriter:
    """The writer of one output kind, georeferenced like the input and tagged with what
    made it (``provenance``)."""
    geo = reader.geo
    names = [c.name for c in config.classes]
    if kind == "labels":
        tags = {
            **provenance,
            "MAGSEG_CLASSES": json.dumps(
                [{"id": c.id, "name": c.name, "color": list(c.color)} for c in config.classes]
            ),
            "MAGSEG_SOURCE": readable_name(base_name(reader.path)),
            **{f"CLASS_{c.id}": c.name for c in config.classes},
        }
        return RasterWriter(path, reader.size, 1, geo, nodata=NODATA, tags=tags,
                            colors=[c.color for c in config.classes], descriptions=["class"],
                            creation_options=creation_options)
    if kind == "probs":
        return RasterWriter(path, reader.size, len(names), geo, nodata=NODATA, mask=True,
                            descriptions=names, scale=1 / VALUE_MAX,
                            tags={"MAGSEG_VALUES": f"probability x {VALUE_MAX}", "MAGSEG_SOURCE": readable_name(base_name(reader.path)),
                                  **provenance}, creation_options=creation_options)
    return RasterWriter(path, reader.size, 1, geo, nodata=NODATA, mask=True,
                        descriptions=["uncertainty"], scale=1 / VALUE_MAX,
                        tags={"MAGSEG_VALUES": f"(1 - certainty) x {VALUE_MAX}; certainty = top-1 minus "
                              "top-2 probability", "MAGSEG_SOURCE": readable_name(base_name(reader.path)),
                              **provenance}, creation_options=creation_options)
