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
SPLIT = typer.Option("train", "--split", metavar="SPLIT", help="The split the windows and scenes come from.")
WEIGHT_BITS = typer.Option("auto", "--weight-bits", metavar="auto|7|8",
                           help="The int8 weights' width: 8 runs exactly only on a CPU with VNNI "
                                "(AVX512-VNNI, AVX-VNNI, AMX) and is the more accurate; 7 runs on "
                                "every x86 CPU; auto: 8 where this CPU has VNNI, else 7.")
SCENES = typer.Option(4, "--scenes", min=1, metavar="N",
                      help="Scenes the fp32 engine segments for the refiner's calibration cells "
                           "(at most --windows cell maps are used).")


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
    scenes: int = SCENES,
    weight_bits: str = WEIGHT_BITS,
    settings: list[str] = SETTINGS,
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
) -> None:
    """Quantise the checkpoint's backbone and its refiner's convolutions to int8 for
    OpenVINO (NNCF's post-training quantisation), into the graph cache where predict and
    benchmark find them with --set engine.runtime=openvino --set engine.precision=int8
    (pip install 'magseg[int8]').

    The backbone is calibrated on N windows of the training data cut as training cuts
    them, the refiner on up to N of the cell maps the fp32 engine feeds it on --scenes
    scenes. Each graph serves every input size, and is checked against torch on its
    calibration inputs: stdout is one JSON line with the graph's path, the share of pixels
    whose labels agree and the mean absolute difference of the probabilities, and under
    "refiner" its graph and the mean absolute difference of its correction. A graph of
    8-bit weights (--weight-bits) runs only on a CPU with VNNI; elsewhere predict refuses
    it and names the fix. Exit 2 when
    the checkpoint, config or install cannot quantise; exit 1 when the data is missing or
    the cache already holds this checkpoint's int8 graphs (--overwrite quantises again; a
    cache with the backbone's alone gets the refiner's). The cache is engine.cache_dir
    (--set), else $MAGSEG_CACHE_DIR, else ~/.cache/magseg.
    """
    check_checkpoint(checkpoint, settings)
    from magseg.quantize import quantize_checkpoint

    result = quantize_checkpoint(checkpoint, data_root, windows=windows, split=split, scenes=scenes,
                                 overrides=settings or [], overwrite=overwrite, weight_bits=weight_bits,
                                 log=lambda message: log(message, quiet), progress=not quiet)
    refiner = result.refiner
    emit({"graph": str(result.graph), "windows": result.windows, "size": list(result.size),
          "weight_bits": result.weight_bits,
          "label_agreement": _rounded(result.label_agreement, 5), "mean_abs_diff": _rounded(result.mean_abs_diff, 6),
          "refiner": None if refiner is None else {
              "graph": str(refiner.graph), "scenes": refiner.scenes, "cells": refiner.cells,
              "mean_abs_diff": round(refiner.mean_abs_diff, 6),
              "mean_abs_correction": round(refiner.mean_abs_correction, 6)},
          "seconds": round(result.seconds, 1)})


def _rounded(value: float | None, digits: int) -> float | None:
    # None: the backbone's graph was in the cache already, and not checked again.
    return None if value is None else round(value, digits)
