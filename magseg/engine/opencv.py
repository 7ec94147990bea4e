"""OpenCV's work on batches of maps: one map after another on a pool of threads (its filters
run single-threaded and release the GIL), and bilinear enlargement plane by plane.

``enlarge_planes`` is what the engine's inference uses to enlarge probability maps (the
backbone's answer back to the crop, Y to the next stage): OpenCV's ``INTER_LINEAR`` has
``F.interpolate(mode="bilinear", align_corners=False)``'s pixel centres and edge clamping,
its values to float rounding, at a quarter to a half of ATen's time on a CPU
(docs/performance.md). Its output pixel reads only its two neighbours per axis, with weights
that depend only on the scale, so a part of a map enlarged by a whole factor is, bit for
bit, the whole map's enlargement there (``magseg.engine.resample``).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import cv2
import torch
from torch import Tensor

T = TypeVar("T")
_POOL_THREADS = "magseg-opencv"


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """The process's threads for per-map OpenCV work (box-filter counts, median filters,
    enlargements), one per core, made on first use."""
    return ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix=_POOL_THREADS)


# A forked child (a DataLoader worker, a fork-started pool) inherits the pool object but none
# of its threads: work given to it would wait forever. The child makes its own.
os.register_at_fork(after_in_child=_pool.cache_clear)


def each_map(work: Callable[[int], T], maps: int) -> list[T]:
    """``work(b)`` for maps ``0 .. maps - 1``, side by side on the thread pool; one after
    another where torch runs one thread (a DataLoader worker, ``--threads 1``), as its own
    work does, and inside work the pool is doing already (a pool thread waiting on the
    pool could wait for ever)."""
    if (maps <= 1 or torch.get_num_threads() <= 1
            or threading.current_thread().name.startswith(_POOL_THREADS)):
        return list(map(work, range(maps)))
    return list(_pool().map(work, range(maps)))


def can_enlarge(x: Tensor, size: tuple[int, int]) -> bool:
    """Whether ``enlarge_planes`` takes ``x`` to ``size``: float32 on the CPU, outside
    autograd, no axis shrinking, and planes OpenCV takes (under 2^15 pixels a side)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() >= 2
            and not (torch.is_grad_enabled() and x.requires_grad)
            and size[0] >= x.shape[-2] and size[1] >= x.shape[-1] and max(size) < 1 << 15)


def enlarge_planes(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``(..., h, w)`` float32 on the CPU enlarged to ``size`` ``(H, W)`` (``H >= h``,
    ``W >= w``) by bilinear interpolation on pixel centres, edges clamped: ``(..., H, W)``,
    contiguous, ``F.interpolate(mode="bilinear", align_corners=False)``'s values up to float
    rounding. Each plane is one ``cv2.resize``, the planes side by side on the pool."""
    if not can_enlarge(x, size):
        raise ValueError(f"enlarge_planes takes float32 CPU maps to a size no smaller; got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device} to {tuple(size)}")
    # OpenCV reads planes whose rows are apart (a part cut from a larger map) as they are.
    planes = x.detach().reshape(-1, *x.shape[-2:])
    planes = (planes if planes.stride(-1) == 1 else planes.contiguous()).numpy()
    out = torch.empty((*x.shape[:-2], *size), dtype=torch.float32)
    flat = out.view(-1, *size).numpy()
    height, width = size

    def one(i: int) -> None:
        cv2.resize(planes[i], (width, height), dst=flat[i], interpolation=cv2.INTER_LINEAR)

    each_map(one, len(planes))
    return out
