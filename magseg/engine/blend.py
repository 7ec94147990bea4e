"""Crop outputs blended over their margins: a stage's backbone answers as one map, with no
crop grid in it.

With ``pyramid.margin`` each crop's backbone sees its window grown by ``m`` stage pixels
(magseg.engine.pyramid.grown_windows), so near a border between two crops both have an
answer. Cutting each to the part it owns switches from one answer to the other at the
border, and the map shows the crop grid as lines of label changes. Here the answers are
blended instead. Along each axis, across the border ``b`` between two neighbouring crops,
the weight of the crop before it falls linearly from 1 to 0 over ``[b - r, b + r)`` and the
weight of the one after rises from 0 to 1. ``r`` is half the margin (less where a window or
an owned part is shorter: ``axis_ramps``), so every answer blended has at least half the
margin of context beyond it: a model that needs that much gives the whole image's answer. A
crop's weight over the image is the product of its two axes' weights, so the weights of all
crops sum to 1 at every pixel. Crop ``i``'s fine view over its crop window is

    fine_i = P_i + sum over the other crops k that ran of  w_k * (P_k - P_i)

which is ``sum_k w_k P_k`` wherever every crop whose weight reaches the pixel ran, and
``P_i`` itself, bit for bit, where no other crop's weight reaches (a crop's core, padding
beyond the image, a neighbour that adaptive mode skipped).

A stage that blends runs in two passes: every crop's backbone output over its grown window
goes to a ``FineStore`` (memory, or one ``.npy`` file per crop on disk for predict, written
by any process), then each crop reads its blended fine view from it. Both passes read and
write in a fixed order, so the result depends neither on batches nor on where a crop ran.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from magseg.engine.fused import compiled_loops
from magseg.engine.maps import DTYPE, save_chunk
from magseg.engine.opencv import each_map
from magseg.engine.pyramid import CropBox, Size, axis_tiles, crop_boxes, crop_windows, grown_windows
from magseg.engine.resample import cell_areas, cell_sums
from magseg.geometry import Rect



@dataclass(frozen=True, slots=True)
class AxisRamp:
    """One tile of an axis: it owns ``[own_start, own_end)`` and its weight ramps over ``r_lo``
    pixels either side of ``own_start`` and ``r_hi`` either side of ``own_end`` (0: a hard
    edge, the image's edge or no margin)."""

    own_start: int
    own_end: int
    r_lo: int
    r_hi: int

    @property
    def support(self) -> tuple[int, int]:
        """The pixels ``[a, b)`` where the tile's weight is above 0."""
        return self.own_start - self.r_lo, self.own_end + self.r_hi

    def weights(self, start: int, stop: int) -> Tensor:
        """``(stop - start,)`` float32 weights of the pixels ``[start, stop)``, shared: read
        them, never write (a blend asks for the same few parts of each ramp crop after crop).

        A border's two ramps use one ``t`` (the pixel centre's place across ``[b - r, b + r)``),
        the one before it ``1 - t``, the one after ``t``: they sum to 1."""
        return _ramp_weights(self, start, stop)


@functools.lru_cache(maxsize=4096)
def _ramp_weights(ramp: AxisRamp, start: int, stop: int) -> Tensor:
    with torch.inference_mode(False):  # kept: a plain tensor, usable in inference mode or out
        x = torch.arange(start, stop, dtype=torch.float32) + 0.5
        w = torch.ones(stop - start)
        if ramp.r_lo:
            w = torch.minimum(w, ((x - (ramp.own_start - ramp.r_lo)) / (2 * ramp.r_lo)).clamp(0, 1))
        if ramp.r_hi:
            w = torch.minimum(w, 1 - ((x - (ramp.own_end - ramp.r_hi)) / (2 * ramp.r_hi)).clamp(0, 1))
        return w


def axis_ramps(length: int, crop: int, margin: int) -> list[AxisRamp]:
    """The ramps of the tiles of an axis of ``length`` cut into crops of ``crop`` with
    ``margin`` pixels of context (magseg.engine.pyramid's tiles and grown windows).

    The ramp across a border ``b`` has the half-width ``r = min(margin // 2, what both grown
    windows cover beyond b minus r, half of either owned part)``: both crops' answers over
    all of it have ``r`` pixels of context or more, and the ramps at a tile's two ends never
    overlap, so at most two tiles of an axis have weight at any pixel."""
    tiles = axis_tiles(length, crop)
    boxes = [CropBox(Rect(0, start, 1, size), Rect(0, a, 1, b - a)) for start, size, a, b in tiles]
    windows, _, _ = grown_windows(boxes, (1, crop), (1, length), (0, margin))
    radii = []
    for i in range(len(tiles) - 1):
        (_, _, a0, b0), (_, _, a1, b1) = tiles[i], tiles[i + 1]
        border = b0  # == a1
        covered = min(windows[i].right - border, border - windows[i + 1].left)
        radii.append(max(0, min(margin // 2, covered // 2, (b0 - a0) // 2, (b1 - a1) // 2)))
    return [AxisRamp(a, b, radii[i - 1] if i > 0 else 0, radii[i] if i < len(tiles) - 1 else 0)
            for i, (_, _, a, b) in enumerate(tiles)]


def blends(size: Size, crop: Size, margin: Size) -> bool:
    """Whether a stage of ``size`` blends its crops' outputs: some axis has a border between
    crops with a ramp across it (a margin, and more than one crop along that axis)."""
    return any(r.r_hi > 0 for n, c, m in zip(size, crop, margin) for r in axis_ramps(n, c, m))


class BlendGrid:
    """The geometry of a stage's blend: its crops (``boxes``, row-major), their grown
    ``windows`` (of one ``extent``) and each axis' ramps, for a stage of ``size`` in crops of
    ``crop`` with ``margin`` stage pixels of context."""

    def __init__(self, size: Size, crop: Size, margin: Size) -> None:
        self.size, self.crop = tuple(size), tuple(crop)
        self.boxes = crop_boxes(self.size, self.crop)
        self.windows, self.offsets, self.extent = grown_windows(self.boxes, self.crop, self.size, margin)
        self.rows = axis_ramps(self.size[0], self.crop[0], margin[0])
        self.cols = axis_ramps(self.size[1], self.crop[1], margin[1])
        self.index = {box: i for i, box in enumerate(self.boxes)}

    def ramps(self, k: int) -> tuple[AxisRamp, AxisRamp]:
        """Crop ``k``'s ramps along the rows and the columns."""
        return self.rows[k // len(self.cols)], self.cols[k % len(self.cols)]

    def support(self, k: int) -> Rect:
        """Where crop ``k``'s weight is above 0."""
        ramp_y, ramp_x = self.ramps(k)
        return Rect.from_slices(slice(*ramp_y.support), slice(*ramp_x.support))

    def weights(self, k: int, part: Rect) -> Tensor:
        """``(h, w)`` crop ``k``'s weights over ``part`` (inside its support)."""
        ramp_y, ramp_x = self.ramps(k)
        return ramp_y.weights(part.top, part.bottom)[:, None] * ramp_x.weights(part.left, part.right)[None, :]

    def reaching(self, window: Rect) -> list[int]:
        """The crops whose weight may reach ``window``, row-major (the order of the blend's sum)."""
        ys = [j for j, r in enumerate(self.rows) if r.support[0] < window.bottom and r.support[1] > window.top]
        xs = [j for j, r in enumerate(self.cols) if r.support[0] < window.right and r.support[1] > window.left]
        return [y * len(self.cols) + x for y in ys for x in xs]

    def sources_of(self, index: int) -> list[int]:
        """The crops whose backbone answers crop ``index``'s blended views may read (over its
        grown window, where the refiner runs): itself and every crop whose weight reaches it."""
        return sorted({index, *self.reaching(self.windows[index])})

    def sources(self, boxes: list[CropBox]) -> list[CropBox]:
        """The crops whose answers the views of ``boxes`` may read, row-major (what a clip
        runs in a blending stage's first pass)."""
        wanted = {k for box in boxes for k in self.sources_of(self.index[box])}
        return [self.boxes[k] for k in sorted(wanted)]


class FineStore:
    """A stage's backbone outputs over the crops' grown windows, and each crop's blended fine
    view (module docstring). In memory, or on disk in ``directory`` (one ``<i>.npy`` per
    crop, renamed into place complete, so any process may write any crop).

    In memory, a crop's answers are dropped once every view that reads them has been read
    (``expect``, ``release``): a stage run in order holds a few rows of crops at a time.

    Args:
        size: the stage size; crop, margin: ``pyramid.crop`` and ``pyramid.margin_pixels``.
        device: where ``views`` are returned (and the memory store keeps its tensors).
    """

    def __init__(self, size: Size, crop: Size, margin: Size, directory: Path | None = None,
                 device: torch.device | str = "cpu",
                 on_discard: Callable[["FineStore"], None] | None = None) -> None:
        self.grid = BlendGrid(size, crop, margin)
        self.directory = None if directory is None else Path(directory)
        self.device = torch.device(device)
        self.on_discard = on_discard
        self._tensors: dict[int, Tensor] = {}
        self._readers: dict[int, int] = {}  # views still to read a crop's answers (memory)
        self._dropped: set[int] = set()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def extent(self) -> Size:
        return self.grid.extent

    def write(self, boxes: list[CropBox], windows: Tensor) -> None:
        """Each crop's backbone probabilities over its grown window: ``windows`` ``(B, C,
        eh, ew)`` (``magseg.engine.pyramid.grown_windows``' extent)."""
        for probs, box in zip(windows, boxes):
            index = self.grid.index[box]
            if self.directory is None:
                self._tensors[index] = probs.to(self.device)
            else:
                save_chunk(self._path(index), probs)

    def expect(self, boxes: list[CropBox]) -> None:
        """The views of ``boxes`` will be read, each crop's once: their sources' answers
        stay until then."""
        for box in boxes:
            for k in self.grid.sources_of(self.grid.index[box]):
                self._readers[k] = self._readers.get(k, 0) + 1

    def release(self, boxes: list[CropBox]) -> None:
        """The views of ``boxes`` have been read: answers no other view expects are dropped
        (memory only; files go with ``discard``)."""
        if self.directory is not None:
            return
        for box in boxes:
            for k in self.grid.sources_of(self.grid.index[box]):
                self._readers[k] = self._readers.get(k, 0) - 1
                if self._readers[k] <= 0 and k in self._tensors:
                    del self._tensors[k]
                    self._dropped.add(k)

    def crops(self, boxes: list[CropBox]) -> Tensor:
        """``(B, C, ch, cw)`` float32: each crop's blended fine view over its crop window
        (``crop_windows``; its own answer on any padding beyond the stage)."""
        return self.views(boxes, crop_windows(boxes, self.grid.crop))

    def views(self, boxes: list[CropBox], windows: list[Rect]) -> Tensor:
        """``(B, C, h, w)`` float32: each crop's blended fine view over ``windows[i]``, any
        equally sized windows inside the crops' grown windows (the crop window, or the grown
        window itself)."""
        out = torch.empty((len(boxes), self._classes(boxes[0]), *windows[0].size), device=self.device)
        for i, (box, window) in enumerate(zip(boxes, windows)):
            self._blend(box, window, out[i])
        return out

    def crops_and_cells(self, boxes: list[CropBox], stride: int, compiled: bool = False) -> tuple[Tensor, Tensor]:
        """Each crop's blended fine view over its crop window, ``(B, C, ch, cw)`` (``crops``),
        and the cell means of its blended view over its grown window, ``(B, C, ceil(eh/s),
        ceil(ew/s))`` for ``stride`` s (``pool_cells`` of ``views`` over the grown windows,
        up to float rounding), without making that view: each answer's cells plus the cells
        of the blend's corrections over the margins (cell sums are linear). With
        ``compiled`` (a CPU store, numba installed: ``magseg.engine.fused``), one compiled
        pass per crop over its window's rows does both, the crops bit for bit the same."""
        grid, crop = self.grid, self.grid.crop
        crops = torch.empty((len(boxes), self._classes(boxes[0]), *crop), device=self.device)
        cells = crops.new_empty((*crops.shape[:2], *(-(-n // stride) for n in grid.extent)))
        if compiled:
            self._compiled_crops_and_cells(boxes, stride, crops, cells)
            return crops, cells
        for i, (box, crop_window) in enumerate(zip(boxes, crop_windows(boxes, crop))):
            k_own = grid.index[box]
            window = grid.windows[k_own]
            own = self._read(k_own, slice(None), slice(None))
            sums = cell_sums(own, stride)
            crops[i].copy_(own[(slice(None), *crop_window.within(window))])
            for part, correction in self._corrections(k_own, own, window):
                _add_cell_sums(sums, correction, part.within(window), stride, window.size)
                inside = part.intersection(crop_window)
                if not inside.empty:
                    crops[i][(slice(None), *inside.within(crop_window))] += \
                        correction[(slice(None), *inside.within(part))]
            cells[i] = sums.div_(cell_areas(window.size, stride, sums))
        return crops, cells

    def _compiled_crops_and_cells(self, boxes: list[CropBox], stride: int, crops: Tensor, cells: Tensor) -> None:
        """``crops_and_cells`` into ``crops`` and ``cells``, crop by crop on the thread pool,
        each one ``magseg.engine.fused_rows.blend_window`` pass."""
        from numba import float32, typed

        blend_window = compiled_loops().blend_window
        grid, array = self.grid, float32[:, :, ::1]
        jobs = []
        for i, (box, crop_window) in enumerate(zip(boxes, crop_windows(boxes, grid.crop))):
            k_own = grid.index[box]
            window = grid.windows[k_own]
            theirs, rows, cols = (typed.List.empty_list(array), typed.List.empty_list(float32[::1]),
                                  typed.List.empty_list(float32[::1]))
            rects, origins = [], []
            for k, part in self._reaching_parts(k_own, window):
                at, there = part.within(window), part.within(grid.windows[k])
                answer, origin = self._whole_or_part(k, there)
                theirs.append(answer)
                origins.append(origin)
                ramp_y, ramp_x = grid.ramps(k)
                rows.append(ramp_y.weights(part.top, part.bottom).numpy())
                cols.append(ramp_x.weights(part.left, part.right).numpy())
                rects.append((at[0].start, at[1].start, at[0].stop, at[1].stop))
            at = crop_window.within(window)
            own = self._whole_or_part(k_own, (slice(0, window.height), slice(0, window.width)))[0]
            jobs.append((own, theirs, np.array(rects, np.int64).reshape(-1, 4),
                         np.array(origins, np.int64).reshape(-1, 2), rows, cols, at[0].start, at[1].start))

        def one(i: int) -> None:
            own, theirs, rects, origins, rows, cols, top, left = jobs[i]
            blend_window(own, theirs, rects, origins, rows, cols, top, left, crops[i].numpy(), stride,
                         cells[i].numpy())

        each_map(one, len(jobs))
        cells.div_(cell_areas(grid.extent, stride, cells))

    def _blend(self, box: CropBox, window: Rect, out: Tensor) -> None:
        """Crop ``box``'s blended view over ``window`` into ``out`` ``(C, h, w)``."""
        i = self.grid.index[box]
        own = self._read(i, *window.within(self.grid.windows[i]))
        out.copy_(own)
        for part, correction in self._corrections(i, own, window):
            out[(slice(None), *part.within(window))] += correction

    def _corrections(self, i: int, own: Tensor, window: Rect) -> Iterator[tuple[Rect, Tensor]]:
        """The blend's terms ``w_k * (P_k - P_i)`` over ``window`` for crop ``i``, whose own
        answer there is ``own`` ``(C, h, w)``: ``(part, term)`` for each other crop k that
        ran and whose weight reaches the window, ``term`` ``(C, ph, pw)`` over ``part``,
        row-major (the order of the blend's sum)."""
        grid = self.grid
        for k, part in self._reaching_parts(i, window):
            theirs = self._read(k, *part.within(grid.windows[k]))
            mine = own[(slice(None), *part.within(window))]
            yield part, grid.weights(k, part).to(self.device) * (theirs - mine)

    def _reaching_parts(self, i: int, window: Rect) -> Iterator[tuple[int, Rect]]:
        """``(k, part)``: each other crop k that ran and whose weight reaches ``window`` (crop
        ``i``'s), and the part of the window it reaches, row-major (the blend's order)."""
        grid = self.grid
        for k in grid.reaching(window):
            if k == i or not self._has(k):
                continue
            part = grid.support(k).intersection(window)
            if not part.empty:
                yield k, part

    def _whole_or_part(self, index: int, part: tuple[slice, slice]) -> tuple[np.ndarray, tuple[int, int]]:
        """Crop ``index``'s answer as a C-contiguous array holding ``part`` (rows, columns of
        its window), and where the part starts in it: the whole stored answer in memory (no
        copy), the part alone from disk (what is read)."""
        if self.directory is None:
            return self._tensors[index].contiguous().numpy(), (part[0].start, part[1].start)
        return self._read(index, *part).contiguous().numpy(), (0, 0)

    def _classes(self, box: CropBox) -> int:
        """How many classes the answers hold (read from crop ``box``'s, which must be here)."""
        return self._read(self.grid.index[box], slice(0, 1), slice(0, 1)).shape[0]

    def _has(self, index: int) -> bool:
        """Whether crop ``index`` ran (a crop adaptive mode skipped did not)."""
        if self.directory is None:
            assert index not in self._dropped, "a crop's answers were read after their last expected view"
            return index in self._tensors
        return self._path(index).exists()

    def _read(self, index: int, rows: slice, cols: slice) -> Tensor:
        """``(C, rows, cols)`` of crop ``index``'s stored window, in its own coordinates."""
        if self.directory is None:
            return self._tensors[index][:, rows, cols]
        array = np.load(self._path(index), mmap_mode="r")
        return torch.from_numpy(np.array(array[:, rows, cols], DTYPE)).to(self.device)  # a copy: the file is read-only

    def _path(self, index: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{index}.npy"

    def disk_bytes(self) -> int:
        """Bytes its files take, whoever wrote them (0 in memory)."""
        if self.directory is None:
            return 0
        return sum(f.stat().st_size for f in self.directory.glob("*.npy"))

    def __getstate__(self) -> dict:
        # Sent to a worker (predict on a pool) as the directory and geometry.
        if self.directory is None:
            raise TypeError("a FineStore in memory cannot be sent to another process")
        return {**self.__dict__, "on_discard": None}  # the owner's callback stays here

    def discard(self) -> None:
        if self.on_discard:
            self.on_discard(self)
        self._tensors.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _add_cell_sums(sums: Tensor, part: Tensor, at: tuple[slice, slice], stride: int, size: Size) -> None:
    """Add the cell sums of ``part`` ``(C, ph, pw)``, lying at ``at`` in a map of ``size``
    whose cells of ``stride`` from its origin ``sums`` ``(C, ...)`` holds, to ``sums``: the
    part zero-padded to whole cells (the map's partial last cells at its far edges)."""
    (rows, cols), s = at, stride
    r0, c0 = rows.start // s * s, cols.start // s * s
    r1, c1 = min(-(-rows.stop // s) * s, size[0]), min(-(-cols.stop // s) * s, size[1])
    padded = part.new_zeros((part.shape[0], r1 - r0, c1 - c0))
    padded[:, rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0] = part
    sums[:, r0 // s : -(-r1 // s), c0 // s : -(-c1 // s)] += cell_sums(padded, s)


def store_bytes(size: Size, crop: Size, margin: Size, classes: int) -> int:
    """Bytes a ``FineStore`` of a stage of ``size`` takes on disk (the .npy headers aside)."""
    grid = BlendGrid(size, crop, margin)
    return len(grid.boxes) * grid.extent[0] * grid.extent[1] * classes * np.dtype(DTYPE).itemsize
