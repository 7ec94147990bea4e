"""``magseg quantize``: a checkpoint's backbone as an int8 OpenVINO graph, calibrated on its
training windows, for ``engine.precision=int8`` (docs/runtimes.md#int8)."""

from __future__ import annotations

from pathlib import Path

import typer
from magseg.cli.app import Command, app
from magseg.cli.common import (
    DATA_ROOT,
    OVERWRITE,
    QUIET,
    SETTINGS,
    check_checkpoint,
    emit,
    examples,
    handle_errors,
    log,
)

CHECKPOINT = typer.Argument(..., help="Checkpoint written by `magseg train`.")
WINDOWS = typer.Option(64, "--windows", min=1, metavar="N",
                       help="Training windows to calibrate on.")
SPLIT = typer.Option("train", "--split", metavar="SPLIT", help="The split the windows come from.")


@app.command(cls=Command, epilog=examples([
    "magseg quantize runs/dg/best.ckpt --data-root data/deepglobe",
    "magseg predict runs/dg/best.ckpt scene.tif -o out/ --set engine.runtime=openvino --set engine.precision=int8",
]))
@handle_errors
def quantize(
    checkpoint: Path = CHECKPOINT,
    data_root: Path = DATA_ROOT,
    windows: int = WINDOWS,
    split: str = SPLIT,
    settings: list[str] = SETTINGS,
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
) -> None:
    """Quantise the checkpoint's backbone to int8 for OpenVINO (NNCF's post-training
    quantisation, calibrated on N windows of the training data cut as training cuts them),
    into the graph cache where predict and benchmark find it with --set
    engine.runtime=openvino --set engine.precision=int8 (pip install 'magseg[int8]').

    The graph serves every input size. It is checked against the torch model on the
    calibration windows: stdout is one JSON line with the graph's path, the share of
    pixels whose labels agree and the mean absolute difference of the probabilities.
    Exit 2 when the checkpoint, config or install cannot quantise; exit 1 when the data
    is missing or the cache already holds this checkpoint's int8 graph (--overwrite
    quantises again). The cache is engine.cache_dir (--set), else $MAGSEG_CACHE_DIR,
    else ~/.cache/magseg.
    """
    check_checkpoint(checkpoint, settings)
    from magseg.quantize import quantize_checkpoint

    result = quantize_checkpoint(checkpoint, data_root, windows=windows, split=split, overrides=settings or [],
                                 overwrite=overwrite, log=lambda message: log(message, quiet), progress=not quiet)
    emit({"graph": str(result.graph), "windows": result.windows, "size": list(result.size),
          "label_agreement": round(result.label_agreement, 5), "mean_abs_diff": round(result.mean_abs_diff, 6),
          "seconds": round(result.seconds, 1)})
