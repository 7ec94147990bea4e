"""``magseg suggest``: the windows of a batch of rasters where the model is least sure, ranked,
as a GeoPackage a labeller opens in QGIS."""

from __future__ import annotations

from pathlib import Path

import typer
from magseg.cli.app import Command, app
from magseg.cli.common import (
    BATCH_SIZE,
    DEVICE,
    EXIT_FAILED,
    EXIT_OK,
    OVERWRITE,
    QUIET,
    SETTINGS,
    TTA,
    check_device,
    config_overrides,
    emit,
    examples,
    expand_inputs,
    handle_errors,
    load_model,
    log,
    out_dir_option,
)

# suggest's own options (the shared ones come from magseg.cli.common).
CHECKPOINT = typer.Argument(..., help="Checkpoint written by `magseg train`.")
RASTERS = typer.Argument(..., help="Rasters (files, directories of .tif, globs, or - for stdin).")
OUTPUT = out_dir_option("to_label.gpkg; or -o FILE.gpkg: that file")
N = typer.Option(50, "--n", min=1, metavar="N", help="How many windows to suggest (over all rasters).")
SIZE = typer.Option(None, "--size", min=1, metavar="PX", help="Window side in pixels (default 256).")
GROUND_SIZE = typer.Option(
    None, "--ground-size", min=0.0, metavar="M", help="Window side in metres (projected rasters): --size from each "
    "raster's pixel size.")
PREDICTIONS = typer.Option(
    None, "--predictions", metavar="DIR", help="Directory where `magseg predict --uncertainty` wrote <stem>.tif and "
    "<stem>_uncertainty.tif: reused when their provenance names this checkpoint (default: the "
    "GeoPackage's directory); otherwise predict runs into a scratch directory.")

SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")


@app.command(cls=Command, epilog=examples([
    "magseg predict runs/dg/best.ckpt scenes/*.tif -o pred/ --uncertainty",
    "magseg suggest runs/dg/best.ckpt scenes/*.tif --predictions pred/ -o to_label.gpkg --n 50",
    "magseg suggest model.ckpt tiles/ -o batch2/to_label.gpkg --ground-size 200 --tta flip",
]))
@handle_errors
def suggest(
    checkpoint: Path = CHECKPOINT,
    rasters: list[str] = RASTERS,
    out_dir: Path = OUTPUT,
    n: int = N,
    size: int = SIZE,
    ground_size: float = GROUND_SIZE,
    predictions: Path = PREDICTIONS,
    overwrite: bool = OVERWRITE,
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    tta: str = TTA,
    settings: list[str] = SETTINGS,
    quiet: bool = QUIET,
) -> None:
    """Suggest where to label next: the N non-overlapping windows with the highest mean
    uncertainty over all RASTERS, ranked, with each window's predicted class shares.

    stdout: one JSON line per raster (whether predict's uncertainty was reused), then one
    summary line. Exit 1 when a raster failed (the others are still ranked and written).
    """
    from magseg.errors import OutputExistsError

    check_device(device)
    output = out_dir if out_dir.suffix.lower() == ".gpkg" else out_dir / "to_label.gpkg"
    if size is not None and ground_size is not None:
        raise typer.BadParameter("give --size or --ground-size, not both", param_hint="--size")
    if ground_size is not None and not ground_size > 0:
        raise typer.BadParameter(f"{ground_size}: give a window side > 0 metres", param_hint="--ground-size")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    paths = [Path(p) for p in expand_inputs(rasters, SUFFIXES)]
    if not paths:
        raise typer.BadParameter("no rasters given", param_hint="RASTERS")
    model = load_model(_local(), checkpoint, config_overrides(settings, {
        "engine.batch_size": batch_size, "engine.device": device, "engine.tta": tta}))
    output.parent.mkdir(parents=True, exist_ok=True)
    found = _prepare_all(model.segmenter, paths, predictions or output.parent, output.parent, size,
                         ground_size, n, output, overwrite, quiet)
    raise typer.Exit(EXIT_FAILED if found else EXIT_OK)


def _local():
    from magseg.cli.common import Runner

    return Runner.local


def _prepare_all(segmenter, paths, predictions: Path, near: Path, size, ground_size, n: int,
                 output: Path, overwrite: bool, quiet: bool) -> int:
    """Each raster's class map and uncertainty (reused or predicted), then the ranking and
    the GeoPackage; returns how many rasters failed."""
    from magseg.run.predict import PredictOptions, predict_input
    from magseg.io.suggest import SCORE_NOTE, prepare, scratch_directory, top_windows, write_layer

    options = PredictOptions(uncertainty=True)
    prepared, failed = [], 0
    with scratch_directory(near) as scratch:
        for path in paths:
            try:
                pred = prepare(segmenter, path, predictions, scratch, size, ground_size,
                               lambda raster, where: predict_input(segmenter, raster, where, options))
            except Exception as exc:  # noqa: BLE001  one bad raster never stops the batch
                from magseg.io.suggest import describe_failure

                failed += 1
                message = describe_failure(path, exc)
                log(f"magseg: error: {message}", quiet)
                emit({"input": str(path), "status": "failed", "error": message})
                continue
            prepared.append(pred)
            emit({"input": str(path), "status": "ok", "uncertainty": "reused" if pred.reused else "computed",
                  "window_px": pred.size})
        chosen = top_windows(prepared, n)
        metadata = {**segmenter.provenance.tags(), "MAGSEG_SCORE": SCORE_NOTE}
        records = write_layer(output, prepared, chosen, [c.name for c in segmenter.config.classes],
                              metadata, overwrite)
    emit({"summary": True, "output": str(output), "windows": len(records), "rasters": len(prepared),
          "failed": failed, "top": records[:3]})
    log(f"magseg: {len(records)} window(s) to label in {output}", quiet)
    return failed
