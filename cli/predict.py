"""``magseg predict``: segment GeoTIFFs (and JPEG2000, PNG, JPEG) of any size, window by window."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import typer

from magseg.cli.app import app
from magseg.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    emit,
    expand_inputs,
    fail,
    handle_errors,
    log,
    progress_bar,
)


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


def _check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it writable before any work (exit 2 if not)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".magseg-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        fail(f"output directory {out_dir} is not writable ({exc.strerror}); "
             "choose another --out-dir or fix its permissions", EXIT_USAGE)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  magseg predict runs/dg/best.ckpt scenes/*.tif --out-dir pred/\n\n"
        "  magseg predict model.ckpt big_mosaic.tif -o pred/ --probs --uncertainty --cog\n\n"
        "  find /data -name '*.jp2' | magseg predict model.ckpt - -o pred/ --bands 4,3,2\n\n"
        "  magseg predict model.ckpt tiles/ -o pred/ --preview | jq -c 'select(.status==\"failed\")'\n\n"
        "Outputs per input <stem>: <stem>.tif (uint8 class ids, nodata 255, colour table and class "
        "names from the checkpoint, same size, CRS and transform as the input); with --probs "
        "<stem>_probs.tif (one band per class, probability x 255); with --uncertainty "
        "<stem>_uncertainty.tif ((1 - certainty) x 255); with --preview <stem>_preview.png. "
        "Exit status: 0 all inputs done (or already done), 1 some input failed (the others are "
        "still processed), 2 usage error."
    )
)
@handle_errors
def predict(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `magseg train`."),
    inputs: list[str] = typer.Argument(
        ..., help="Rasters: files, globs, directories, or - to read paths from stdin (one per line)."
    ),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Directory for the outputs (created)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace existing outputs (default: skip them, so a re-run resumes)."
    ),
    probs: bool = typer.Option(False, "--probs", help="Also write per-class probabilities (uint8)."),
    uncertainty: bool = typer.Option(False, "--uncertainty", help="Also write 1 - certainty (uint8)."),
    cog: bool = typer.Option(False, "--cog", help="Cloud-optimised GeoTIFFs with overviews."),
    preview: bool = typer.Option(
        False, "--preview", help="A PNG beside each output: image | classes | uncertainty, downsampled."
    ),
    bands: str = typer.Option(
        None, "--bands", help="1-based input bands in the model's order, e.g. 4,3,2 "
        "(default: the checkpoint's data.bands)."
    ),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Crops per backbone batch "
                                   "(default: the checkpoint's engine.batch_size)."),
    device: str = typer.Option(None, help="cpu or cuda (default: the checkpoint's engine.device)."),
    margin: int = typer.Option(
        None, min=0, help="Minimum context margin of a window, in pixels (default: 1/8 of the scene)."
    ),
    settings: list[str] = typer.Option(
        None, "--set", help="Run-time config override key=value, e.g. --set refine.points=0.25 "
        "--set engine.adaptive.max_crops=8 (repeatable)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr."),
) -> None:
    """Segment rasters with a trained checkpoint; one JSON line per input on stdout.

    A raster larger than one scene (the pyramid's finest scale) is processed as scene-sized
    windows with a context margin that is segmented and discarded, each window written as soon
    as it is done, so memory does not depend on the raster's size. Input nodata (declared, or
    pixels 0 in every band when none is declared) becomes 255. Every file is written under a
    temporary name and renamed when complete.
    """
    from magseg.errors import CheckpointError, ConfigError
    from magseg.predict import INPUT_SUFFIXES, PredictOptions
    from magseg.segmenter import Segmenter

    options = PredictOptions(probs=probs, uncertainty=uncertainty, cog=cog, preview=preview,
                             overwrite=overwrite, bands=_parse_bands(bands), margin=margin)
    paths = expand_inputs(inputs, INPUT_SUFFIXES)
    if not paths:
        fail("no input rasters found in " + " ".join(inputs), EXIT_USAGE)
    _check_out_dir(out_dir)

    overrides = list(settings or [])
    if batch_size is not None:
        overrides.append(f"engine.batch_size={batch_size}")
    if device is not None:
        overrides.append(f"engine.device={device}")
    try:
        segmenter = Segmenter.from_checkpoint(checkpoint, overrides)
    except (CheckpointError, ConfigError) as exc:
        fail(str(exc), EXIT_USAGE)
    want = segmenter.config.model.in_channels
    if options.bands is not None and len(options.bands) != want:
        fail(f"--bands lists {len(options.bands)} band(s) but the model in {checkpoint} takes {want}",
             EXIT_USAGE)

    with _sigterm_as_interrupt():
        failed = _predict_all(segmenter, paths, out_dir, options, quiet)
    if failed:
        log(f"magseg: {failed} of {len(paths)} input(s) failed", quiet)
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


def _predict_all(segmenter, paths: list[Path], out_dir: Path, options, quiet: bool) -> int:
    """Predict each input in turn, one NDJSON line each; returns how many failed."""
    from magseg.errors import MagsegError
    from magseg.predict import output_paths, predict_raster

    failed = 0
    claimed: dict[Path, Path] = {}
    for number, path in enumerate(paths, start=1):
        start = time.perf_counter()
        target = output_paths(path, out_dir, options)["labels"]
        try:
            if target.resolve() in claimed:
                raise MagsegError(
                    f"{path}: its output {target} is also the output of "
                    f"{claimed[target.resolve()]} (same file name); predict them into "
                    "different --out-dir"
                )
            claimed[target.resolve()] = path
            with progress_bar(None, path.name, quiet, unit="window") as bar:
                def on_window(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(1)

                record = predict_raster(segmenter, path, out_dir, options, on_window).to_record()
        except MagsegError as exc:
            record = _failed(path, target, str(exc), start)
        except Exception as exc:  # noqa: BLE001  one bad input never aborts the batch
            record = _failed(path, target, f"{type(exc).__name__}: {exc}", start)
        failed += record["status"] == "failed"
        emit(record)
        note = f" ({record['error']})" if record["error"] else ""
        if record["status"] == "skipped":
            note = " (outputs exist; --overwrite replaces them)"
        log(f"magseg: [{number}/{len(paths)}] {path} -> {target}: {record['status']}, "
            f"{record['seconds']:.1f} s{note}", quiet)
    return failed


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


def _failed(path: Path, target: Path, error: str, start: float) -> dict:
    from magseg.predict import PredictResult

    return PredictResult(input=path, output=target, status="failed", error=error,
                         seconds=time.perf_counter() - start).to_record()
