"""Keep freed memory in the process instead of handing it back to the kernel.

glibc's malloc serves every block above its mmap threshold (32 MB at most) with a fresh
``mmap`` and returns it with ``munmap`` when freed. The engine's batches are such blocks: a
batch of four 612 px crops with 7 classes is 42 MB, a ResNet-18 activation of it 67 MB. So
without this every batch faults its buffers in again, page by page, from zeroed kernel
pages: system time that grows with the number of batches (figures:
docs/performance.md#what-keeps-the-overhead-small).

``keep_freed_memory`` tells glibc to serve large blocks from the heap and never trim it, the
same cure as running under jemalloc or tcmalloc, which PyTorch's CPU tuning guide recommends,
without preloading a library. The process keeps its peak memory until it exits, and the
peak grows a little, as freed holes in the heap are not always reused; it stays flat in
raster size (docs/performance.md#predict-memory). The ``magseg``
command calls this at start; library users may call it themselves. Set
``MAGSEG_SYSTEM_MALLOC=1`` to keep glibc's defaults. A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

OPT_OUT = "MAGSEG_SYSTEM_MALLOC"

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (once per process).

    Only blocks allocated after the call are affected. Returns whether the setting is on:
    False off Linux/glibc, when ``MAGSEG_SYSTEM_MALLOC`` is set to anything but ``0`` or
    empty, or if glibc refuses it.
    """
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    # mmap_max = 0: no block is served by mmap, so none is unmapped on free. A huge trim
    # threshold: the top of the heap is not given back either (that would fault it in again).
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
