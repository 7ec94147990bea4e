"""The engine's compiled loops (``magseg.engine.fused`` explains them), in a module of their
own so that numba is imported only where a stage uses them, and so that numba's on-disk
cache can key them (it does not cache closures).

Inner loops index slices from 0: numba then knows an index is not negative, adds no
wrap-around test, and LLVM vectorises the loop."""

import numpy as np
from numba import njit

f32 = np.float32
log2e, ln2_hi, ln2_lo = f32(1.4426950408889634), f32(0.693359375), f32(-2.12194440e-4)
lowest, highest, tiny = f32(-87.3), f32(88.3), f32(np.finfo(np.float32).tiny)
one, half = f32(1.0), f32(0.5)


@njit(nogil=True, cache=True, inline="always")
def exp_row(x: np.ndarray, mantissa: np.ndarray, power: np.ndarray) -> None:
    """``exp(x) = mantissa * power.view(float32)``, both written: Cephes' ``expf``,
    inputs clamped to where both factors are normal floats, in loops LLVM vectorises."""
    for i in range(x.shape[0]):
        v = min(max(x[i], lowest), highest)
        k = np.floor(v * log2e + half)
        r = v - k * ln2_hi - k * ln2_lo
        p = f32(1.9875691500e-4)
        p = p * r + f32(1.3981999507e-3)
        p = p * r + f32(8.3334519073e-3)
        p = p * r + f32(4.1665795894e-2)
        p = p * r + f32(1.6666665459e-1)
        p = p * r + f32(5.0000001201e-1)
        mantissa[i] = p * r * r + r + one
        power[i] = (np.int32(k) + np.int32(127)) << 23


@njit(nogil=True, cache=True)
def axis_sources(first, origin, factor, width, last):
    """How pixels ``first .. first + width`` along one axis (rows or columns) of a map
    enlarged ``factor`` times (bilinear on pixel centres, edges clamped) read a part of it,
    the map's pixels ``origin ..`` along that axis with last index ``last`` (all it has, or a
    part reaching one pixel past those read, so that its clamping is the map's): ``(low,
    high, frac, a, pairs)``, each output pixel's two sources in the part and the weight of
    the second, from its place in the whole map (so a part gives the whole map's values
    there); with a doubling, the pixels ``a .. a + 2 pairs`` between the clamped edges,
    which ``enlarge_row`` writes in pairs along columns. Every enlargement of the compiled
    loops takes its sources from here."""
    low = np.empty(width, np.int64)
    high = np.empty(width, np.int64)
    frac = np.empty(width, np.float32)
    for x in range(width):
        u = (first + x + 0.5) / factor - 0.5
        j = int(np.floor(u))
        frac[x] = f32(u - j)
        low[x], high[x] = min(max(j - origin, 0), last), min(max(j + 1 - origin, 0), last)
    # Doubling (Y from one stage to the next): between the clamped edges, output columns
    # a + 2q and a + 2q + 1 mix source columns low[a] + q and low[a + 1] + q, each with its
    # one weight (exact in binary), written as pairs: a loop LLVM vectorises, where the
    # indexed one reads one value at a time (8 times faster on an AVX512 CPU).
    a, pairs = 0, 0
    if factor == 2:
        while a < width and low[a] + 1 != high[a]:
            a += 1
        b = width
        while b > a and low[b - 1] + 1 != high[b - 1]:
            b -= 1
        pairs = (b - a) // 2
    return low, high, frac, a, pairs


@njit(nogil=True, cache=True, inline="always")
def enlarge_row(src, dst, low, high, frac, a, pairs):
    """One row ``src`` of a part enlarged along its columns into ``dst``, as
    ``axis_sources`` says."""
    for x in range(a):
        v = src[low[x]]
        dst[x] = v + (src[high[x]] - v) * frac[x]
    if pairs:
        even, odd, pair = src[low[a] :], src[low[a + 1] :], dst[a : a + 2 * pairs]
        f0, f1 = frac[a], frac[a + 1]
        for q in range(pairs):
            v, w = even[q], odd[q]
            pair[2 * q] = v + (even[q + 1] - v) * f0
            pair[2 * q + 1] = w + (odd[q + 1] - w) * f1
    for x in range(a + 2 * pairs, dst.shape[0]):
        v = src[low[x]]
        dst[x] = v + (src[high[x]] - v) * frac[x]


@njit(nogil=True, cache=True)
def enlarge_columns(cells, first, origin, factor, out):
    """Columns ``first ..`` of a map enlarged ``factor`` times along its columns into
    ``out`` ``(K, h, w)``, from ``cells`` ``(K, h, wc)``, the map's columns ``origin ..``
    (``axis_sources``)."""
    channels, height, width = out.shape
    low, high, frac, a, pairs = axis_sources(first, origin, factor, width, cells.shape[2] - 1)
    for c in range(channels):
        for r in range(height):
            enlarge_row(cells[c, r], out[c, r], low, high, frac, a, pairs)


@njit(nogil=True, cache=True, inline="always")
def restart(best, second, total, label):
    """Empty running top two, sum and argmax for a row of pixels."""
    for x in range(best.shape[0]):
        best[x] = -np.inf
        second[x] = -np.inf
        total[x] = 0
        label[x] = 0


@njit(nogil=True, cache=True, inline="always")
def take(row, c, best, second, total, label):
    """Channel ``c``'s ``row`` into each pixel's running top two (a tie at the top gives
    best == second), sum and first argmax (``label``: int32).

    The argmax is a select written back, not a store under an ``if``: LLVM vectorises the
    conditional store only where the CPU has masked stores of its width, which AVX2 lacks
    for bytes (and has for 32 bits only a slow one); a 32-bit select and an unconditional
    store run at vector speed everywhere. On an AVX2-only CPU, with the uint8 ``if``,
    ``refine_rows`` took 2.3 times as long on a 612 px crop of random classes (27.0 against
    11.7 ms, one thread; docs/performance.md#compiled-loops)."""
    label_c = np.int32(c)
    for x in range(row.shape[0]):
        v = row[x]
        total[x] += v
        b = best[x]
        second[x] = max(second[x], min(b, v))
        label[x] = label_c if v > b else label[x]
        best[x] = max(b, v)


@njit(nogil=True, cache=True)
def refine_rows(columns, fine, coarse, cell_low, cell_high, cell_frac, gated, w0, w1, w2, bias, start, stop,
                raw, refined_labels, coarse_labels, weights, total):
    """Rows ``start .. stop`` of one crop's refine step (``magseg.engine.fused.refine_pass``).

    columns: ``(C or 2C, hc, cw)`` the refiner's shifted correction (and, ``gated``, the
    pooled fine map) enlarged along the columns over the crop; crop row y mixes its rows
    ``cell_low[y]`` and ``cell_high[y]`` by ``cell_frac[y]`` (``axis_sources`` of the crop's
    rows in its window). fine, coarse: ``(C, h, cw)``. w0, w1, w2, bias:
    the gate's logit (``RefinerGate.coefficients``). Writes raw (the error score),
    refined_labels, coarse_labels ``(h, cw)``, and weights ``(C, h, cw)`` with their sum
    total ``(h, cw)`` unless weights is empty."""
    classes, _, width = fine.shape
    delta = np.empty((classes, width), np.float32)
    best = np.empty(width, np.float32)
    second = np.empty(width, np.float32)
    acc = np.empty(width, np.float32)
    overlap = np.empty(width, np.float32)
    gate = np.empty(width, np.float32)
    mantissa = np.empty(width, np.float32)
    bits = np.empty(width, np.int32)
    power = bits.view(np.float32)
    label = np.empty(width, np.int32)  # int32, not uint8: ``take`` says why
    for y in range(start, stop):
        j0, j1, f = cell_low[y], cell_high[y], cell_frac[y]  # the row's two cell rows
        for c in range(classes):
            a0, a1 = columns[c, j0], columns[c, j1]
            for x in range(width):
                delta[c, x] = a0[x] + (a1[x] - a0[x]) * f
        if gated:
            restart(best, second, acc, label)
            for x in range(width):
                overlap[x] = 0
            for c in range(classes):
                s0, s1, row, other = columns[classes + c, j0], columns[classes + c, j1], fine[c, y], coarse[c, y]
                for x in range(width):
                    smooth = s0[x] + (s1[x] - s0[x]) * f
                    v = row[x]
                    low = min(best[x], v)
                    second[x] = max(second[x], low)
                    best[x] = max(best[x], v)
                    acc[x] += abs(v - other[x])
                    overlap[x] += min(v, smooth)
            # The logit summed in RefinerGate.from_maps's order; a cue of weight 0 is left out
            # as there (a NaN in it stays out of the gate).
            for x in range(width):
                gate[x] = w0 * (best[x] - second[x]) + bias
            if w1 != 0:
                for x in range(width):
                    gate[x] += w1 * (half * acc[x])
            if w2 != 0:
                for x in range(width):
                    gate[x] += w2 * (one - overlap[x])
            for x in range(width):
                gate[x] = -gate[x]
            exp_row(gate, mantissa, bits)
            for x in range(width):
                gate[x] = one / (one + mantissa[x] * power[x])
            for c in range(classes):
                for x in range(width):
                    delta[c, x] *= gate[x]
        # The weights, their sum and top two, R's argmax. Three loops over the row, not one:
        # LLVM does not vectorise a loop that also keeps four running arrays, so the fused
        # loop (exp in registers through a bitcast) took 13.1 against 11.4 ms on a 612 px crop
        # of 7 classes (one thread, AVX2), and two classes per ``take`` gained nothing.
        restart(best, second, acc, label)
        for c in range(classes):
            exp_row(delta[c], mantissa, bits)
            row, weighted = fine[c, y], delta[c]
            for x in range(width):
                weighted[x] = mantissa[x] * power[x] * row[x]
            take(weighted, c, best, second, acc, label)
        if weights.shape[0]:
            for c in range(classes):
                out = weights[c, y]
                for x in range(width):
                    out[x] = delta[c, x]
            for x in range(width):
                total[y, x] = acc[x]
        for x in range(width):
            gate[x] = (best[x] - second[x]) / max(acc[x], tiny)  # cert(R); 0 where total is 0
            refined_labels[y, x] = label[x] if acc[x] == acc[x] else classes
        # Y's top two and argmax.
        restart(best, second, acc, label)
        for c in range(classes):
            take(coarse[c, y], c, best, second, acc, label)
        for x in range(width):
            raw[y, x] = gate[x] * (one - (best[x] - second[x]))
            coarse_labels[y, x] = label[x] if acc[x] == acc[x] else classes


@njit(nogil=True, cache=True, inline="always")
def emit_row(row, y, height, crop_top, crop_left, crop, stride, summed, sums):
    """A window's row ``y`` ``(C, ew)`` is done: its crop part into ``crop`` (``(C, ch, cw)``
    at ``(crop_top, crop_left)``), and into the running sum of its cell row, ``summed``,
    which is written to ``sums`` ``(C, ceil(eh/stride), ceil(ew/stride))`` and cleared
    when the cell row ends."""
    classes, width = row.shape
    crop_height, crop_width = crop.shape[1], crop.shape[2]
    for c in range(classes):
        values, total = row[c], summed[c]
        for x in range(width):
            total[x] += values[x]
        if crop_top <= y < crop_top + crop_height:
            out, part = crop[c, y - crop_top], values[crop_left : crop_left + crop_width]
            for x in range(crop_width):
                out[x] = part[x]
    if (y + 1) % stride == 0 or y == height - 1:
        for c in range(classes):
            total = summed[c]
            for j in range(sums.shape[2]):
                cell = total[j * stride : min((j + 1) * stride, width)]
                acc = f32(0)
                for x in range(cell.shape[0]):
                    acc += cell[x]
                sums[c, y // stride, j] = acc
            for x in range(width):
                total[x] = 0


@njit(nogil=True, cache=True)
def enlarged_rows(part, first, origin, factor, low, high, frac, out):
    """A part of a map enlarged by bilinear interpolation, one row at a time, into ``out``
    ``(C, h, w)`` (a crop): its row y mixes rows ``low[y]`` and ``high[y]`` of ``part``
    ``(C, hp, wp)`` (the map's rows and columns it reads; its columns from ``origin`` on) by
    ``frac[y]``, each of them enlarged ``factor`` times along its columns from map column
    ``first`` over ``w`` once, when first read (the two last, in a ring: rows come in order).
    No array of the enlarged map is made."""
    classes, height, width = out.shape
    columns, others, weights, start, pairs = axis_sources(first, origin, factor, width, part.shape[2] - 1)
    ring = np.empty((2, classes, width), np.float32)
    held = np.full(2, -1, np.int64)
    for y in range(height):
        for r in (low[y], high[y]):
            if held[r & 1] != r:
                for c in range(classes):
                    enlarge_row(part[c, r], ring[r & 1, c], columns, others, weights, start, pairs)
                held[r & 1] = r
        f, above, below = frac[y], ring[low[y] & 1], ring[high[y] & 1]
        for c in range(classes):
            top, bottom, line = above[c], below[c], out[c, y]
            for x in range(width):
                line[x] = top[x] + (bottom[x] - top[x]) * f


@njit(nogil=True, cache=True)
def blend_window(own, theirs, rects, origins, row_weights, col_weights, crop_top, crop_left, crop, stride, sums):
    """A crop's blended fine view (``magseg.engine.blend``), one window row at a time: the
    crop's part into ``crop`` and the view's cell sums over the whole window into ``sums``.

    own: ``(C, eh, ew)`` the crop's answer over its window. For each other answer k reaching
    the window: ``theirs[k]`` ``(C, h, w)`` holds it from ``origins[k]`` on (row, column)
    over its part ``rects[k]`` ``(top, left, bottom, right)`` of the window, and its blend
    weight's two axes there are ``row_weights[k]``, ``col_weights[k]``; every array is
    C-contiguous (the loops over a row then run on vectors). crop: ``(C, ch, cw)`` at
    ``(crop_top, crop_left)`` in the window. sums: ``(C, ceil(eh/stride), ceil(ew/stride))``.
    The crop's values are ``FineStore.crops``' bit for bit (the same products, added in the
    same order)."""
    classes, height, width = own.shape
    row = np.empty((classes, width), np.float32)
    summed = np.zeros((classes, width), np.float32)
    for y in range(height):
        for c in range(classes):
            mine, blended = own[c, y], row[c]
            for x in range(width):
                blended[x] = mine[x]
        for k in range(len(theirs)):  # the answers in the blend's order, each once a row
            top, left, bottom, right = rects[k, 0], rects[k, 1], rects[k, 2], rects[k, 3]
            if top <= y < bottom:
                answer, wy, wx = theirs[k], row_weights[k][y - top], col_weights[k]
                start = origins[k, 1]
                for c in range(classes):
                    other = answer[c, origins[k, 0] + y - top, start : start + right - left]
                    mine, blended = own[c, y, left:right], row[c, left:right]
                    for x in range(right - left):
                        blended[x] += wy * wx[x] * (other[x] - mine[x])
        emit_row(row, y, height, crop_top, crop_left, crop, stride, summed, sums)


@njit(nogil=True, cache=True, inline="always")
def filter_row(src, start, row_stride, weight, line):
    """``line[x] = sum_t weight[t] * src[start + t * row_stride + x]``, tap by tap in order,
    each product and sum rounded on its own: one output row of a filter along the rows."""
    n = line.shape[0]
    # Each tap's row as a slice: the loops then index from 0, which LLVM vectorises.
    source, w = src[start : start + n], weight[0]
    for x in range(n):
        line[x] = source[x] * w
    for t in range(1, weight.shape[0]):
        start += row_stride
        source, w = src[start : start + n], weight[t]
        for x in range(n):
            line[x] += source[x] * w


@njit(nogil=True, cache=True)
def filter_rows(src, row_stride, lo, row_first, row_weight, out):
    """One axis of a separable filter, along the rows: ``out[i, x] = sum_t row_weight[i, t]
    * src[(row_first[i] + t) * row_stride + lo + x]``, the sum tap by tap in order, each
    product and sum rounded on its own (no fused multiply-add), so that the values are
    ``magseg.engine.resample``'s tap-by-tap filter's, bit for bit. Each output row is a
    run of whole source rows, a loop LLVM vectorises; ``fused.filter_plane`` runs the other
    axis through it too, on the transposed band.

    src: a plane's rows ``row_stride`` apart in one flat run (a map cut from a wider one is
    read in place, from column ``lo``); out: ``(H, n)``, rows contiguous; row_first ``(H,)``,
    row_weight ``(H, taps)``."""
    for i in range(out.shape[0]):
        filter_row(src, row_first[i] * row_stride + lo, row_stride, row_weight[i], out[i])


@njit(nogil=True, cache=True)
def filter_axes(src, row_stride, row_first, row_weight, col_first, col_weight, out):
    """A separable filter with a small output, rows then columns: ``out[c, i, j] = sum_u
    col_weight[j, u] * (sum_t row_weight[i, t] * src[c, (row_first[i] + t) * row_stride +
    col_first[j] + u])``, every sum tap by tap in order (no fused multiply-add).

    Each output row's filter along the rows is a loop over whole source rows (vectorised);
    along the columns, pixel by pixel, which is cheap for few output pixels (a window's
    cells: ``fused.enlarged_crops_and_cells``) and costly for many (a shrink's: those go
    through ``fused.filter_plane``). src: ``(C, n)``, each plane's rows ``row_stride`` apart
    in one flat run (a map's part is read in place: only the columns the taps reach are
    filtered); out: ``(C, H, W)``; row_first ``(H,)``, row_weight ``(H, taps)``, col_first
    ``(W,)`` ascending, col_weight ``(W, taps)``."""
    classes, height, width = out.shape
    col_taps = col_weight.shape[1]
    lo = col_first[0]
    filtered = np.empty(col_first[width - 1] + col_taps - lo, np.float32)
    for c in range(classes):
        for i in range(height):
            filter_row(src[c], row_first[i] * row_stride + lo, row_stride, row_weight[i], filtered)
            row = out[c, i]
            for j in range(width):
                taps, weights = filtered[col_first[j] - lo : col_first[j] - lo + col_taps], col_weight[j]
                total = taps[0] * weights[0]
                for u in range(1, col_taps):
                    total += taps[u] * weights[u]
                row[j] = total
