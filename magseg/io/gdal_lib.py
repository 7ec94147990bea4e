"""GDAL's C library through ctypes, for the two things a writer needs that rasterio does not
expose: whether a call ended in a GDAL error that rasterio did not raise, and dropping a
dataset's cached blocks without writing them.

Why the second matters: once a write to a GeoTIFF failed (a full disk), libtiff's state for
that file is inconsistent; closing the dataset normally writes its cached blocks again, and
GDAL 3.10 then corrupts the heap (``malloc(): invalid size``, a segfault) instead of
reporting an error. A dataset that is being thrown away anyway has its blocks dropped first.

The library is the one rasterio loaded (found in ``/proc/self/maps``); where it cannot be
found (not Linux, a static build), the functions do nothing and ``last_failure`` says None:
rasterio's own exceptions are then the only report.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path

# CPLErr: CE_Failure and CE_Fatal.
_FAILURE = 3


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    """The GDAL library loaded in this process (rasterio's), or None."""
    import rasterio  # noqa: F401  (loads libgdal)

    try:
        with open("/proc/self/maps") as maps:
            paths = {m.group(1) for line in maps
                     if (m := re.search(r"(/\S*/libgdal[^/\s]*\.so[^/\s]*)$", line.strip()))}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.CPLGetLastErrorType.restype = ctypes.c_int
            lib.CPLGetLastErrorMsg.restype = ctypes.c_char_p
            lib.GDALGetDescription.restype = ctypes.c_char_p
            lib.GDALGetDescription.argtypes = [ctypes.c_void_p]
            lib.GDALGetOpenDatasets.argtypes = [ctypes.POINTER(ctypes.POINTER(ctypes.c_void_p)),
                                                ctypes.POINTER(ctypes.c_int)]
            lib.GDALDropCache.argtypes = [ctypes.c_void_p]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def reset_error() -> None:
    """Forget GDAL's last error (of this thread), before a call whose errors are wanted."""
    lib = _lib()
    if lib is not None:
        lib.CPLErrorReset()


def last_failure() -> str | None:
    """GDAL's message when the calls since ``reset_error`` ended in a failure, else None."""
    lib = _lib()
    if lib is None or lib.CPLGetLastErrorType() < _FAILURE:
        return None
    return (lib.CPLGetLastErrorMsg() or b"").decode("utf-8", "replace") or "GDAL error"


def drop_cache(path: str | Path) -> int:
    """Drop, unwritten, the cached blocks of the open datasets whose file is ``path``.
    Returns how many datasets that was (0 where the library is not at hand)."""
    lib = _lib()
    if lib is None:
        return 0
    count = ctypes.c_int()
    handles = ctypes.POINTER(ctypes.c_void_p)()
    lib.GDALGetOpenDatasets(ctypes.byref(handles), ctypes.byref(count))
    name = os.fsencode(path)
    dropped = 0
    for i in range(count.value):
        if lib.GDALGetDescription(handles[i]) == name:
            lib.GDALDropCache(handles[i])
            dropped += 1
    return dropped
