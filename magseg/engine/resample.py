"""Resizing by windows: any window of an image resized to a stage's size, computed from just
the source pixels it needs, and bit-identical however the image is cut into windows.

The engine never makes a whole stage image or a whole upsampled map: each crop reads its
window of the image at the stage's magnification (``resample_windows``). The same code runs
on an image in memory (``segment``) and on a raster read window by window (``magseg
predict``), so both give the same pixels, bit for bit, whatever the raster's size.

The filter is bilinear's triangle, stretched to the source's pixel spacing when shrinking
(antialiased, as ``F.interpolate(..., antialias=True)``), on pixel centres
(``align_corners=False``), with edge pixels renormalised as the weights that fall outside
the image are dropped. Output pixel ``i`` of an axis of ``n_dst`` from ``n_src`` reads source
pixels ``j`` with ``|j + 0.5 - s (i + 0.5)| < max(s, 1)``, ``s = n_src / n_dst``.

Why not ``F.interpolate`` on pieces: its weights depend on the piece's own size and origin,
so a piece's pixels differ from the whole map's in the last bits (or more, at non-integer
scales). Here every output pixel is the same sum, in the same order, of the same float32
products, whatever window asks for it: rows then columns, tap by tap, each a separately
rounded multiply and add (no fused multiply-add, whose rounding differs between vectorised
and scalar loops).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from magseg.engine.opencv import can_enlarge, each_map, enlarge_planes
from magseg.engine.pyramid import Size
from magseg.geometry import Rect


class Source(Protocol):
    """An image or map read by windows: ``size`` is ``(H, W)``; ``read(rows, cols)`` returns
    ``(C, rows, cols)`` float32 for slices inside the image."""

    size: Size

    def read(self, rows: slice, cols: slice) -> Tensor: ...


@dataclass
class TensorSource:
    """A ``(C, H, W)`` tensor as a ``Source``."""

    tensor: Tensor

    @property
    def size(self) -> Size:
        return tuple(self.tensor.shape[-2:])

    def read(self, rows: slice, cols: slice) -> Tensor:
        return self.tensor[:, rows, cols]


@dataclass(frozen=True)
class ReadSource:
    """A ``Source`` of ``size`` (H, W) whose pieces come from ``read(rows, cols)`` ->
    ``(C, h, w)`` tensor: a scene read from a file or a memory map, or one normalised on
    the fly, without a wrapper class per kind."""

    size: Size
    read: Callable[[slice, slice], Tensor]


@dataclass(frozen=True)
class AxisWeights:
    """The filter along one axis, ``n_src`` -> ``n_dst``: output pixel ``i`` is
    ``sum_t weight[i, t] * src[first[i] + t]`` over ``taps`` taps (weights 0 past the edges).
    ``step``: ``first[i] = step * i + first[0]`` for every ``i`` (an integer shrink), else 0."""

    first: Tensor  # (n_dst,) int64, may be < 0 or reach past n_src
    weight: Tensor  # (n_dst, taps) float32
    taps: int
    step: int


@functools.lru_cache(maxsize=32)
def axis_weights(n_src: int, n_dst: int) -> AxisWeights:
    """The weights of one axis (cached: a run asks for the same few axes again and again)."""
    scale = n_src / n_dst
    support = max(scale, 1.0)
    centre = scale * (torch.arange(n_dst, dtype=torch.float64) + 0.5) - 0.5
    first = torch.floor(centre - support).long() + 1
    taps = int((torch.ceil(centre + support).long() - 1 - first).max()) + 1
    j = first[:, None] + torch.arange(taps)
    w = (1 - ((j - centre[:, None]).abs() / support)).clamp_(min=0)
    w[(j < 0) | (j >= n_src)] = 0
    w /= w.sum(dim=1, keepdim=True)
    step = round(scale) if scale >= 1 and scale == round(scale) else 0
    if step and not torch.equal(first, first[0] + step * torch.arange(n_dst)):
        step = 0
    return AxisWeights(first, w.float(), taps, step)


def _filter_axis(x: Tensor, dim: int, aw: AxisWeights, lo: int, hi: int, origin: int) -> Tensor:
    """Output pixels ``[lo, hi)`` of axis ``dim`` from ``x``, whose index 0 along ``dim`` is
    source pixel ``origin`` and which holds every tap they read (zeros past the image)."""
    if dim == x.dim() - 1:
        # Filter the last axis as rows: a tap is then whole contiguous rows, not a gather
        # of every step-th float, which costs more than the two transposes.
        return _filter_axis(x.transpose(-1, -2).contiguous(), dim - 1, aw, lo, hi, origin
                            ).transpose(-1, -2).contiguous()
    first = aw.first[lo:hi] - origin
    weight = aw.weight[lo:hi].to(x.device)
    shape = [1] * x.dim()
    shape[dim] = hi - lo
    out = term = None
    for t in range(aw.taps):
        if aw.step:
            start = int(first[0]) + t
            index = [slice(None)] * x.dim()
            index[dim] = slice(start, start + aw.step * (hi - lo - 1) + 1, aw.step)
            tap = x[tuple(index)]
        else:
            tap = x.index_select(dim, (first + t).to(x.device))
        if out is None:
            out = torch.mul(tap, weight[:, t].view(shape))
            term = torch.empty_like(out)
        else:
            out.add_(torch.mul(tap, weight[:, t].view(shape), out=term))
    return out


def _source_span(aw: AxisWeights, lo: int, hi: int) -> tuple[int, int]:
    """Source pixels ``[a, b)`` that output pixels ``[lo, hi)`` read (may reach outside)."""
    return int(aw.first[lo]), int(aw.first[hi - 1]) + aw.taps


def _read_padded(source: Source, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """``source`` over ``rows`` x ``cols`` (half-open), zero where they leave the image."""
    (h, w), (r0, r1), (c0, c1) = source.size, rows, cols
    inner = source.read(slice(max(r0, 0), min(r1, h)), slice(max(c0, 0), min(c1, w)))
    if (r0, r1, c0, c1) == (max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)):
        return inner.float()
    out = inner.new_zeros((inner.shape[0], r1 - r0, c1 - c0), dtype=torch.float32)
    out[:, max(-r0, 0) : max(-r0, 0) + inner.shape[1], max(-c0, 0) : max(-c0, 0) + inner.shape[2]] = inner
    return out


def _integer_factor(src: int, dst: int) -> tuple[int, bool] | None:
    """``(f, shrink)`` when one of ``src``, ``dst`` is ``f`` times the other, else None."""
    if src % dst == 0:
        return src // dst, True
    if dst % src == 0:
        return dst // src, False
    return None


# PyTorch's CPU bilinear upsampling runs a different kernel, with different rounding, for
# outputs of height + width <= 128 (``_use_vectorized_kernel_cond_2d`` in ATen's
# UpSampleKernel.cpp); a part is at least its window's size, so windows above this size
# upsample with the kernel the whole map would use.
_SAME_KERNEL = 128


def _interpolated_part(source: Source, size: Size, rows: tuple[int, int], cols: tuple[int, int]
                       ) -> Tensor | None:
    """Output pixels ``rows`` x ``cols`` (inside the ``size`` grid) by ``F.interpolate``
    (shrinking) or OpenCV's bilinear (enlarging, ``magseg.engine.opencv.enlarge_planes``;
    ``F.interpolate`` off the CPU) on just the source part they read, when that is
    bit-identical to resizing the whole map: an integer factor on both axes, the same way on
    both (shrink or enlarge), and an enlarged window starting on a multiple of the factor.
    None otherwise.

    A part starts on a whole multiple of the factor and has one output pixel of margin on
    each side (the filter reaches half a pixel, or a pixel and a half, past its own), so
    every kept pixel sees exactly the source pixels, weights and edge clamping it sees in the
    whole map; only the margin, which is cut off, sees the part's edge.
    """
    fy, fx = _integer_factor(source.size[0], size[0]), _integer_factor(source.size[1], size[1])
    # An axis shrunk to one pixel: PyTorch's antialiased kernel spreads the other axis's
    # weights too (every row of a 6 x 2 -> 3 x 1 resize comes out the same), so the filter
    # below handles such grids.
    if fy is None or fx is None or fy[1] != fx[1] or min(size) == 1:
        return None
    (f, shrink), (g, _) = fy, fx
    (r0, r1), (c0, c1) = rows, cols
    if shrink:
        o0, o1, p0, p1 = max(r0 - 1, 0), min(r1 + 1, size[0]), max(c0 - 1, 0), min(c1 + 1, size[1])
        part = source.read(slice(o0 * f, o1 * f), slice(p0 * g, p1 * g)).float()
        out = F.interpolate(part[None], size=(o1 - o0, p1 - p0), mode="bilinear",
                            align_corners=False, antialias=True)[0]
        return out[:, r0 - o0 : r1 - o0, c0 - p0 : c1 - p0]
    if r0 % f or c0 % g or (r1 - r0) + (c1 - c0) <= _SAME_KERNEL:
        return None
    # Output row r reads source rows floor((r + 0.5) / f - 0.5) and the one after it.
    y0, x0 = max(r0 // f - 1, 0), max(c0 // g - 1, 0)
    y1, x1 = min((r1 - 1) // f + 2, source.size[0]), min((c1 - 1) // g + 2, source.size[1])
    part = source.read(slice(y0, y1), slice(x0, x1)).float()
    enlarged = ((y1 - y0) * f, (x1 - x0) * g)
    if can_enlarge(part, enlarged):  # OpenCV's: the same values, window by window (its docstring)
        out = enlarge_planes(part, enlarged)
    else:
        out = F.interpolate(part[None], scale_factor=(f, g), mode="bilinear", align_corners=False,
                            recompute_scale_factor=False)[0]
    dy, dx = r0 - y0 * f, c0 - x0 * g
    return out[:, dy : dy + r1 - r0, dx : dx + c1 - c0]


def resample_window(source: Source, size: Size, window: Rect, compiled: bool = False,
                    out: Tensor | None = None) -> Tensor:
    """One ``window`` ``(h, w)`` of ``source`` resized to ``size``: ``(C, h, w)`` float32, zero
    where the window leaves the ``size`` grid; written into ``out`` when given (a batch's
    slot: ``resample_windows``), else into a new tensor or, for a window inside a source of
    the stage's size, a view of the source.

    Integer factors (every pyramid of doubling scales over a scene-sized image) take
    ``F.interpolate`` or OpenCV's bilinear on the window's part, which equals resizing the
    whole map so (``_interpolated_part``); any other factor takes the tap-by-tap filter of
    this module's docstring. Either way a pixel's value does not depend on the window that asks for it.
    With ``compiled`` (a CPU, numba installed: ``magseg.engine.fused``) every shrink takes
    the tap-by-tap filter as one compiled loop, at about half ATen's time.
    """
    height, width = size
    part = window.intersection(Rect.of_size(size))
    if part.empty:
        if out is None:
            probe = _probe(source, size, window)
            return probe.new_zeros((probe.shape[0], *window.size), dtype=torch.float32)
        return out.zero_()
    r0, r1, c0, c1 = part.top, part.bottom, part.left, part.right
    shrinks = source.size[0] >= height and source.size[1] >= width
    if out is not None and part != window:  # only what the window holds past the grid
        out.zero_()
    target = None if out is None else out[(slice(None), *part.within(window))]
    if tuple(source.size) == (height, width):
        inside = source.read(*part.slices).float()
    else:
        inside = None if compiled and shrinks else _interpolated_part(source, size, (r0, r1), (c0, c1))
        if inside is None:
            ay, ax = axis_weights(source.size[0], height), axis_weights(source.size[1], width)
            rows, cols = _source_span(ay, r0, r1), _source_span(ax, c0, c1)
            piece = _read_padded(source, rows, cols)
            if compiled and shrinks:
                from magseg.engine.fused import filter_piece  # numba's module, on first use

                inside = filter_piece(piece, ay, ax, slice(r0, r1), slice(c0, c1), (rows[0], cols[0]), target)
            else:
                inside = _filter_axis(_filter_axis(piece, 1, ay, r0, r1, rows[0]), 2, ax, c0, c1, cols[0])
    if out is not None:
        if inside is not target:
            target.copy_(inside)
        return out
    if part == window:
        return inside
    whole = inside.new_zeros((inside.shape[0], *window.size))
    whole[(slice(None), *part.within(window))] = inside
    return whole


def _probe(source: Source, size: Size, window: Rect) -> Tensor:
    """One pixel of ``source`` that ``window`` of its resampling to ``size`` reads (a map
    written only where a clip needs it has it), for its channels and device."""
    part = window.intersection(Rect.of_size(size))
    if part.empty:
        return source.read(slice(0, 1), slice(0, 1))
    row = min(part.top * source.size[0] // size[0], source.size[0] - 1)
    col = min(part.left * source.size[1] // size[1], source.size[1] - 1)
    return source.read(slice(row, row + 1), slice(col, col + 1))


def resample_windows(source: Source, size: Size, windows: list[Rect], compiled: bool = False) -> Tensor:
    """Equally sized ``windows`` of ``source`` resized to ``size``: ``(B, C, h, w)`` float32
    (``compiled``: ``resample_window``'s), each written into its slot of the batch.

    Each pixel is exactly what any other window covering it computes (module docstring), so
    crops cut from a stage image made this way never disagree where they overlap.
    """
    sizes = {window.size for window in windows}
    if len(sizes) > 1:
        raise ValueError(f"windows must share one size, got {sorted(sizes)}")
    probe = _probe(source, size, windows[0])
    batch = torch.empty((len(windows), probe.shape[0], *windows[0].size), dtype=torch.float32, device=probe.device)
    if compiled and len(windows) > 1:  # the windows side by side on the thread pool
        inference = torch.is_inference_mode_enabled()  # per thread: the pool's take the caller's

        def one(i: int) -> None:
            with torch.inference_mode(inference):
                resample_window(source, size, windows[i], True, batch[i])

        each_map(one, len(windows))
    else:
        for i, window in enumerate(windows):
            resample_window(source, size, window, compiled, batch[i])
    return batch


def window_pieces(source: Source, size: Size, windows: list[Rect]) -> list[Tensor | None]:
    """For each window of the ``size`` grid, the source pixels under it, ``(C, f h, g w)``
    float32 (a view where the source gives one), when ``size`` shrinks the source's size by
    whole factors ``f``, ``g`` and the window lies inside the grid; else None (the window
    has pixels the source does not hold, or is the source's own: ``resample_windows``).

    A window's pixels at the stage are a resampling of exactly these, so what is made from
    the window at another size can be made from them in one filter, without the stage's
    (``magseg.engine.inputs.backbone_inputs``)."""
    (height, width), (h, w) = source.size, size
    # At the source's own size (f = g = 1) there is no filter to save, only the copy of the
    # window into its batch; shrinking the windows from views of the source instead left
    # the engine slower (docs/performance.md#the-backbones-input-and-output).
    if height % h or width % w or (height, width) == (h, w):
        return [None] * len(windows)
    f, g, grid = height // h, width // w, Rect.of_size(size)
    return [source.read(slice(win.top * f, win.bottom * f), slice(win.left * g, win.right * g)).float()
            if win.intersection(grid) == win else None for win in windows]


@functools.lru_cache(maxsize=16)
def _enlarge_phases(factor: int) -> tuple[int, Tensor]:
    """For an enlargement by ``factor``: how many of a source pixel's ``factor`` output pixels
    lie before its centre (they blend it with the pixel before; the rest with the one after),
    and each output pixel's weight on the other pixel of its pair, ``(factor,)`` float32."""
    centre = (torch.arange(factor, dtype=torch.float64) + 0.5) / factor - 0.5  # in (-0.5, 0.5)
    before = int((centre < 0).sum())
    weight = torch.where(centre < 0, -centre, centre).float()
    return before, weight


def _enlarge_axis(x: Tensor, dim: int, factor: int, length: int) -> Tensor:
    """The first ``length`` pixels of ``x`` enlarged ``factor`` times along ``dim``
    (bilinear, ``align_corners=False``, edges clamped), contiguous: each source pixel's
    ``factor`` outputs are two ``lerp``s of it with its neighbours, written as one block each
    (every output pixel is one separately rounded ``lerp``, whatever the tensor it is cut
    from)."""
    out = x.new_empty((*x.shape[:dim], length, *x.shape[dim + 1 :]))
    _enlarge_into(edge_padded(x, dim), dim, factor, 0, out)
    return out


def edge_padded(x: Tensor, dim: int) -> Tensor:
    """``x`` with its first and last pixel along ``dim`` repeated once before and after: the
    source ``_enlarge_into`` reads (edges clamped)."""
    n = x.shape[dim]
    return torch.cat([x.narrow(dim, 0, 1), x, x.narrow(dim, n - 1, 1)], dim)


def _enlarge_into(padded: Tensor, dim: int, factor: int, start: int, out: Tensor) -> None:
    """Output pixels ``[start, start + out.shape[dim])`` of enlarging a map ``factor`` times
    along ``dim`` into ``out``, from the map ``edge_padded`` (``start`` a multiple of
    ``factor``): the values ``_enlarge_axis`` gives those pixels, bit for bit, so a map can
    be enlarged band by band."""
    if start % factor:
        raise ValueError(f"an enlarged band starts on a multiple of {factor}, got {start}")
    length, offset = out.shape[dim], start // factor
    before, weight = _enlarge_phases(factor)
    weight = weight.to(padded.device).view(factor, *[1] * (padded.dim() - dim - 1))
    whole, tail = divmod(length, factor)
    for first, count, phases in ((0, whole, factor), (whole, 1 if tail else 0, tail)):
        if not count:
            continue
        # source pixels first .. first + count - 1 and their neighbours, a phase axis after dim
        prev, here, after = (padded.narrow(dim, offset + first + i, count).unsqueeze(dim + 1) for i in range(3))
        block = out.narrow(dim, first * factor, count * phases).unflatten(dim, (count, phases))
        for lo, hi, other in ((0, min(before, phases), prev), (before, phases, after)):
            if hi > lo:
                shape = [*here.shape[: dim + 1], hi - lo, *here.shape[dim + 2 :]]
                torch.lerp(here.expand(shape), other.expand(shape), weight[lo:hi],
                           out=block.narrow(dim + 1, lo, hi - lo))


def enlarge_columns(x: Tensor, factor: int, cols: slice) -> Tensor:
    """Columns ``cols`` (``cols.start`` a multiple of ``factor``) of ``x`` ``(..., h, w)``
    enlarged ``factor`` times along its last axis: ``(..., h, cols.stop - cols.start)``,
    contiguous, the values ``_enlarge_axis`` gives them. Made along the rows of the
    transposed map and transposed back: ATen's loops then run over long rows instead of the
    factor's few phases, under half the time on a CPU."""
    flipped = x.transpose(-1, -2)
    out = x.new_empty((*x.shape[:-2], cols.stop - cols.start, x.shape[-2]))
    _enlarge_into(edge_padded(flipped, x.dim() - 2), x.dim() - 2, factor, cols.start, out)
    return out.transpose(-1, -2).contiguous()


def enlarge_rows(columns: Tensor, factor: int, rows: slice, out: Tensor | None = None) -> Tensor:
    """Rows ``rows`` (``rows.start`` a multiple of ``factor``) of ``enlarge(x, factor, size)``,
    given ``columns = edge_padded(enlarge_columns(x, factor, slice(0, size[1])), x.dim() - 2)``
    (``enlarge``'s first pass, made once): the same values, bit for bit, band by band."""
    dim = columns.dim() - 2
    shape = (*columns.shape[:dim], rows.stop - rows.start, columns.shape[-1])
    out = columns.new_empty(shape) if out is None else out
    _enlarge_into(columns, dim, factor, rows.start, out)
    return out


def enlarge(x: Tensor, factor: int, size: tuple[int, int] | None = None) -> Tensor:
    """``(..., h, w)`` -> ``(..., factor h, factor w)``, or its first ``size`` = ``(rows,
    cols)`` (at most that): bilinear enlargement by a whole factor (``align_corners=False``,
    edges clamped), equal to ``F.interpolate(x, scale_factor=factor, mode="bilinear",
    align_corners=False)`` up to float rounding. Contiguous.

    Columns first, on the small map; then rows, where each output row is a ``lerp`` of two
    whole source rows: long contiguous writes, about twice as fast as ATen's bilinear kernel
    for factor 8 on a CPU. Inference only (the ``lerp``s write into a preallocated output).
    """
    height, width = x.shape[-2] * factor, x.shape[-1] * factor
    rows, cols = (height, width) if size is None else size
    if factor < 1 or not (0 < rows <= height and 0 < cols <= width):
        raise ValueError(f"enlarge needs a whole factor >= 1 and a size within {factor} times "
                         f"{tuple(x.shape[-2:])}, got {factor} and {size}")
    if factor == 1:
        return x[..., :rows, :cols].contiguous()
    return _enlarge_axis(enlarge_columns(x, factor, slice(0, cols)), x.dim() - 2, factor, rows)


# How many bytes of one C-channel map a band of ``row_bands`` holds: a few MB, so that the
# band's maps and scratch of a per-pixel pass stay in the CPU's last-level cache.
BAND_BYTES = 4 << 20


def row_bands(maps: Tensor, multiple: int = 1, height: int | None = None) -> list[slice]:
    """Slices of rows of ``(B, C, H, W)`` ``maps`` of about ``BAND_BYTES`` each (a multiple of
    ``multiple`` rows, except the last), in order, covering all H rows (``height`` rows of
    their width when given); on a GPU one band (each band is a dozen kernel launches more,
    and the cache argument is a CPU's)."""
    batch, channels, rows_in_maps, width = maps.shape
    height = rows_in_maps if height is None else height
    if maps.device.type != "cpu":
        return [slice(0, height)]
    per_row = max(1, batch * channels * width * maps.element_size())
    rows = max(multiple, BAND_BYTES // per_row // multiple * multiple)
    return [slice(start, min(start + rows, height)) for start in range(0, height, rows)]


def pool_cells(x: Tensor, stride: int) -> Tensor:
    """The mean of each ``stride x stride`` cell of ``(B, C, H, W)``: ``(B, C, ceil(H/s),
    ceil(W/s))``, a partial cell at the far edges averaging the pixels it has. The values of
    ``F.avg_pool2d(x, stride, ceil_mode=True)`` up to float rounding (sums in another order).

    Rows then columns, each a sum over a reshaped axis: a third less time than ATen's
    pooling kernel on a CPU for a batch of 612 px crops at stride 8 (docs/performance.md),
    and differentiable, so training pools the same way.
    """
    return cell_sums(x, stride).div_(cell_areas(x.shape[-2:], stride, x))


def cell_sums(x: Tensor, stride: int) -> Tensor:
    """The sum of each ``stride x stride`` cell of ``(..., H, W)`` (``pool_cells`` before the
    division): ``(..., ceil(H/s), ceil(W/s))``. Sums are linear, so the cells of a map made
    of parts are the sums of the parts' cells (``magseg.engine.blend.FineStore.crops_and_cells``)."""
    return _cell_sums(_cell_sums(x, -2, stride), -1, stride)


def cell_areas(size: tuple[int, int], stride: int, like: Tensor) -> Tensor:
    """``(ceil(H/s), ceil(W/s))``: how many pixels of a map of ``size`` each cell holds."""
    return _cell_sizes(size[0], stride, like).view(-1, 1) * _cell_sizes(size[1], stride, like)


def _cell_sums(x: Tensor, dim: int, stride: int) -> Tensor:
    """Sums of ``stride`` consecutive entries along ``dim`` (negative), the last group partial."""
    n = x.shape[dim]
    cells, whole = -(-n // stride), n // stride * stride
    groups = x.narrow(dim, 0, whole).unflatten(dim, (n // stride, stride))
    if torch.is_grad_enabled() and x.requires_grad:  # training: autograd takes no out=
        sums = groups.sum(dim)
        if whole == n:
            return sums
        return torch.cat([sums, x.narrow(dim, whole, n - whole).sum(dim, keepdim=True)], dim)
    # Inference: both sums written into one buffer, the same values without the copy of a cat.
    shape = list(x.shape)
    shape[dim] = cells
    out = x.new_empty(shape)
    torch.sum(groups, dim, out=out.narrow(dim, 0, n // stride))
    if whole < n:
        torch.sum(x.narrow(dim, whole, n - whole), dim, keepdim=True, out=out.narrow(dim, cells - 1, 1))
    return out


def _cell_sizes(n: int, stride: int, like: Tensor) -> Tensor:
    """How many pixels each cell of an axis of ``n`` holds: ``stride``, the last one the rest."""
    sizes = torch.full((-(-n // stride),), float(stride), dtype=like.dtype, device=like.device)
    sizes[-1] = n - (len(sizes) - 1) * stride
    return sizes
