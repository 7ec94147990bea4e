"""Write files so that a killed run never leaves one that looks finished.

Everything magseg writes (checkpoints, rasters, reports) goes to a temporary name beside the
target and is renamed over it only once complete; rename is atomic on one filesystem.

A run killed outright (SIGKILL, the OOM killer, a power cut) cannot remove its temporary
file, which for a large raster may hold gigabytes. The temporary name records the process
and host that own it, so the next run writing the same target removes the leftovers of
processes that are gone, and leaves alone those still running or on another host (a shared
filesystem).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from magseg.errors import OutputExistsError

# Temporary files carry this marker so a later run (or a person) can tell them apart.
PARTIAL_SUFFIX = ".partial"


@functools.lru_cache(maxsize=1)
def _host() -> str:
    return socket.gethostname()


def partial_path(target: str | Path) -> Path:
    """The temporary name used while ``target`` is being written:
    ``.<name>.<pid>@<host>.partial``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}@{_host()}{PARTIAL_SUFFIX}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to someone else
        return True
    return True


def remove_stale_partials(target: str | Path) -> list[Path]:
    """Remove the temporary files that killed runs left for ``target``.

    Only names ``partial_path`` makes for this host whose process no longer exists are
    removed; a live process's file, another host's, and anything else are kept.

    Returns:
        the removed paths.
    """
    target = Path(target)
    prefix, host = f".{target.name}.", _host()
    removed = []
    for path in target.parent.glob(glob.escape(prefix) + "*" + PARTIAL_SUFFIX):
        pid, at, owner_host = path.name[len(prefix) : -len(PARTIAL_SUFFIX)].partition("@")
        if at and owner_host == host and pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def fresh_partial_path(target: str | Path) -> Path:
    """``partial_path(target)``, after removing what killed runs left for it."""
    remove_stale_partials(target)
    return partial_path(target)


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
    tmp = fresh_partial_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
