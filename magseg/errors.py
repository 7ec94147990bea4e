"""magseg's exceptions.

Library code raises these; only the CLI turns them into messages and exit codes. Every
message names the offending thing (a file, a config key) and, where there is one, the fix.
"""

from __future__ import annotations

from pathlib import Path


class MagsegError(Exception):
    """Base class of every error magseg raises on purpose."""


class ConfigError(MagsegError, ValueError):
    """A config file or override is invalid (unknown key, bad value, inconsistent sizes)."""


class ModelError(MagsegError, ValueError):
    """A model cannot be built or does not fit the data (unknown architecture, wrong shapes)."""


class CheckpointError(MagsegError):
    """A checkpoint is missing, unreadable, or does not match what is asked of it."""


class DataError(MagsegError):
    """An input image, mask, split list or dataset is missing, corrupt or inconsistent."""


class RasterError(DataError):
    """A raster cannot be read or written (not a raster, truncated, wrong band count...)."""


class OutputExistsError(MagsegError, FileExistsError):
    """An output file already exists (or appeared while it was being written) and
    `--overwrite` was not given."""


class WriteError(MagsegError):
    """An output could not be written completely (disk full, quota, I/O error, a file that
    does not read back). Nothing was put in place: a file already there is unchanged.

    Attributes:
        path: the file whose writing failed (an output's temporary file, or the output),
            when the code that failed knows it; None otherwise.
        target: the output this failure has been attributed to, its message written for
            that output (``magseg.io.atomic``): an enclosing ``atomic_write`` passes it on
            as it is. None until then.

    Both are kept when the error is pickled (to another process).
    """

    def __init__(self, message: str, *, path: str | Path | None = None,
                 target: str | Path | None = None) -> None:
        super().__init__(message)
        self.path: Path | None = None if path is None else Path(path)
        self.target: Path | None = None if target is None else Path(target)


class RasterWriteError(RasterError, WriteError):
    """A raster output could not be created, written, or read back complete once closed."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights were asked for but cannot be had (e.g. no network)."""
