"""A real, small filesystem made inside a test: a tmpfs mounted on a folder, to fill up.

    from small_fs import small_filesystem, fill

    with small_filesystem(tmp_path / "disk", size="2m") as disk:
        ...                       # write things that should fit
        fill(disk, leave=64 * 1024)   # now less than 64 KiB is free

Mounting needs root (CAP_SYS_ADMIN) and a kernel that lets this process mount; where it
cannot, the test is skipped with the reason (``pytest.skip``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = ".filler"


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "2m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``where`` (created) for the block; unmounted after."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8): the full-disk test on a "
                    "real filesystem cannot run here (the injected-error tests still do)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                             str(where)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}): "
                    "the full-disk test on a real filesystem cannot run (the injected-error "
                    "tests still do)")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> int:
    """Fill ``disk`` with a filler file until the filesystem refuses more, then free
    ``leave`` bytes of it. Returns the bytes free afterwards (as statvfs says)."""
    chunk = b"\0" * (64 * 1024)
    path = disk / FILLER
    with open(path, "ab", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        # The last chunk may have gone in partly: a byte at a time fills the page it started.
        while True:
            try:
                f.write(b"\0")
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    if leave:
        os.truncate(path, max(0, path.stat().st_size - leave))
    return shutil.disk_usage(disk).free
