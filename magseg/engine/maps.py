"""Where a stage keeps its probabilities between stages: in memory, or on disk in chunks.

A stage map is written crop by crop (each crop writes the pixels it owns, ``CropBox.owned``)
and read by the next stage window by window (``magseg.engine.resample.Source``):

    MemoryMap   a ``(C, h, w)`` tensor: ``segment`` on an image in memory
    ChunkMap    one ``.npy`` file per crop of the stage (its owned region, ``(C, oh, ow)``):
                predict on rasters of any size; memory holds a window at a time

Both store float32, so a map read back from disk is bit-identical to the one kept in memory.
One file per crop makes writes independent: any process may write any crop (Ray workers
on shared storage), each file is renamed into place complete, and a reader needs only the
files its window touches, through the operating system's page cache.
"""

from __future__ import annotations

import bisect
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from magseg.engine.pyramid import CropBox, Size, crop_boxes, stitch_crops

DTYPE = np.float32


class MemoryMap:
    """A stage map held as one ``(C, h, w)`` tensor, allocated at the first write."""

    def __init__(self, size: Size, dtype: torch.dtype = torch.float32) -> None:
        self.size = tuple(size)
        self.dtype = dtype
        self.tensor: Tensor | None = None

    def write(self, boxes: list[CropBox], crops: Tensor) -> None:
        """Each crop's owned region: ``crops`` ``(B, C, ch, cw)``."""
        if self.tensor is None:
            self.tensor = crops.new_zeros((crops.shape[1], *self.size), dtype=self.dtype)
        stitch_crops(self.tensor, crops, boxes)

    def read(self, rows: slice, cols: slice) -> Tensor:
        assert self.tensor is not None, "read before any write"
        return self.tensor[:, rows, cols]

    def discard(self) -> None:
        self.tensor = None


class ChunkMap:
    """A stage map on disk: ``<dir>/<i>.npy`` holds crop ``i``'s owned region.

    Args:
        directory: created if missing; removed by ``discard``.
        size: the stage size ``(h, w)``; crop: the crop size its boxes are cut with.
    """

    def __init__(self, directory: Path, size: Size, crop: Size,
                 on_discard: Callable[["ChunkMap"], None] | None = None) -> None:
        self.directory = Path(directory)
        self.on_discard = on_discard
        self.size = tuple(size)
        self.boxes = crop_boxes(self.size, crop)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Owned regions form a grid: their row and column starts, for finding a window's files.
        columns = len({b.own_left for b in self.boxes})
        self._row_starts = [b.own_top for b in self.boxes[::columns]]
        self._col_starts = [b.own_left for b in self.boxes[:columns]]
        self._index = {box: i for i, box in enumerate(self.boxes)}

    def write(self, boxes: list[CropBox], crops: Tensor) -> None:
        """Each crop's owned region, one file per crop, renamed into place complete."""
        for crop, box in zip(crops, boxes):
            array = np.ascontiguousarray(crop[(slice(None), *box.owned_in_crop)].cpu().numpy(), DTYPE)
            path = self._path(self._index[box])
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            try:
                with open(tmp, "wb") as f:
                    np.save(f, array)
                os.replace(tmp, path)
            except OSError as exc:  # a full disk: say which file, leave no partial one
                tmp.unlink(missing_ok=True)
                raise OSError(exc.errno, exc.strerror or str(exc), str(tmp)) from exc

    def read(self, rows: slice, cols: slice) -> Tensor:
        """``(C, rows, cols)`` float32 from the files the window touches."""
        r0, r1, c0, c1 = rows.start, rows.stop, cols.start, cols.stop
        out = None
        columns = len(self._col_starts)
        for gi in range(bisect.bisect_right(self._row_starts, r0) - 1, len(self._row_starts)):
            for gj in range(bisect.bisect_right(self._col_starts, c0) - 1, columns):
                box = self.boxes[gi * columns + gj]
                if box.own_left >= c1:
                    break
                y0, y1 = max(r0, box.own_top), min(r1, box.own_top + box.own_height)
                x0, x1 = max(c0, box.own_left), min(c1, box.own_left + box.own_width)
                if y1 <= y0 or x1 <= x0:
                    continue
                chunk = np.load(self._path(gi * columns + gj), mmap_mode="r")
                if out is None:
                    out = np.empty((chunk.shape[0], r1 - r0, c1 - c0), DTYPE)
                out[:, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = chunk[
                    :, y0 - box.own_top : y1 - box.own_top, x0 - box.own_left : x1 - box.own_left]
                del chunk
            if self.boxes[gi * columns].own_top + self.boxes[gi * columns].own_height >= r1:
                break
        assert out is not None, f"window {rows}, {cols} outside the map"
        return torch.from_numpy(out)

    def _path(self, index: int) -> Path:
        return self.directory / f"{index}.npy"

    def disk_bytes(self) -> int:
        """Bytes its files take, whoever wrote them."""
        return sum(f.stat().st_size for f in self.directory.glob("*.npy"))

    def __getstate__(self) -> dict:
        # Sent to a worker as the directory and geometry; the owner's callback stays here.
        return {**self.__dict__, "on_discard": None}

    def discard(self) -> None:
        if self.on_discard:
            self.on_discard(self)
        shutil.rmtree(self.directory, ignore_errors=True)


def map_bytes(size: Size, classes: int) -> int:
    """Bytes a stage map of ``size`` and ``classes`` channels takes on disk (the .npy
    headers aside)."""
    return size[0] * size[1] * classes * np.dtype(DTYPE).itemsize
