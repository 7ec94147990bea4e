"""The engine's per-pixel work on a CPU in compiled loops (numba): the refine step fused
into one pass per row, and the blend of a crop's fine view with its cells.

After magseg's refiner (``magseg.engine.refiner_network.Refiner``) has run its convolutions
on a crop's cells, everything left is per pixel over the C class planes: enlarge the
correction and the pooled fine map over the crop, the gate's three cues and its sigmoid,
``weights = fine * exp(gate * delta)`` and their sum, the certainty of R and of Y, the
error score, both argmaxes. In ATen each is a pass over the batch's C-channel maps, two
dozen in all, each bound by memory bandwidth or by ``exp``; ``refine_pass`` reads a crop's
row of fine, Y and the two enlarged cell rows once and writes the row's error score and
labels (and, for a stage that keeps probabilities, its weights and their sum), its scratch
a few rows that stay in L1. The exponential is a vectorisable Cephes ``expf`` (range
reduction, a degree-6 polynomial, the power of two from its bits): numba has no vector
``exp`` without Intel's SVML, and a scalar ``exp`` per value would cost more than the pass.

    one crop row y:  delta_c, smooth_c = the row of cells enlarged (bilinear, edges clamped)
                     gate  = sigmoid(w0 cert(fine) + w1 tv(fine, Y) + w2 (1 - sum min(fine, smooth)) + b)
                     w_c   = fine_c exp(gate delta_c),  total = sum_c w_c
                     score = cert(w) / total * (1 - cert(Y)),  labels = argmax w, argmax Y

The values are the eager path's (``Refiner.weights_from_cells``, ``error_score_and_tops``,
``labels_of``) up to float rounding: the polynomial's ``exp`` is within 2 ulp of the exact
one, and no loop reassociates a sum (no fast-math), so a CPU's vector width does not change
a value. ``tests/test_fused.py`` compares the two. The other compiled loops: the blend
(``magseg.engine.blend.FineStore.crops_and_cells``), a crop's blended view row by row,
written on the crop and summed into cells, never made over the window; Y on the crops and
their windows' cells (``enlarged_crops_and_cells``), likewise; and the shrinks of the image
to a stage (``filter_piece``) and of crops to the model input (``shrink_planes``). Crops
run side by side on the engine's thread pool
(``magseg.engine.opencv.each_map``; the loops release the GIL), the refine pass as two row
halves per crop so that a batch of any size keeps every core busy.

numba is imported on first use, and only for a stage large enough to pay for it, in crops
large enough (``worth_fusing``): importing it, loading its cached machine code and typing
the first calls cost about 0.6 s once per process, compiling on a cold cache (a new
machine, a new numba) about 5 s more, kept in numba's on-disk cache afterwards. The loops
live in ``magseg.engine.fused_rows``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from magseg.engine.opencv import each_map
from magseg.engine.pyramid import Size
from magseg.engine.resample import AxisWeights, Source, cell_areas
from magseg.geometry import Rect

# engine.compiled: auto takes the compiled loops on a stage of at least a megapixel (below
# that, their cost once per process, ~0.6 s, is never paid back) cut into crops of at
# least 512 x 512 pixels: with small crops the whole engine ran slower compiled (a 3000 px
# raster with the demo's torch backbone, crops of 128 or 256 px; docs/performance.md#compiled-loops).
FUSED_MIN_PIXELS = 1 << 20
FUSED_MIN_CROP = 1 << 18


@dataclass
class FusedStep:
    """What the fused pass gives for a batch of B crops of ``(h, w)``."""

    raw: Tensor  # (B, h, w) float32 error score cert(R) * (1 - cert(Y)), unblurred
    refined_labels: Tensor  # (B, h, w) uint8 argmax of R (C where a channel is NaN)
    coarse_labels: Tensor  # (B, h, w) uint8 argmax of Y (likewise)
    weights: Tensor | None  # (B, C, h, w) R up to the factor ``total``, when asked for
    total: Tensor | None  # (B, h, w)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the compiled loops load here (once per process): numba installed, and usable
    (its on-disk cache needs a writable place: the package's ``__pycache__`` or the user's
    cache directory). Where they do not, ATen's passes do the work; a numba that is there
    but fails says why, once."""
    try:
        compiled_loops()
    except ImportError:
        return False
    except Exception as exc:  # noqa: BLE001 - any failure of numba's: the eager path instead
        warnings.warn(f"magseg: the compiled loops are unavailable ({type(exc).__name__}: {exc}); "
                      "the engine runs ATen's passes instead", RuntimeWarning, stacklevel=2)
        return False
    return True


def worth_fusing(device: torch.device | str, pixels: int, crop: tuple[int, int], mode: str | bool = "auto") -> bool:
    """Whether work over ``pixels`` (a stage's, or the image's it reads) in crops of
    ``crop`` on ``device`` takes the compiled loops, by ``engine.compiled`` ``mode``: on the
    CPU outside autograd, numba installed, and with ``auto`` at least ``FUSED_MIN_PIXELS``
    in crops of at least ``FUSED_MIN_CROP`` pixels; never with False."""
    large = pixels >= FUSED_MIN_PIXELS and crop[0] * crop[1] >= FUSED_MIN_CROP
    return (mode is not False and torch.device(device).type == "cpu" and not torch.is_grad_enabled()
            and (mode is True or large) and available())


def refine_pass(small: Tensor, fine: Tensor, coarse: Tensor, offsets: list[tuple[int, int]], stride: int,
                gate: tuple[float, float, float, float] | None, with_weights: bool) -> FusedStep:
    """The per-pixel part of the refine step for a batch of crops, one fused pass.

    Args:
        small: ``(B, C or 2C, hc, wc)`` what ``Refiner._small`` gives from each crop's
            window cells: the correction shifted to a per-pixel maximum of 0, then (with a
            gate) the pooled fine map; cells from the window's origin.
        fine, coarse: ``(B, C, h, w)`` float32 probabilities of the crops (F and Y).
        offsets: ``(dy, dx)`` of each crop in its window (cells' origin).
        stride: the cells' size in pixels (the enlargement factor).
        gate: ``(w_certainty, w_disagreement, w_detail, bias)`` of ``RefinerGate``, or None
            without a gate (weights = fine * exp(delta)).
        with_weights: also return the weights and their sum (a stage that keeps probabilities).
    """
    batch, _, height, width = fine.shape
    fine_np, coarse_np = fine.contiguous().numpy(), coarse.contiguous().numpy()
    raw = torch.empty((batch, height, width), dtype=torch.float32)
    refined_labels = torch.empty((batch, height, width), dtype=torch.uint8)
    coarse_labels = torch.empty_like(refined_labels)
    weights = torch.empty_like(fine) if with_weights else None
    total = torch.empty_like(raw) if with_weights else None
    nothing3, nothing2 = np.empty((0, 0, 0), np.float32), np.empty((0, 0), np.float32)
    gated = gate is not None
    w0, w1, w2, bias = (np.float32(v) for v in (gate or (0.0, 0.0, 0.0, 0.0)))
    kernels = compiled_loops()
    cells = small.contiguous().numpy()
    # The cells enlarged along the columns over each crop, once: each row of the loop below
    # is then a lerp of two of their rows.
    columns = np.empty((batch, cells.shape[1], cells.shape[2], width), np.float32)
    each_map(lambda i: kernels.enlarge_columns(cells[i], offsets[i][1], 0, stride, columns[i]), batch)
    # Each crop row's two cell rows and weight, from its place in the window.
    rows = [kernels.axis_sources(dy, 0, stride, height, cells.shape[2] - 1)[:3] for dy, _ in offsets]
    halves = [(0, height // 2), (height // 2, height)]

    def one(job: int) -> None:
        i, (start, stop) = job // 2, halves[job % 2]
        kernels.refine_rows(columns[i], fine_np[i], coarse_np[i], *rows[i], gated, w0, w1, w2, bias,
                            start, stop, raw[i].numpy(), refined_labels[i].numpy(), coarse_labels[i].numpy(),
                            nothing3 if weights is None else weights[i].numpy(),
                            nothing2 if total is None else total[i].numpy())

    each_map(one, 2 * batch)
    return FusedStep(raw, refined_labels, coarse_labels, weights, total)


def enlarged_crops_and_cells(source: Source, size: Size, windows: list[Rect], offsets: list[tuple[int, int]],
                             crop: Size, stride: int) -> tuple[Tensor, Tensor] | None:
    """A map (Y) enlarged from ``source`` to ``size`` by whole factors, on crops and their
    windows' cells, without making the windows: ``(crops, cells)``, ``(B, C, ch, cw)`` at
    ``offsets`` in ``windows`` and ``(B, C, ceil(eh/s), ceil(ew/s))`` for ``stride`` s;
    None where it does not apply (another factor, a window past the map's edge). Bilinear
    on pixel centres with edges clamped, ``magseg.engine.resample``'s enlargement up to
    float rounding, each pixel's value set by its place in the whole map (whatever window
    asks for it).

    Only the crop is enlarged (``fused_rows.enlarged_rows``). The cells are the enlargement's
    means, and an enlargement is linear: a cell's sum is a filter of the source pixels under
    it, ``cell_filter``'s weights along each axis (``fused_rows.filter_axes``), so the window's margin
    is never enlarged (a 764 px window of a 612 px crop: 36 % of its pixels)."""
    (height, width), (source_height, source_width) = size, source.size
    fy, fx = height // source_height, width // source_width
    inside = Rect.of_size(size)
    if fy * source_height != height or fx * source_width != width or not all(map(inside.contains, windows)):
        return None
    kernels = compiled_loops()
    # A map held whole in memory (a MemoryMap, a TensorSource) is read where it lies; any
    # other source, window by window. Either way the clamping at the edges is the map's.
    whole = getattr(source, "tensor", None)
    if not (isinstance(whole, Tensor) and whole.dtype == torch.float32 and whole.is_contiguous()):
        whole = None
    jobs = []
    for window, (dy, dx) in zip(windows, offsets):
        # Each axis' sources and weights from the pixels' place in the map, then relative to
        # the array read (the whole map, or the part under the window).
        rows = kernels.axis_sources(window.top, 0, fy, window.height, source_height - 1)[:3]
        if whole is None:
            r0, c0 = int(rows[0][0]), max(window.left // fx - 1, 0)
            part = source.read(slice(r0, int(rows[1][-1]) + 1),
                               slice(c0, min((window.right - 1) // fx + 2, source_width))).float().contiguous()
        else:
            (r0, c0), part = (0, 0), whole
        cols = kernels.axis_sources(window.left, c0, fx, window.width, part.shape[2] - 1)[:3]
        low, high, frac = rows[0][dy : dy + crop[0]] - r0, rows[1][dy : dy + crop[0]] - r0, rows[2][dy : dy + crop[0]]
        cell_rows = cell_filter(rows[0] - r0, rows[1] - r0, rows[2], stride, part.shape[1])
        cell_cols = cell_filter(*cols, stride, part.shape[2])
        jobs.append((part.numpy(), low, high, frac, window.left + dx, c0, cell_rows, cell_cols))
    classes, extent = jobs[0][0].shape[0], windows[0].size
    crops = torch.empty((len(windows), classes, *crop))
    cells = torch.empty((len(windows), classes, *(-(-n // stride) for n in extent)))

    def one(i: int) -> None:
        part, low, high, frac, left, c0, (row_first, row_weight), (col_first, col_weight) = jobs[i]
        kernels.enlarged_rows(part, left, c0, fx, low, high, frac, crops[i].numpy())
        kernels.filter_axes(part.reshape(classes, -1), part.shape[2], row_first, row_weight, col_first, col_weight,
                            cells[i].numpy())

    each_map(one, len(windows))
    return crops, cells.div_(cell_areas(extent, stride, cells))


def cell_filter(low: np.ndarray, high: np.ndarray, frac: np.ndarray, stride: int, n_src: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis, the sums over cells of ``stride`` pixels of a bilinear enlargement
    whose pixel ``y`` is ``(1 - frac[y]) src[low[y]] + frac[y] src[high[y]]``, as a filter
    of the source: ``(first, weight)``, cell ``j``'s sum ``sum_t weight[j, t] src[first[j] +
    t]`` over an axis of ``n_src`` source pixels (every window of taps inside it, ``first``
    ascending, as ``fused_rows.filter_axes`` takes them). The last cell may be short."""
    n = len(low)
    starts = np.arange(0, n, stride)
    cell = np.arange(n) // stride
    first = np.minimum.reduceat(low, starts)
    taps = min(int((np.maximum.reduceat(high, starts) - first).max()) + 1, n_src)
    first = np.minimum(first, n_src - taps)
    weight = np.zeros((len(starts), taps), np.float32)
    np.add.at(weight, (cell, low - first[cell]), np.float32(1) - frac)
    np.add.at(weight, (cell, high - first[cell]), frac)
    return first.astype(np.int64), weight


def filter_piece(piece: Tensor, rows: AxisWeights, cols: AxisWeights, out_rows: slice, out_cols: slice,
                 origin: tuple[int, int], out: Tensor | None = None) -> Tensor:
    """``magseg.engine.resample``'s tap-by-tap filter, rows then columns, in compiled loops
    (``filter_plane``), bit for bit: output pixels ``out_rows`` x ``out_cols`` of the axes ``rows``,
    ``cols`` from ``piece`` ``(C, h, w)``, which holds every tap they read (zeros past the
    image) from source pixel ``origin`` on. ``(C, H, W)``, into ``out`` when given (a view
    whose rows are contiguous: a window's part of its slot in a batch)."""
    first_rows = (rows.first[out_rows] - origin[0]).numpy()
    first_cols = (cols.first[out_cols] - origin[1]).numpy()
    if out is None:
        out = torch.empty((piece.shape[0], len(first_rows), len(first_cols)))
    source = piece.float().contiguous()
    source, row_weight, col_weight, planes = (source.view(source.shape[0], -1).numpy(), rows.weight[out_rows].numpy(),
                                              cols.weight[out_cols].numpy(), out.numpy())
    # In row bands side by side on the pool: a stage's only window (stage 0 is often one
    # crop) would otherwise leave all but one core idle.
    cuts = np.linspace(0, len(first_rows), max(1, min(os.cpu_count() or 1, len(first_rows) // 64)) + 1).astype(int)

    def band(i: int) -> None:
        part = slice(int(cuts[i]), int(cuts[i + 1]))
        for plane, target in zip(source, planes):
            filter_plane(plane, piece.shape[-1], first_rows[part], row_weight[part], first_cols, col_weight,
                         target[part])

    each_map(band, len(cuts) - 1)
    return out


# Output rows filtered at a time by filter_plane: of 32, 64 and 128, the fastest over the
# engine's shrinks (764, 1528 and 2448 px to 639 and 512); a band of the widest source and
# its transpose take about a core's L2 cache (1.25 MB).
FILTER_BAND = 64


def filter_plane(src: np.ndarray, row_stride: int, row_first: np.ndarray, row_weight: np.ndarray,
                 col_first: np.ndarray, col_weight: np.ndarray, out: np.ndarray) -> None:
    """A separable filter of one plane, rows then columns, into ``out`` ``(H, W)`` (rows
    contiguous, any distance apart): ``out[i, j] = sum_u col_weight[j, u] * (sum_t
    row_weight[i, t] * src[(row_first[i] + t) * row_stride + col_first[j] + u])``, each sum
    tap by tap (``fused_rows.filter_rows``), the values of ``magseg.engine.resample``'s
    tap-by-tap filter bit for bit. ``src``: the plane's rows ``row_stride`` apart in one
    flat run (``flat_rows``); ``col_first`` ascending.

    A column's taps lie along a row, so filtering it pixel by pixel reads a few values at a
    time, a loop no compiler vectorises (90 % of a 764 -> 639 px shrink's time). So a band of
    ``FILTER_BAND`` output rows is filtered along the rows, transposed (OpenCV), filtered
    along its rows again with the columns' taps, and transposed back into ``out``: each
    filtering loop runs over whole rows. A 764 -> 639 px shrink takes 2.5 times less time
    so, a 2448 -> 512 px one 1.15 times less (docs/performance.md#compiled-loops)."""
    loops = compiled_loops()
    lo = int(col_first[0])
    n = int(col_first[-1]) + col_weight.shape[1] - lo
    height, width = out.shape
    across_first = col_first - lo
    rows = np.empty((FILTER_BAND, n), np.float32)
    for top in range(0, height, FILTER_BAND):
        size = min(FILTER_BAND, height - top)
        band = rows[:size]
        loops.filter_rows(src, row_stride, lo, row_first[top : top + size], row_weight[top : top + size], band)
        across = cv2.transpose(band)  # (n, size)
        done = np.empty((width, size), np.float32)
        loops.filter_rows(across.reshape(-1), size, 0, across_first, col_weight, done)
        target = out[top : top + size]
        if cv2.transpose(done, dst=target) is not target:  # OpenCV made its own array instead
            target[...] = done.T


def can_shrink(x: Tensor | Sequence[Tensor], size: Size) -> bool:
    """Whether ``shrink_planes`` takes ``x`` (a batch, or a list of equally sized maps) to
    ``size``: float32 on the CPU outside autograd, no axis growing."""
    first = x[0]
    return (first.device.type == "cpu" and first.dtype == torch.float32 and not torch.is_grad_enabled()
            and size[0] <= first.shape[-2] and size[1] <= first.shape[-1])


def shrink_planes(x: Tensor | Sequence[Tensor], size: Size, multiple: int = 1) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", antialias=True)`` for ``(B, C, h, w)``
    float32 on the CPU (or a list of B ``(C, h, w)`` maps, views cut from a larger map
    included), no axis growing, to float rounding: ATen's own weights (read off by resizing
    an identity once per size pair) in ``filter_plane``, as ``filter_piece`` runs them, each
    map's planes side by side on the thread pool.

    With ``multiple``, the result is written into a buffer padded to the next multiple and
    the padding is the reflection ``magseg.engine.backbone.run_backbone`` would add (where
    it reflects: padding narrower than the map), so the backbone's input is made in one
    pass instead of two: ``(B, C, H', W')``, ``size`` at the top left."""
    maps = list(x)
    channels, (h, w) = maps[0].shape[0], maps[0].shape[-2:]
    rows, cols = _aten_weights(h, size[0]), _aten_weights(w, size[1])
    (height, width), (pad_rows, pad_cols) = size, ((-n) % multiple for n in size)
    if pad_rows >= height or pad_cols >= width:  # run_backbone replicates instead
        pad_rows = pad_cols = 0
    out = torch.empty((len(maps), channels, height + pad_rows, width + pad_cols))
    flat = out[..., :height, :width].view(-1, 1, *size).numpy()
    row_first, row_weight, col_first, col_weight = (a.numpy() for a in (rows.first, rows.weight, cols.first,
                                                                        cols.weight))

    def plane(i: int) -> None:
        source, row_stride = flat_rows(maps[i // channels][i % channels])
        filter_plane(source, row_stride, row_first, row_weight, col_first, col_weight, flat[i, 0])

    each_map(plane, len(maps) * channels)
    if pad_rows:  # F.pad's reflection: row height + i is row height - 2 - i
        out[..., height:, :width] = out[..., height - 1 - pad_rows : height - 1, :width].flip(-2)
    if pad_cols:  # then the columns over every row, the corners included
        out[..., width:] = out[..., width - 1 - pad_cols : width - 1].flip(-1)
    return out


def flat_rows(plane: Tensor) -> tuple[np.ndarray, int]:
    """A float32 CPU plane ``(h, w)`` as ``filter_plane`` reads it: its rows in one
    flat run, and how far apart they are. A plane cut from a wider map (rows apart, pixels
    side by side) is read in place, from its first pixel to its last: no copy of it."""
    (h, w), (row_stride, col_stride) = plane.shape, plane.stride()
    if col_stride != 1 or row_stride < w:
        return plane.contiguous().view(-1).numpy(), w
    return torch.as_strided(plane, ((h - 1) * row_stride + w,), (1,), plane.storage_offset()).numpy(), row_stride


@functools.lru_cache(maxsize=16)
def _aten_weights(n_src: int, n_dst: int) -> AxisWeights:
    """ATen's antialiased bilinear weights of an axis ``n_src -> n_dst`` as ``AxisWeights``:
    row i of an identity so resized holds output pixel i's weights, exactly."""
    if n_src == n_dst:
        return AxisWeights(torch.arange(n_src), torch.ones((n_src, 1)), 1, 1)
    matrix = F.interpolate(torch.eye(n_src)[None, None], size=(n_dst, n_src), mode="bilinear",
                           align_corners=False, antialias=True)[0, 0]
    nonzero = matrix != 0
    first = nonzero.float().argmax(dim=1)
    taps = int((n_src - nonzero.flip(1).float().argmax(dim=1) - first).max())
    first = first.clamp(max=n_src - taps)  # every window of taps inside the axis
    index = first[:, None] + torch.arange(taps)
    return AxisWeights(first, matrix.gather(1, index).contiguous(), taps, 0)


@functools.lru_cache(maxsize=1)
def compiled_loops() -> Any:
    """The compiled loops (``magseg.engine.fused_rows``): numba imported, and each loop
    compiled or its cached machine code loaded, on first use."""
    from magseg.engine import fused_rows

    return fused_rows
