"""The fused refine pass (magseg.engine.fused): its exponential, and its values against the
eager passes it replaces (Refiner.weights_from_cells, error_score_and_tops, labels_of).

The engine's invariants with the fused pass on every stage are checked where the eager
path's are, through the ``refine_path`` fixture (tests/test_engine.py, tests/test_margins.py).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.engine import fused
from magseg.engine.certainty import error_score_and_tops
from magseg.engine.refine_step import labels_of
from magseg.engine import refiner_network
from magseg.engine.refiner_network import Refiner
from magseg.engine.resample import (
    ReadSource,
    TensorSource,
    _filter_axis,
    _read_padded,
    axis_weights,
    pool_cells,
    resample_windows,
)
from magseg.engine.stages import segment
from magseg.geometry import Rect

if not fused.available():
    pytest.skip("numba is not installed: the engine runs the eager refine step", allow_module_level=True)

from magseg.engine.fused_rows import exp_row  # noqa: E402  (needs numba)


def _exp(x: np.ndarray) -> np.ndarray:
    mantissa, bits = np.empty_like(x), np.empty(x.shape, np.int32)
    exp_row(x, mantissa, bits)
    return mantissa * bits.view(np.float32)


def test_the_exponential_is_within_two_ulp_of_the_exact_one():
    x = np.concatenate([np.linspace(-87, 88, 200_001, dtype=np.float32),
                        np.float32([0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 1, -1, np.log(2), -np.log(2)])])
    exact = np.exp(x.astype(np.float64))
    got = _exp(x).astype(np.float64)
    assert np.all(np.abs(got - exact) <= 2 * np.spacing(exact.astype(np.float32)).astype(np.float64))
    assert _exp(np.float32([0.0]))[0] == 1.0  # an untrained refiner's weights are fine, bit for bit


def test_the_exponential_saturates_to_finite_normal_floats():
    out = _exp(np.float32([-1e4, -100, -87.3, 88.3, 100, 1e4]))
    assert np.all(np.isfinite(out)) and np.all(out >= np.finfo(np.float32).tiny)
    assert out[0] == out[1] == out[2] and out[3] == out[4] == out[5]
    assert out[0] < 1e-37 and out[-1] > 1e38


def _maps(generator, batch, classes, height, width, sharp=3.0):
    """Smooth-ish distributions: logits at a quarter size, enlarged."""
    small = torch.randn(batch, classes, max(height // 4, 1), max(width // 4, 1), generator=generator) * sharp
    return torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear").softmax(1)


def _both(refiner, fine_window, coarse_window, offsets, crop, with_weights=True):
    """The eager passes and the fused one on crops at ``offsets`` of their windows."""
    height, width = crop
    fine = torch.stack([w[:, dy : dy + height, dx : dx + width] for w, (dy, dx) in zip(fine_window, offsets)])
    coarse = torch.stack([w[:, dy : dy + height, dx : dx + width] for w, (dy, dx) in zip(coarse_window, offsets)])
    s = refiner.context_stride
    fine_cells, coarse_cells = pool_cells(fine_window, s), pool_cells(coarse_window, s)
    weights, total = refiner.weights_from_cells(fine_cells, coarse_cells, fine, coarse, offsets)
    raw, best, coarse_best = error_score_and_tops(weights, coarse, total)
    eager = raw, labels_of(weights, best), labels_of(coarse, coarse_best), weights, total
    step = refiner.fused_from_cells(fine_cells, coarse_cells, fine, coarse, offsets, with_weights)
    return eager, step, fine, coarse


def _assert_labels_agree_off_ties(labels, expected, maps, tolerance=1e-5):
    """Equal labels, except where the two best values are within ``tolerance`` relative."""
    top = maps.topk(2, dim=1).values
    tie = (top[:, 0] - top[:, 1]) <= tolerance * top[:, 0].abs()
    assert torch.equal(labels[~tie], expected[~tie])


@settings(max_examples=40, deadline=None)
@given(classes=st.integers(2, 9), height=st.integers(1, 70), width=st.integers(1, 70),
       margin=st.integers(0, 12), stride=st.sampled_from([2, 3, 4, 8]), gate=st.booleans(),
       seed=st.integers(0, 2**16))
@torch.inference_mode()
def test_the_fused_pass_gives_the_eager_passes_values(classes, height, width, margin, stride, gate, seed):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    refiner = Refiner(classes, channels=8, context_stride=stride, gate=gate).eval()
    torch.nn.init.normal_(refiner.context[-1].weight, std=0.5)
    torch.nn.init.normal_(refiner.context[-1].bias, std=0.5)
    window = (height + 2 * margin, width + 2 * margin)
    fine_window, coarse_window = _maps(generator, 3, classes, *window), _maps(generator, 3, classes, *window)
    offsets = [(margin, margin), (0, 2 * margin), (2 * margin, margin // 2)]  # a crop anywhere in its window
    (raw, refined_labels, coarse_labels, weights, total), step, fine, coarse = _both(
        refiner, fine_window, coarse_window, offsets, (height, width))
    torch.testing.assert_close(step.weights, weights, rtol=2e-6, atol=1e-30)
    torch.testing.assert_close(step.total, total, rtol=2e-6, atol=1e-30)
    torch.testing.assert_close(step.raw, raw, rtol=0, atol=2e-6)
    _assert_labels_agree_off_ties(step.refined_labels, refined_labels, weights)
    assert torch.equal(step.coarse_labels, coarse_labels)  # Y's labels come from the same values


@torch.inference_mode()
def test_without_weights_the_pass_gives_the_same_scores_and_labels():
    generator = torch.Generator().manual_seed(1)
    refiner = Refiner(5, channels=8, context_stride=4).eval()
    torch.nn.init.normal_(refiner.context[-1].weight, std=0.5)
    fine_window, coarse_window = _maps(generator, 2, 5, 40, 36), _maps(generator, 2, 5, 40, 36)
    offsets, crop = [(4, 4), (0, 8)], (32, 28)
    _, with_weights, fine, coarse = _both(refiner, fine_window, coarse_window, offsets, crop)
    _, alone, _, _ = _both(refiner, fine_window, coarse_window, offsets, crop, with_weights=False)
    assert alone.weights is None and alone.total is None
    assert torch.equal(alone.raw, with_weights.raw)
    assert torch.equal(alone.refined_labels, with_weights.refined_labels)
    assert torch.equal(alone.coarse_labels, with_weights.coarse_labels)


@torch.inference_mode()
def test_an_untrained_refiner_gives_the_fine_map_and_the_scores_by_hand():
    # Zero correction: weights = fine exactly, total = its sum; the score is computed here by
    # hand from the top two of each map.
    fine = torch.tensor([[0.6, 0.1], [0.3, 0.2], [0.1, 0.7]])[None, :, None, :].expand(1, 3, 2, 2).contiguous()
    coarse = torch.tensor([[0.5, 0.2], [0.4, 0.2], [0.1, 0.6]])[None, :, None, :].expand(1, 3, 2, 2).contiguous()
    refiner = Refiner(3, channels=4, context_stride=2).eval()
    step = refiner.fused_from_cells(pool_cells(fine, 2), pool_cells(coarse, 2), fine, coarse, [(0, 0)], True)
    assert torch.equal(step.weights, fine)
    cert_r = torch.tensor([0.6 - 0.3, 0.7 - 0.2]) / fine.sum(1)[0, 0]
    cert_y = torch.tensor([0.5 - 0.4, 0.6 - 0.2])
    torch.testing.assert_close(step.raw[0, 0], cert_r * (1 - cert_y), rtol=0, atol=1e-7)
    assert step.refined_labels[0].tolist() == [[0, 2], [0, 2]]
    assert step.coarse_labels[0].tolist() == [[0, 2], [0, 2]]


@torch.inference_mode()
def test_a_nan_pixel_gets_label_c_as_labels_of_gives_it():
    generator = torch.Generator().manual_seed(2)
    fine, coarse = _maps(generator, 1, 4, 8, 8), _maps(generator, 1, 4, 8, 8)
    cells = pool_cells(fine, 4), pool_cells(coarse, 4)  # of the maps before the NaNs
    fine[0, 2, 3, 3] = float("nan")
    coarse[0, 1, 5, 6] = float("nan")
    refiner = Refiner(4, channels=4, context_stride=4).eval()
    step = refiner.fused_from_cells(*cells, fine, coarse, [(0, 0)], True)
    weights, _ = refiner.weights_from_cells(*cells, fine, coarse, [(0, 0)])
    assert step.refined_labels[0, 3, 3] == 4 and step.coarse_labels[0, 5, 6] == 4
    assert torch.equal(step.refined_labels, labels_of(weights))
    assert torch.equal(step.coarse_labels, labels_of(coarse))
    assert (step.refined_labels == 4).sum() == 1 and (step.coarse_labels == 4).sum() == 1


def test_a_numba_that_fails_to_load_leaves_the_eager_path_with_a_warning(monkeypatch):
    # e.g. no writable place for numba's cache: the engine must still run, and say why.
    def broken():
        raise RuntimeError("cannot cache function: no locator available")

    monkeypatch.setattr(fused, "compiled_loops", broken)
    fused.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no locator available"):
            assert not fused.available()
        with torch.inference_mode():
            assert not fused.worth_fusing("cpu", 1 << 30, (612, 612), True)  # cached: no second warning
    finally:
        fused.available.cache_clear()


@torch.inference_mode()
def test_engine_compiled_auto_takes_large_stages_true_all_and_false_none():
    large = (612, 612)
    assert fused.worth_fusing("cpu", fused.FUSED_MIN_PIXELS, large)
    assert not fused.worth_fusing("cpu", fused.FUSED_MIN_PIXELS - 1, large)
    assert not fused.worth_fusing("cpu", 1 << 30, (256, 256))  # crops too small to pay
    assert fused.worth_fusing("cpu", 1, (8, 8), True)
    assert not fused.worth_fusing("cpu", 1 << 30, large, False)
    assert not fused.worth_fusing("cuda", 1 << 30, large, True)
    with torch.inference_mode(False), torch.enable_grad():
        assert not fused.worth_fusing("cpu", 1 << 30, large, True)  # training keeps autograd's passes


@pytest.mark.parametrize("mode", ["true", "false"])
@torch.inference_mode()
def test_engine_compiled_decides_the_path_of_a_whole_run(mode, tiny_segmenter, monkeypatch):
    calls = []
    real = fused.refine_pass
    monkeypatch.setattr(refiner_network, "refine_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = tiny_segmenter.config.override([f"engine.compiled={mode}", "engine.precision=fp32"])
    refiner = Refiner(config.num_classes, 8, 2).eval()
    segment(torch.randn(3, 100, 90), tiny_segmenter.backbone, config.pyramid, refiner=refiner,
            refine=config.refine, engine=config.engine)
    assert config.engine.compiled is (mode == "true")
    assert bool(calls) == (mode == "true")


@settings(max_examples=40, deadline=None)
@given(source=st.tuples(st.integers(3, 40), st.integers(3, 40)), factor=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       extent=st.tuples(st.integers(1, 30), st.integers(1, 30)), stride=st.sampled_from([2, 3, 8]),
       seed=st.integers(0, 2**16))
@torch.inference_mode()
def test_y_on_crops_and_cells_is_the_resampled_window_pooled_and_cut(source, factor, extent, stride, seed):
    generator = torch.Generator().manual_seed(seed)
    y = torch.rand(3, *source, generator=generator)
    size = (source[0] * factor[0], source[1] * factor[1])
    extent = (min(extent[0], size[0]), min(extent[1], size[1]))
    # Windows anywhere in the map (touching its edges too), crops anywhere inside them.
    windows, offsets, crop = [], [], (max(extent[0] // 2, 1), max(extent[1] // 2, 1))
    for _ in range(3):
        top = int(torch.randint(0, size[0] - extent[0] + 1, (1,), generator=generator))
        left = int(torch.randint(0, size[1] - extent[1] + 1, (1,), generator=generator))
        windows.append(Rect(top, left, *extent))
        offsets.append((int(torch.randint(0, extent[0] - crop[0] + 1, (1,), generator=generator)),
                        int(torch.randint(0, extent[1] - crop[1] + 1, (1,), generator=generator))))
    made = fused.enlarged_crops_and_cells(TensorSource(y), size, windows, offsets, crop, stride)
    assert made is not None
    crops, cells = made
    # A map in memory is read where it lies; a source read window by window (a map on
    # disk) gives the same values bit for bit.
    by_windows = fused.enlarged_crops_and_cells(ReadSource(tuple(source), lambda r, c: y[:, r, c].clone()), size,
                                                windows, offsets, crop, stride)
    assert torch.equal(by_windows[0], crops) and torch.equal(by_windows[1], cells)
    # ATen rounds its weights at factor 3 otherwise than this loop: a few float32 steps apart.
    enlarged = F.interpolate(y[None], size=size, mode="bilinear", align_corners=False)[0]
    for i, (window, (dy, dx)) in enumerate(zip(windows, offsets)):
        part = enlarged[:, window.top : window.bottom, window.left : window.right]
        torch.testing.assert_close(crops[i], part[:, dy : dy + crop[0], dx : dx + crop[1]], rtol=0, atol=4e-6)
        torch.testing.assert_close(cells[i], pool_cells(part[None], stride)[0], rtol=0, atol=4e-6)


def test_cell_filter_sums_an_enlargements_cells_by_hand():
    # 4 source pixels doubled to 8, cells of 3: pixel x is (1 - f) src[low] + f src[high]
    # (x = 0 and 7 clamp to the edge pixel). Cell 0 = x 0..2: s0 (1 + .75 + .25), s1 (.25 +
    # .75); cell 1 = x 3..5: s1 (.75 + .25), s2 (.25 + .75 + .75), s3 .25; cell 2 = x 6..7:
    # s2 .25, s3 (.75 + 1). Three taps (cell 1's); cell 2's start pulled back to stay inside.
    low, high, frac = fused.compiled_loops().axis_sources(0, 0, 2, 8, 3)[:3]
    first, weight = fused.cell_filter(low, high, frac, 3, 4)
    assert first.tolist() == [0, 1, 1]
    assert weight.tolist() == [[2, 1, 0], [1, 1.75, 0.25], [0, 0.25, 1.75]]


@torch.inference_mode()
def test_y_on_crops_is_the_same_whatever_window_holds_the_pixel():
    # Two windows overlapping on a crop: the crop's Y from either, bit for bit (a pixel's
    # value comes from its place in the map), with a factor whose weights round (3).
    y = torch.rand(4, 30, 30, generator=torch.Generator().manual_seed(3))
    size, crop = (90, 90), (20, 20)
    a = fused.enlarged_crops_and_cells(TensorSource(y), size, [Rect(10, 10, 40, 40)], [(12, 7)], crop, 4)[0]
    b = fused.enlarged_crops_and_cells(TensorSource(y), size, [Rect(20, 5, 40, 40)], [(2, 12)], crop, 4)[0]
    assert torch.equal(a, b)


def test_y_past_the_maps_edge_or_by_another_factor_takes_the_eager_path():
    y = TensorSource(torch.rand(2, 10, 10))
    assert fused.enlarged_crops_and_cells(y, (20, 20), [Rect(-2, 0, 8, 8)], [(0, 0)], (4, 4), 2) is None
    assert fused.enlarged_crops_and_cells(y, (25, 20), [Rect(0, 0, 8, 8)], [(0, 0)], (4, 4), 2) is None


@settings(max_examples=30, deadline=None)
@given(source=st.tuples(st.integers(8, 60), st.integers(8, 60)), shrink=st.tuples(st.integers(1, 8), st.integers(1, 8)),
       seed=st.integers(0, 2**16))
@torch.inference_mode()
def test_compiled_shrinks_give_the_filters_values_whatever_the_window(source, shrink, seed):
    # Any shrink, integer or not: the tap-by-tap filter's values bit for bit (ATen's, for a
    # whole-factor shrink, to float rounding), and a pixel the same from any window.
    generator = torch.Generator().manual_seed(seed)
    image = TensorSource(torch.randn(3, *source, generator=generator))
    size = (max(source[0] * 2 // (shrink[0] + 1), 1), max(source[1] * 2 // (shrink[1] + 1), 1))
    windows = [Rect(-2, -1, size[0], size[1]), Rect(1, 2, size[0], size[1]), Rect(0, 0, size[0], size[1])]
    compiled = resample_windows(image, size, windows, compiled=True)
    whole = compiled[2]
    for window, got in zip(windows, compiled):
        part = window.intersection(Rect.of_size(size))
        assert torch.equal(got[(slice(None), *part.within(window))], whole[(slice(None), *part.slices)])
    ay, ax = axis_weights(source[0], size[0]), axis_weights(source[1], size[1])
    rows, cols = (int(ay.first[0]), int(ay.first[-1]) + ay.taps), (int(ax.first[0]), int(ax.first[-1]) + ax.taps)
    piece = _read_padded(image, rows, cols)
    taps = _filter_axis(_filter_axis(piece, 1, ay, 0, size[0], rows[0]), 2, ax, 0, size[1], cols[0])
    assert torch.equal(whole, taps)
    torch.testing.assert_close(whole, resample_windows(image, size, windows[2:])[0], rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape, size", [((4, 3, 76, 76), (64, 64)), ((2, 3, 100, 77), (64, 40)),
                                         ((1, 2, 50, 50), (50, 17)), ((1, 1, 9, 300), (2, 31))])
@torch.inference_mode()
def test_shrink_planes_is_atens_antialiased_bilinear(shape, size):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(fused.shrink_planes(x, size), want, rtol=0, atol=2e-6)


@settings(max_examples=60, deadline=None)
@given(cells=st.integers(1, 40), origin=st.integers(0, 4), factor=st.sampled_from([2, 2, 3, 8]),
       start=st.integers(0, 200), width=st.integers(1, 120), seed=st.integers(0, 2**16))
def test_columns_enlarged_give_each_pixels_formula_bit_for_bit(cells, origin, factor, start, width, seed):
    # Doubling writes pairs of columns from shifted rows of the source: every output column
    # is still its own formula (source column floor(u) and the next, clamped to the part).
    source = np.random.default_rng(seed).random((2, 3, cells), dtype=np.float32)
    first = start % (factor * (origin + cells))
    out = np.empty((2, 3, width), np.float32)
    fused.compiled_loops().enlarge_columns(source, first, origin, factor, out)
    u = (first + np.arange(width) + 0.5) / factor - 0.5
    j = np.floor(u)
    low = np.clip(j - origin, 0, cells - 1).astype(int)
    high = np.clip(j + 1 - origin, 0, cells - 1).astype(int)
    a = source[:, :, low]
    assert np.array_equal(out, a + (source[:, :, high] - a) * (u - j).astype(np.float32))


@torch.inference_mode()
def test_a_compiled_shrink_split_into_row_bands_is_the_filter_bit_for_bit():
    # Tall enough for the pool to take it in bands of rows (one window of a stage).
    image = TensorSource(torch.randn(3, 701, 90, generator=torch.Generator().manual_seed(6)))
    size = (300, 37)
    whole = resample_windows(image, size, [Rect(0, 0, *size)], compiled=True)[0]
    ay, ax = axis_weights(701, size[0]), axis_weights(90, size[1])
    rows, cols = (int(ay.first[0]), int(ay.first[-1]) + ay.taps), (int(ax.first[0]), int(ax.first[-1]) + ax.taps)
    piece = _read_padded(image, rows, cols)
    assert torch.equal(whole, _filter_axis(_filter_axis(piece, 1, ay, 0, size[0], rows[0]), 2, ax, 0, size[1], cols[0]))


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 200), width=st.integers(1, 90), row_taps=st.integers(1, 6), col_taps=st.integers(1, 6),
       extra=st.integers(0, 7), seed=st.integers(0, 2**16))
def test_filter_plane_sums_each_axis_tap_by_tap_in_bands(height, width, row_taps, col_taps, extra, seed):
    # Heights across several bands of FILTER_BAND rows (the last one short), a plane cut from
    # a wider one (its rows `stride` apart), any taps: each output pixel the sum over the
    # columns' taps, in order, of the sums over the rows' taps, in order, each product and
    # sum rounded to float32 (numpy's float32 arithmetic is that), bit for bit.
    rng = np.random.default_rng(seed)
    row_first = np.sort(rng.integers(0, 40, height))
    col_first = np.sort(rng.integers(0, 30, width)) + extra
    src_h, src_w = int(row_first[-1]) + row_taps, int(col_first[-1]) + col_taps
    stride = src_w + extra
    plane = rng.standard_normal((src_h, stride), dtype=np.float32)
    row_weight = rng.random((height, row_taps), dtype=np.float32)
    col_weight = rng.random((width, col_taps), dtype=np.float32)
    out = np.full((height, width + 3), np.nan, np.float32)  # rows apart, like a slot in a batch
    fused.filter_plane(plane.reshape(-1), stride, row_first, row_weight, col_first, col_weight, out[:, :width])
    rows = plane[row_first] * row_weight[:, :1]
    for t in range(1, row_taps):
        rows = rows + plane[row_first + t] * row_weight[:, t : t + 1]
    want = rows[:, col_first] * col_weight[:, 0]
    for u in range(1, col_taps):
        want = want + rows[:, col_first + u] * col_weight[:, u]
    assert np.array_equal(out[:, :width], want)
    assert np.isnan(out[:, width:]).all()


@pytest.mark.parametrize("shape, size, multiple", [((2, 3, 764, 764), (639, 639), 32), ((1, 2, 50, 61), (37, 45), 8),
                                                   ((1, 1, 40, 40), (3, 30), 8), ((1, 3, 90, 90), (64, 64), 32)])
@torch.inference_mode()
def test_a_shrink_to_a_multiple_is_padded_as_run_backbone_pads(shape, size, multiple):
    # The reflection F.pad gives, written in the same buffer; where the padding would be as
    # wide as the map (run_backbone replicates then), the shrink is left unpadded.
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    plain = fused.shrink_planes(x, size)
    rows, cols = (-size[0]) % multiple, (-size[1]) % multiple
    want = F.pad(plain, (0, cols, 0, rows), mode="reflect") if rows < size[0] and cols < size[1] else plain
    assert torch.equal(fused.shrink_planes(x, size, multiple), want)


@pytest.mark.parametrize("margin", [0, 6])
def test_the_compiled_run_on_the_thread_pool_is_the_run_in_line(margin, tiny_segmenter, monkeypatch):
    # Two torch threads, so that each_map hands the compiled loops, the windows' reads and
    # shrinks to the pool (whose threads are not in the caller's inference mode); the same
    # result bit for bit as the same run with the pool's work done in line, in order.
    from magseg.engine import opencv

    config = tiny_segmenter.config.override(["engine.compiled=true", "engine.precision=fp32",
                                             f"pyramid.margin={margin}", "engine.batch_size=3"])
    torch.manual_seed(2)
    refiner = Refiner(config.num_classes, 8, 2).eval()
    torch.nn.init.normal_(refiner.context[-1].weight, std=0.5)
    image = torch.randn(3, 150, 170)

    def run():
        return segment(image, tiny_segmenter.backbone, config.pyramid, refiner=refiner, refine=config.refine,
                       engine=config.engine, return_probs=True)

    torch.set_num_threads(2)
    try:
        pooled = run()
        in_line = type("InLine", (), {"map": staticmethod(lambda fn, items: map(fn, items))})()
        monkeypatch.setattr(opencv, "_pool", lambda: in_line)
        ordered = run()
    finally:
        torch.set_num_threads(1)
    assert torch.equal(pooled.labels, ordered.labels)
    assert torch.equal(pooled.probs, ordered.probs)
