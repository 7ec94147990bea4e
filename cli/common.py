"""Conventions shared by every command: NDJSON on stdout, progress on stderr, input lists,
error reporting and exit codes."""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer

from magseg.errors import ConfigError, MagsegError

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
    """Turn magseg's exceptions into a message and exit code (config problems are usage
    errors: exit 2; anything else magseg raises on purpose: exit 1)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), EXIT_USAGE)
        except MagsegError as exc:
            fail(str(exc), EXIT_FAILED)
        except KeyboardInterrupt:
            typer.echo("magseg: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def expand_inputs(items: Sequence[str], suffixes: Iterable[str], stdin=None) -> list[Path]:
    """Paths from files, globs, directories (their files with ``suffixes``, sorted) or ``-``
    (one path per line on stdin). Order is kept, duplicates dropped.

    Raises:
        typer.BadParameter: a name that is neither a file, a directory nor a matching glob.
    """
    suffixes = {s.lower() for s in suffixes}
    out: list[Path] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            out.append(path)

    for item in items:
        if item == "-":
            stream = stdin if stdin is not None else sys.stdin
            for line in stream:
                line = line.strip()
                if line and not line.startswith("#"):
                    add(Path(line))
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
        elif glob.has_magic(item):
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
