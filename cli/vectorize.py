"""``magseg vectorize``: polygons of class maps already on disk, streamed (no model, no torch)."""

from __future__ import annotations

from pathlib import Path

import typer
from magseg.cli.app import Command, app
from magseg.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    OVERWRITE,
    QUIET,
    emit,
    examples,
    expand_inputs,
    fail,
    handle_errors,
    log,
)
from magseg.cli.predict import FORMAT_NAMES, MIN_AREA, SIMPLIFY, VectorFormat

LABELS = typer.Argument(
    ..., help="Class maps (magseg predict's <stem>.tif, or any one-band raster of class ids): "
    "files, globs, directories, or - to read paths from stdin.")
FORMAT = typer.Option(VectorFormat.gpkg, "--format", "-f", metavar="FORMAT", help=f"{FORMAT_NAMES}.")
OUT_DIR = typer.Option(None, "--out-dir", "-o", file_okay=False, metavar="DIR",
                       help="Directory (created if missing) for the layers; default: beside each class map.")


@app.command(cls=Command, epilog=examples([
    "magseg vectorize pred/scene.tif --min-area 50 --simplify 0.5",
    "magseg vectorize pred/ -o polygons/ --format fgb",
], after=[
    "Output per class map <stem>.tif: <stem>.gpkg (or .fgb, .geojson), one layer 'classes' "
    "with one polygon per class region: class_id, class_name (from the class map's tags) and "
    "area in CRS units; the class map's provenance tags and the options in its metadata. "
    "Exit status: 0 all done (or already done), 1 some class map failed, 2 usage error.",
]))
@handle_errors
def vectorize(
    labels: list[str] = LABELS,
    out_dir: Path = OUT_DIR,
    format: VectorFormat = FORMAT,  # noqa: A002  (the flag's name)
    min_area: float = MIN_AREA,
    simplify: float = SIMPLIFY,
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
) -> None:
    """Make polygons from class maps on disk, as predict's --vector does, without the model;
    one JSON line per class map on stdout. Memory holds a strip of rows, not the map.

    A layer magseg made from the same class map with the same options is kept; one it made
    otherwise is made again; any other file in the way fails that class map (--overwrite
    replaces it)."""
    from magseg.errors import MagsegError
    from magseg.io import vector

    options = vector.VectorOptions(format.value, min_area=min_area, simplify=simplify)
    paths = expand_inputs(labels, (".tif", ".tiff", ".vrt"))
    if not paths:
        fail("no class maps found in " + " ".join(labels), EXIT_USAGE)
    failed = 0
    for number, path in enumerate(paths, start=1):
        try:
            record = vector.vectorize(path, out_dir, options, overwrite).to_record()
        except MagsegError as exc:
            target = Path(out_dir or Path(path).parent) / (Path(path).stem + vector.VECTOR_FORMATS[format.value].suffix)
            record = vector.VectorizeResult(Path(path), target, "failed", error=str(exc)).to_record()
        failed += record["status"] == "failed"
        emit(record)
        note = f" ({record['error']})" if record["error"] else ""
        log(f"magseg: [{number}/{len(paths)}] {record['input']} -> {record['output']}: "
            f"{record['status']}{note}", quiet)
    if failed:
        log(f"magseg: {failed} of {len(paths)} class map(s) failed", quiet)
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)
