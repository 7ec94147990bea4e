"""Conventions shared by every command: NDJSON on stdout, progress on stderr, input lists,
error reporting and exit codes."""

from __future__ import annotations

import functools
import glob
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer

from magseg.errors import CheckpointError, ConfigError, MagsegError
from magseg.io.sources import is_virtual, source_key

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

F = TypeVar("F", bound=Callable[..., Any])


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    # JSON has no NaN/Infinity; jq and most parsers reject them. null says "undefined".
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def emit(record: dict[str, Any]) -> None:
    """Write one JSON object as one line on stdout, flushed (for `| jq` and pipelines)."""
    sys.stdout.write(json.dumps(_finite(record), default=_json_default) + "\n")
    sys.stdout.flush()


def log(message: str, quiet: bool = False) -> None:
    """A human-readable line on stderr (silenced by --quiet)."""
    if not quiet:
        typer.echo(message, err=True)


def show_progress(quiet: bool) -> bool:
    """Progress bars only when stderr is a terminal and --quiet is not given."""
    return not quiet and sys.stderr.isatty()


def progress_bar(total: int | None, desc: str, quiet: bool, unit: str = "it"):
    """A tqdm bar on stderr, disabled when it should not show (see ``show_progress``)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not show_progress(quiet),
                leave=False, dynamic_ncols=True)


def fail(message: str, code: int = EXIT_FAILED) -> None:
    """Print ``magseg: error: ...`` on stderr and exit with ``code``."""
    typer.echo(f"magseg: error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn magseg's exceptions into one ``magseg: error:`` line and an exit code, the same
    in every command:

    - exit 2 (usage): the run cannot start as asked. The command line, a config file or an
      override is invalid (ConfigError: unknown key, bad value, a device this machine does
      not have, a margin that leaves no core), or the model to run is unusable
      (CheckpointError: missing, empty, corrupt, not a magseg checkpoint, weights that do
      not fit its config, or a checkpoint in --out that does not match the config asked for).
    - exit 1 (bad input): the data the run reads or writes is at fault (DataError,
      RasterError: a raster, image, mask or split file) or an output is in the way
      (OutputExistsError); in predict the other inputs are still processed.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ConfigError, CheckpointError) as exc:
            fail(str(exc), EXIT_USAGE)
        except typer.BadParameter as exc:  # raised by the command's own argument checks
            fail(exc.format_message(), EXIT_USAGE)
        except MagsegError as exc:
            fail(str(exc), EXIT_FAILED)
        except KeyboardInterrupt:
            typer.echo("magseg: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def check_device(device: str | None) -> None:
    """Refuse a ``--device`` that is no device or that this machine lacks (exit 2 through
    ``handle_errors``), before any checkpoint or data is read. None: the config's, checked
    where it is used."""
    if device is not None:
        from magseg.device import resolve_device

        resolve_device(device, source="--device")


def expand_inputs(items: Sequence[str], suffixes: Iterable[str], stdin=None) -> list[Path | str]:
    """Paths from files, globs, directories (their files with ``suffixes``, sorted) or ``-``
    (one path per line on stdin). Order is kept, duplicates dropped. Names GDAL opens that
    are not local files (``/vsicurl/...``, ``s3://...``: magseg.io.sources) are kept as strings,
    never globbed or checked here: a missing object fails that input with GDAL's message.

    Raises:
        typer.BadParameter: a name that is neither a file, a directory nor a matching glob.
    """
    suffixes = {s.lower() for s in suffixes}
    out: list[Path | str] = []
    seen: set[str] = set()

    def add(path: Path | str) -> None:
        key = source_key(path)
        if key not in seen:
            seen.add(key)
            out.append(path)

    for item in items:
        if item == "-":
            stream = stdin if stdin is not None else sys.stdin
            for number, line in enumerate(stream, start=1):
                line = line.strip()
                if "\0" in line:
                    raise typer.BadParameter(
                        f"line {number} of stdin holds a NUL byte; give one path per line "
                        "(e.g. `find ... -print`, not -print0)")
                if line and not line.startswith("#"):
                    add(line if is_virtual(line) else Path(line))
            continue
        if "\0" in item:
            raise typer.BadParameter(f"{item!r} holds a NUL byte; it cannot name a file")
        if is_virtual(item):
            add(item)
            continue
        path = Path(item)
        try:
            is_dir = path.is_dir()
        except OSError:  # e.g. a parent directory we may not search: reported per input later
            is_dir = False
        if is_dir:
            for child in sorted(path.iterdir()):
                if child.is_file() and child.suffix.lower() in suffixes:
                    add(child)
        elif glob.has_magic(item) and not _is_file(path):
            # A file whose name has glob characters (`br[1].tif`) is taken as named.
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise typer.BadParameter(f"no file matches {item!r}")
            for match in matches:
                add(Path(match))
        else:
            # A named file is kept even if missing: it is reported as a failed input, and
            # the rest of the batch still runs.
            add(path)
    return out
