"""``magseg export``: a checkpoint's backbone as an ONNX file (or OpenVINO IR) with its
metadata, for ONNX Runtime, OpenVINO or QGIS's Deepness plugin (docs/runtimes.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from magseg.cli.app import Command, app
from magseg.cli.common import OVERWRITE, QUIET, emit, examples, handle_errors, log

# export's own options.
CHECKPOINT = typer.Argument(..., help="Checkpoint written by `magseg train`.")
OUTPUT = typer.Option(..., "--output", "-o", metavar="FILE", help="The model file to write, e.g. model.onnx "
                      "(with --format openvino: model.xml and model.bin).")
FORMAT = typer.Option("onnx", "--format", metavar="FORMAT",
                      help="onnx, or openvino (IR; pip install 'magseg[openvino]').")
INPUT = typer.Option(None, "--input", min=1, metavar="N", help="Input height and width N of the exported model "
                     "(default: the pyramid's input size, what the backbone sees at every stage).")


@app.command(cls=Command, epilog=examples([
    "magseg export runs/dg/best.ckpt -o deepglobe.onnx",
    "magseg export runs/dg/best.ckpt -o deepglobe.onnx --input 512",
    "magseg export runs/dg/best.ckpt -o deepglobe.xml --format openvino",
]))
@handle_errors
def export(
    checkpoint: Path = CHECKPOINT,
    output: Path = OUTPUT,
    format: str = FORMAT,  # noqa: A002 - the flag's name
    input: int = INPUT,  # noqa: A002 - the flag's name
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
) -> None:
    """Export the checkpoint's backbone: a normalised (B, C_in, N, N) float32 batch in,
    (B, classes, N, N) class probabilities out, batch size free.

    The file carries its classes, colours, bands, normalisation, pyramid, K, magseg version
    and checkpoint digest as metadata, plus the keys QGIS's Deepness plugin reads
    (model_type, class_names, tiles_size, standardization_mean/std); a STAC MLM JSON
    (<name>.mlm.json) is written beside it, and the refiner, when the checkpoint has one
    (<name>.refiner.onnx: fine and coarse crop probabilities in, refined probabilities out).
    stdout: one JSON line naming the files. Exit 2
    when the checkpoint, format or input size cannot be exported; exit 1 when an output
    exists (--overwrite replaces it).
    """
    from magseg.export import export_model

    log(f"export: {checkpoint} -> {output} ({format})", quiet)
    result = export_model(checkpoint, output, fmt=format, input_size=input, overwrite=overwrite)
    emit({"files": [str(p) for p in result.files], "mlm": str(result.mlm),
          "refiner": [str(p) for p in result.refiner],
          "input": [result.input_size, result.input_size], "format": format})
