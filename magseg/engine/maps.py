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
from magseg.geometry import Rect

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
        columns = len({b.owned.left for b in self.boxes})
        self._row_starts = [b.owned.top for b in self.boxes[::columns]]
        self._col_starts = [b.owned.left for b in self.boxes[:columns]]
        self._index = {box: i for i, box in enumerate(self.boxes)}

    def write(self, boxes: list[CropBox], crops: Tensor) -> None:
        """Each crop's owned region, one file per crop, renamed into place complete."""
        for crop, box in zip(crops, boxes):
            save_chunk(self._path(self._index[box]), crop[(slice(None), *box.owned_in_crop)])

    def read(self, rows: slice, cols: slice) -> Tensor:
        """``(C, rows, cols)`` float32 from the files the window touches."""
        want = Rect.from_slices(rows, cols)
        out = None
        columns = len(self._col_starts)
        for gi in range(bisect.bisect_right(self._row_starts, want.top) - 1, len(self._row_starts)):
            for gj in range(bisect.bisect_right(self._col_starts, want.left) - 1, columns):
                owned = self.boxes[gi * columns + gj].owned
                if owned.left >= want.right:
                    break
                part = owned.intersection(want)
                if part.empty:
                    continue
                chunk = np.load(self._path(gi * columns + gj), mmap_mode="r")
                if out is None:
                    out = np.empty((chunk.shape[0], *want.size), DTYPE)
                out[(slice(None), *part.within(want))] = chunk[(slice(None), *part.within(owned))]
                del chunk
            if self.boxes[gi * columns].owned.bottom >= want.bottom:
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


def save_chunk(path: Path, values: Tensor) -> None:
    """``values`` as float32 ``.npy`` at ``path``, renamed into place complete (a reader in
    another process sees the whole file or none)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(values.cpu().numpy(), DTYPE))
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: say which file, leave no partial one
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(tmp)) from exc


def map_bytes(size: Size, classes: int) -> int:
    """Bytes a stage map of ``size`` and ``classes`` channels takes on disk (the .npy
    headers aside)."""
    return size[0] * size[1] * classes * np.dtype(DTYPE).itemsize
