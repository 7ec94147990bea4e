"""``magseg predict``: segment GeoTIFFs (and JPEG2000, PNG, JPEG) of any size, window by window."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import tempfile
import threading
from enum import Enum
from pathlib import Path

import typer
from magseg.cli.app import Command, app
from magseg.cli.common import (
    ADAPTIVE_MAX_CROPS,
    ADAPTIVE_THRESHOLD,
    BATCH_SIZE,
    DEVICE,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    OVERWRITE,
    QUIET,
    RAY_ADDRESS,
    REMOVED_ENGINE,
    RUNNER,
    SETTINGS,
    TTA,
    WORKERS,
    Runner,
    check_checkpoint,
    check_device,
    config_overrides,
    emit,
    examples,
    expand_inputs,
    fail,
    handle_errors,
    load_model,
    log,
    out_dir_option,
    progress_bar,
    removed_option,
)
from magseg.io.vector_formats import VECTOR_FORMATS


# --vector (and vectorize's --format): the polygon formats, as listed in magseg.io.vector_formats.
VectorFormat = Enum("VectorFormat", {name: name for name in VECTOR_FORMATS}, type=str)
FORMAT_NAMES = ", ".join(list(VECTOR_FORMATS)[:-1]) + " or " + list(VECTOR_FORMATS)[-1]


def _parse_bands(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        bands = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of band numbers (e.g. 1,2,3)",
                                 param_hint="--bands") from None
    if not bands or min(bands) < 1:
        raise typer.BadParameter(f"{text!r}: bands are numbered from 1 (e.g. 1,2,3)", param_hint="--bands")
    return bands


def _check_bands(bands: tuple[int, ...] | None, want: int, checkpoint: Path) -> None:
    if bands is not None and len(bands) != want:
        fail(f"--bands lists {len(bands)} band(s) but the model in {checkpoint} takes {want}",
             EXIT_USAGE)


def _area_of_interest(bbox: str | None, bbox_crs: str | None, aoi: Path | None):
    """--bbox [--bbox-crs] or --aoi as a magseg.io.aoi.AreaOfInterest (None: everything)."""
    from magseg.io import aoi as areas

    if bbox is not None and aoi is not None:
        fail("give --bbox or --aoi, not both", EXIT_USAGE)
    if bbox_crs is not None and bbox is None:
        fail("--bbox-crs is the CRS of --bbox; add --bbox minx,miny,maxx,maxy", EXIT_USAGE)
    if bbox is not None:
        return areas.bbox(bbox, bbox_crs)
    return None if aoi is None else areas.from_file(aoi)


def _parse_creation_options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE (e.g. COMPRESS=ZSTD)", param_hint="--co")
        options[key.strip().upper()] = value.strip()
    return options


def _check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it writable before any work (exit 2 if not, with the
    directories it made removed again: exit 2 leaves nothing behind)."""
    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".magseg-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        for directory in made:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()
        fail(f"output directory {out_dir} is not writable ({exc.strerror}); "
             "choose another --out-dir or fix its permissions", EXIT_USAGE)


# predict's own options (the shared ones come from magseg.cli.common).
CHECKPOINT = typer.Argument(..., metavar="CHECKPOINT", help="A checkpoint written by `magseg train`.")
INPUTS = typer.Argument(
    ..., metavar="INPUTS", help="Rasters: files, globs, directories, or - to read paths from stdin (one per line).")
OUT_DIR = out_dir_option("the outputs; or, for exactly one input, the class map's file name "
                         "(FILE.tif), its other outputs beside it")
SCRATCH_DIR = typer.Option(
    None, "--scratch-dir", file_okay=False, metavar="DIR",
    help="Where the per-stage scratch maps go; default: beside the outputs.")
CREATION_OPTIONS = typer.Option(
    None, "--co", "-co", metavar="KEY=VALUE", help="GDAL creation option for the GeoTIFF outputs "
    "(the COG driver's with --cog), over magseg's defaults, e.g. --co COMPRESS=ZSTD (repeatable; "
    "-co, GDAL's spelling, too).")
PROBS = typer.Option(False, "--probs", help="Also write per-class probabilities (uint8).")
UNCERTAINTY = typer.Option(False, "--uncertainty", help="Also write 1 - certainty (uint8).")
COG = typer.Option(False, "--cog", help="Cloud-optimised GeoTIFFs with overviews.")
PREVIEW = typer.Option(
    False, "--preview", help="A PNG beside each output: image | classes | uncertainty, downsampled.")
VECTOR = typer.Option(
    None, "--vector", metavar="|".join(VECTOR_FORMATS), help=f"Also write the class map as polygons: {FORMAT_NAMES} "
    "(class_id, class_name, area in CRS units; made in strips, memory does not grow with the raster).")
MIN_AREA = typer.Option(
    0.0, "--min-area", min=0, metavar="AREA", help="With --vector: drop polygons smaller than this (CRS units squared, "
    "m² when projected).")
SIMPLIFY = typer.Option(
    0.0, "--simplify", min=0, metavar="TOLERANCE",
    help="With --vector: simplify outlines by this tolerance (CRS units).")
BBOX = typer.Option(
    None, "--bbox", metavar="MINX,MINY,MAXX,MAXY",
    help="Only this area, minx,miny,maxx,maxy (in --bbox-crs; default the raster's CRS): read, "
    "segmented and written over it, the outputs' transform and size its window's.")
BBOX_CRS = typer.Option(None, "--bbox-crs", metavar="CRS", help="The CRS of --bbox, e.g. EPSG:4326.")
AOI = typer.Option(
    None, "--aoi", metavar="FILE", help="Only the area of these polygons (a GeoJSON, GeoPackage... in its own CRS); "
    "pixels outside them are nodata.")
NODATA = typer.Option(
    None, "--nodata", metavar="VALUE", help="Pixels equal to this value in every band are nodata (255 in the class "
    "map), whatever the file declares; e.g. --nodata 0 for black padding, --nodata nan. Default: "
    "GDAL's rule (the file's nodata value, then its mask or alpha band, else every pixel is valid).")
BANDS = typer.Option(
    None, "--bands", metavar="B,B,...", help="1-based input bands in the model's order, e.g. 4,3,2 "
    "(default: the checkpoint's data.bands).")
REMOVED_MARGIN = removed_option(
    "--margin", "predict runs the pyramid over the whole raster, so there are no windows and no "
    "margin; drop --margin")


@app.command(cls=Command, epilog=examples([
    "magseg predict runs/dg/best.ckpt scenes/*.tif -o pred/",
    "magseg predict model.ckpt big_mosaic.tif -o pred/ --probs --uncertainty --cog",
    "magseg predict model.ckpt scene.tif -o pred/scene_classes.tif -co COMPRESS=LZW",
    "find /data -name '*.jp2' | magseg predict model.ckpt - -o pred/ --bands 4,3,2",
    "magseg predict model.ckpt s3://bucket/scene.tif -o pred/ --vector gpkg "
    "--bbox 12.40,41.80,12.60,41.95 --bbox-crs EPSG:4326",
    "magseg predict model.ckpt tiles/ -o pred/ --preview | jq -c 'select(.status==\"failed\")'",
], after=[
    "Outputs per input <stem>: <stem>.tif (uint8 class ids, nodata 255, colour table and class "
    "names from the checkpoint, same size, CRS and transform as the input) with <stem>.qml (its "
    "QGIS style); with --probs <stem>_probs.tif (one band per class, probability x 254, nodata "
    "255); with --uncertainty <stem>_uncertainty.tif ((1 - certainty) x 254, nodata 255); with "
    "--preview <stem>_preview.png; with --vector gpkg|fgb|geojson <stem>.gpkg (etc.): one polygon "
    "per class region, with class_id, class_name and area in CRS units.",
    "Exit status: 0 all inputs done (or already done), 1 some input failed (the others are "
    "still processed), 2 usage error.",
]))
@handle_errors
def predict(
    checkpoint: Path = CHECKPOINT,
    inputs: list[str] = INPUTS,
    out_dir: Path = OUT_DIR,
    scratch_dir: Path = SCRATCH_DIR,
    creation_options: list[str] = CREATION_OPTIONS,
    overwrite: bool = OVERWRITE,
    probs: bool = PROBS,
    uncertainty: bool = UNCERTAINTY,
    cog: bool = COG,
    preview: bool = PREVIEW,
    vector: VectorFormat = VECTOR,
    min_area: float = MIN_AREA,
    simplify: float = SIMPLIFY,
    bbox: str = BBOX,
    bbox_crs: str = BBOX_CRS,
    aoi: Path = AOI,
    bands: str = BANDS,
    nodata: float = NODATA,
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    tta: str = TTA,
    settings: list[str] = SETTINGS,
    adaptive_threshold: float = ADAPTIVE_THRESHOLD,
    adaptive_max_crops: int = ADAPTIVE_MAX_CROPS,
    runner: Runner = RUNNER,
    ray_address: str = RAY_ADDRESS,
    workers: int = WORKERS,
    quiet: bool = QUIET,
    old_engine: str = REMOVED_ENGINE,
    old_margin: str = REMOVED_MARGIN,
) -> None:
    """Segment rasters with a trained checkpoint; one JSON line per input on stdout.

    The pyramid runs over the whole raster; the per-stage maps it keeps between stages are
    written to scratch files (--scratch-dir), so memory does not depend on the raster's
    size. Input nodata (the file's nodata value, mask or alpha band, or --nodata) becomes
    255. Every file is written under a temporary name and renamed when complete.
    """
    check_checkpoint(checkpoint, settings)  # before torch is imported: a missing file costs nothing
    check_device(device)
    options = _predict_options(
        probs=probs, uncertainty=uncertainty, cog=cog, preview=preview, overwrite=overwrite,
        bands=bands, scratch_dir=scratch_dir, creation_options=creation_options or [],
        area=(bbox, bbox_crs, aoi), vector=vector, min_area=min_area,
        simplify=simplify, nodata=nodata)
    paths, out_dir, options = _inputs_and_outputs(inputs, out_dir, options)
    overrides = config_overrides(settings, {
        "engine.batch_size": batch_size, "engine.device": device, "engine.tta": tta,
        "engine.adaptive.threshold": adaptive_threshold, "engine.adaptive.max_crops": adaptive_max_crops})
    model = load_model(runner, checkpoint, overrides, quiet, checked=True)
    _check_bands(options.bands, model.config.model.in_channels, checkpoint)
    _check_out_dir(out_dir)  # the first thing created: every usage error is found before it

    with _sigterm_as_interrupt():
        if model.runner is Runner.ray:
            failed = _predict_all_ray(model, paths, out_dir, options, quiet, ray_address, workers)
        else:
            assert model.segmenter is not None  # load_model builds it for a local runner
            failed = _predict_all(model.segmenter, paths, out_dir, options, quiet)
    if failed:
        log(f"magseg: {failed} of {len(paths)} input(s) failed", quiet)
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


def _predict_options(*, bands: str | None, creation_options: list[str], cog: bool, vector,
                     min_area: float, simplify: float, area: tuple, **flags):
    """The output flags as PredictOptions, each checked (exit 2 on a bad one) before any
    checkpoint or raster is read. ``area``: (--bbox, --bbox-crs, --aoi); ``flags``: the
    PredictOptions fields the CLI passes as they are."""
    from magseg.run.predict import PredictOptions
    from magseg.io.raster import check_creation_options
    from magseg.io.vector_formats import VectorOptions

    if vector is None and (min_area or simplify):
        fail("--min-area and --simplify shape the polygons of --vector; add --vector gpkg (or fgb, "
             "geojson)", EXIT_USAGE)
    aoi = _area_of_interest(*area)
    gdal_options = _parse_creation_options(creation_options)
    check_creation_options("COG" if cog else "GTiff", gdal_options)
    polygons = None if vector is None else VectorOptions(vector.value, min_area=min_area,
                                                         simplify=simplify)
    return PredictOptions(cog=cog, bands=_parse_bands(bands), aoi=aoi, vector=polygons,
                          creation_options=tuple(gdal_options.items()), **flags)


def _inputs_and_outputs(inputs: list[str], out_dir: Path, options):
    """``(paths, out_dir, options)``: the inputs expanded, and -o as a directory (made later,
    by ``_check_out_dir``); ``-o FILE.tif`` for one input names its class map (``options.stem``)."""
    from magseg.run.predict import INPUT_SUFFIXES

    paths = expand_inputs(inputs, INPUT_SUFFIXES)
    if not paths:
        fail("no input rasters found in " + " ".join(inputs), EXIT_USAGE)
    if out_dir.suffix.lower() in (".tif", ".tiff"):
        if len(paths) != 1:
            fail(f"-o {out_dir} names one class map, but there are {len(paths)} inputs; give a "
                 "directory for several", EXIT_USAGE)
        options = dataclasses.replace(options, stem=out_dir.stem)
        out_dir = out_dir.parent
    return paths, out_dir, options


def _clashing_outputs(paths: list[Path], out_dir: Path, options, runtime: dict) -> dict[Path, dict]:
    """Failed records for inputs whose output name is already an earlier input's (two
    ``a.tif`` from different folders into one --out-dir), keyed by input."""
    from magseg.run.predict import failed_record, output_paths

    claimed: dict[Path, Path] = {}
    clashes: dict[Path, dict] = {}
    for path in paths:
        target = output_paths(path, out_dir, options)["labels"]
        if target.resolve() in claimed:
            clashes[path] = failed_record(
                path, target, f"{path}: its output {target} is also the output of "
                f"{claimed[target.resolve()]} (same file name); predict them into different --out-dir",
                runtime=runtime)
        else:
            claimed[target.resolve()] = path
    return clashes


def _report(record: dict, number: int, total: int, quiet: bool, warned: bool = False) -> None:
    """The record on stdout and a line on stderr (with its warnings, unless ``warned``
    already said them as they came)."""
    emit(record)
    note = f" ({record['error']})" if record["error"] else ""
    if record["status"] == "skipped":
        note = " (outputs exist; --overwrite replaces them)"
    if record.get("removed"):
        note += f" (removed {len(record['removed'])} output(s) another model made: " \
                f"{', '.join(record['removed'])})"
    log(f"magseg: [{number}/{total}] {record['input']} -> {record['output']}: {record['status']}, "
        f"{record['seconds']:.1f} s{note}", quiet)
    for warning in [] if warned else record["warnings"]:
        log(f"magseg: warning: {warning}", quiet)


@contextlib.contextmanager
def _input_progress(path, quiet: bool):
    """One input's progress bar (in crops, over all stages) and where its warnings go: at
    once, above the bar, before the first stage runs. Yields ``(on_crops, on_warning)``."""
    from magseg.io.sources import base_name

    with progress_bar(None, base_name(path), quiet, unit="crop") as bar:
        def on_crops(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        def on_warning(message: str) -> None:
            if not quiet:
                bar.write(f"magseg: warning: {message}", file=sys.stderr)

        yield on_crops, on_warning


def _predict_all(segmenter, paths: list[Path], out_dir: Path, options, quiet: bool) -> int:
    """Predict each input in turn, one NDJSON line each; returns how many failed. A batch
    gets one overall bar (inputs, with an ETA) above each input's own (crops)."""
    from magseg.run.predict import predict_input

    clashes = _clashing_outputs(paths, out_dir, options, segmenter.runtime)
    failed = 0
    batch = progress_bar(len(paths), "inputs", quiet or len(paths) < 2, unit="input")
    with batch:
        for number, path in enumerate(paths, start=1):
            record = clashes.get(path)
            if record is None:
                with _input_progress(path, quiet) as (on_crops, on_warning):
                    record = predict_input(segmenter, path, out_dir, options, on_crops, on_warning)
            failed += record["status"] == "failed"
            batch.update(1)
            _report(record, number, len(paths), quiet, warned=clashes.get(path) is None)
    return failed


def _predict_all_ray(model, paths: list[Path], out_dir: Path, options, quiet: bool,
                     address: str | None, workers: int | None) -> int:
    """Predict the inputs on Ray actors; one NDJSON line per input as each finishes."""
    from magseg.run.predict import failed_record, output_paths, predict_input
    from magseg.segmenter import run_info

    runtime = run_info(model.config)  # as each actor's Segmenter says it (backbone runtime included)

    clashes = _clashing_outputs(paths, out_dir, options, runtime)
    todo = [p for p in paths if p not in clashes]
    failed = 0
    for number, record in enumerate(clashes.values(), start=1):
        failed += 1
        _report(record, number, len(paths), quiet)

    def lost(task: tuple, reason: str) -> dict:
        path = task[0]
        return failed_record(path, output_paths(path, out_dir, options)["labels"], f"{path}: {reason}",
                             runtime=runtime)

    if len(todo) == 1:
        return failed + _predict_one_on_ray(model, todo[0], out_dir, options, quiet, address, workers)
    tasks = [(path, out_dir, options) for path in todo]
    with model.pool(workers, address, quiet) as pool, \
            progress_bar(len(tasks), "inputs", quiet, unit="input") as bar:
        for number, (_, record) in enumerate(pool.map_unordered(predict_input, tasks, lost),
                                             start=len(clashes) + 1):
            bar.update(1)
            failed += record["status"] == "failed"
            _report(record, number, len(paths), quiet)
    return failed


def _predict_one_on_ray(model, path, out_dir: Path, options, quiet: bool, address: str | None,
                        workers: int | None) -> int:
    """One raster on Ray: each stage's crop batches on the actors, the outputs written here
    (the raster and the scratch directory must be on storage every worker sees)."""
    from magseg.run.predict import predict_input
    from magseg.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(model.loaded, list(model.overrides))  # the actors' bytes
    with model.pool(workers, address, quiet) as pool, \
            _input_progress(path, quiet) as (on_crops, on_warning):
        record = predict_input(segmenter, path, out_dir, options, on_crops, on_warning, pool=pool)
    _report(record, 1, 1, quiet, warned=True)
    return int(record["status"] == "failed")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A batch scheduler's SIGTERM ends the run like Ctrl-C: the file being written is
    removed on the way out (atomic_write) instead of left behind as a stray temporary."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
