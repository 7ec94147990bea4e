"""Write files so that a killed run never leaves one that looks finished.

Everything magseg writes (checkpoints, rasters, reports) goes to a temporary name beside the
target and is renamed over it only once complete; rename is atomic on one filesystem.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from magseg.errors import OutputExistsError

# Temporary files carry this marker so a later run (or a person) can tell them apart.
PARTIAL_SUFFIX = ".partial"


def partial_path(target: str | Path) -> Path:
    """The temporary name used while ``target`` is being written: ``.<name>.<pid>.partial``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_write(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``target`` when the block succeeds.

    On any exception the temporary file is removed and ``target`` is left as it was.

    Raises:
        OutputExistsError: ``target`` exists and ``overwrite`` is False.
    """
    target = Path(target)
    if not overwrite and target.exists():
        raise OutputExistsError(f"{target} already exists; pass --overwrite to replace it")
    tmp = partial_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
