"""``magseg cache``: what the graph cache holds (exported graphs and what the runtimes made of
them, docs/runtimes.md#the-graph-cache), and removing what runs no longer use."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import typer
from magseg.cli.app import Command, app
from magseg.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, QUIET, emit, examples, fail, handle_errors, log

DAY = 86_400.0

CACHE_DIR = typer.Option(None, "--cache-dir", metavar="DIR", help="The cache to look at, as engine.cache_dir "
                         "names it (graphs/ inside it); default: $MAGSEG_CACHE_DIR, else ~/.cache/magseg.")
OLDER_THAN = typer.Option(None, "--older-than", min=0.0, metavar="DAYS",
                          help="Remove what no run has used for DAYS days: a model's whole folder, or a "
                               "compiled graph made for a runtime version or CPU no longer running it.")
ALL = typer.Option(False, "--all", help="Remove every model's graphs (not while a magseg run uses the cache).")
DRY_RUN = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing.")


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


@app.command(cls=Command, epilog=examples([
    "magseg cache",
    "magseg cache --older-than 30 --dry-run",
    "magseg cache --older-than 30",
    "magseg cache --all --cache-dir /scratch/magseg",
], after=[
    "Without --older-than or --all, one JSON line per model: path, bytes, last_used (UTC), "
    "graphs (input sizes), compiled (kept compiled graphs), int8 (the parts magseg quantize made int8 "
    "graphs of: backbone, refiner). With them, one JSON line per "
    "part removed: path, kind (model or compiled), bytes, last_used, status (removed, "
    "would-remove, failed) and error. Every run marks what it uses, so --older-than N keeps "
    "whatever ran in the last N days. Exit status: 0 done, 1 a part could not be removed (the "
    "others were), 2 usage error.",
]))
@handle_errors
def cache(
    cache_dir: Path = CACHE_DIR,
    older_than: float = OLDER_THAN,
    all_models: bool = ALL,
    dry_run: bool = DRY_RUN,
    quiet: bool = QUIET,
) -> None:
    """List the graph cache, or remove from it what runs no longer use.

    The first run of a model with engine.runtime=onnxruntime or openvino exports its backbone
    there, once per input size, and keeps what the runtime makes of it: about 15-100 MB a size
    for each model, kept until removed."""
    from magseg.cache import cache_root, entries, model_folders, prune

    if all_models and older_than is not None:
        fail("--all removes every model, --older-than only those unused for a while: give one", EXIT_USAGE)
    if dry_run and not all_models and older_than is None:
        fail("--dry-run goes with --older-than DAYS or --all", EXIT_USAGE)
    root = cache_root(None if cache_dir is None else str(cache_dir))
    if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
        fail(f"--cache-dir {cache_dir} is a file, not a directory", EXIT_USAGE)
    if cache_dir is not None and not root.is_dir() and model_folders(cache_dir):
        fail(f"--cache-dir {cache_dir} holds the models' folders themselves: pass the folder above "
             f"it, {cache_dir.parent} (the cache's graphs/ is inside that)", EXIT_USAGE)
    if all_models or older_than is not None:
        removals = prune(root, None if all_models else older_than * DAY, dry_run)
        status = "would-remove" if dry_run else "removed"
        for removal in removals:
            emit({"path": str(removal.path), "kind": removal.kind, "bytes": removal.bytes,
                  "last_used": _when(removal.last_used), "status": "failed" if removal.error else status,
                  "error": removal.error})
            if removal.error:
                log(f"magseg: cannot remove {removal.path}: {removal.error}")
        failed = [r for r in removals if r.error]
        freed = sum(r.bytes for r in removals if not r.error)
        verb = "would free" if dry_run else "freed"
        log(f"magseg: {root}: {len(removals) - len(failed)} part(s), {verb} {_megabytes(freed)}"
            + (f"; {len(failed)} could not be removed" if failed else ""), quiet)
        raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)
    found = entries(root)
    for item in found:
        emit({"path": str(item.path), "bytes": item.bytes, "last_used": _when(item.last_used),
              "graphs": list(item.graphs), "compiled": item.compiled, "int8": list(item.int8)})
    log(f"magseg: {root}: {len(found)} model(s), {_megabytes(sum(e.bytes for e in found))}"
        + ("" if root.is_dir() else " (no cache there yet)"), quiet)
