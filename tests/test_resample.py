"""Resizing by windows (magseg.engine.resample): hand-worked weights, and every window equal,
bit for bit, to the same pixels of the whole resized image."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.engine.opencv import enlarge_planes
from magseg.engine.pyramid import crop_boxes, crop_windows
from magseg.engine.resample import TensorSource, axis_weights, enlarge, resample_window, resample_windows
from magseg.geometry import Rect


def _whole(x, size):
    return resample_window(TensorSource(x), size, Rect.of_size(size))


def test_hand_worked_shrink_by_one_and_a_half():
    # 3 -> 2: scale 1.5, the triangle is 1.5 source pixels wide each side. Output 0 is centred
    # at source 0.25: weights 1 - 0.25/1.5 on pixel 0 and 1 - 0.75/1.5 on pixel 1 (pixel -1 is
    # outside and dropped), renormalised: 0.625 and 0.375.
    x = torch.tensor([0.0, 8.0, 16.0]).view(1, 1, 3)
    out = _whole(x, (1, 2))
    assert torch.allclose(out, torch.tensor([[[3.0, 13.0]]]))
    aw = axis_weights(3, 2)
    assert aw.step == 0 and aw.first.tolist() == [-1, 1]


def test_hand_worked_shrink_by_four_matches_antialiased_interpolate():
    # 8 -> 2: output 0 reads pixels 0..5 with weights .625 .875 .875 .625 .375 .125 (pixels
    # -2, -1 outside), sum 3.5: (0 + .875 + 1.75 + 1.875 + 1.5 + .625) / 3.5.
    x = torch.arange(8.0).view(1, 1, 8)
    out = _whole(x, (1, 2))
    assert out[0, 0, 0].item() == pytest.approx(6.625 / 3.5, abs=1e-6)
    expected = F.interpolate(x[None], size=(1, 2), mode="bilinear", align_corners=False, antialias=True)[0]
    assert torch.equal(out, expected)


def test_windows_outside_the_grid_are_zero():
    x = torch.rand(2, 10, 10)
    out = resample_window(TensorSource(x), (5, 5), Rect(-2, 3, 4, 4))
    assert (out[:, :2] == 0).all() and (out[:, :, 2:] == 0).all()
    assert torch.equal(out[:, 2:, :2], _whole(x, (5, 5))[:, :2, 3:5])


sizes = st.integers(1, 90)


@settings(max_examples=150, deadline=None)
@given(src=st.tuples(sizes, sizes), dst=st.tuples(sizes, sizes), crop=st.tuples(st.integers(1, 40), st.integers(1, 40)),
       seed=st.integers(0, 2**16))
def test_crop_windows_equal_the_whole_resized_image(src, dst, crop, seed):
    # Any scale, shrinking or enlarging (non-integer factors take the tap-by-tap filter), and
    # crops flush with the far edge that overlap their neighbours: each crop is exactly the
    # whole image's pixels, so the way an image is cut never changes a value.
    x = torch.rand(2, *src, generator=torch.Generator().manual_seed(seed))
    enlarge_by_integer = any(d % s == 0 and d > s for s, d in zip(src, dst))
    whole = _whole(x, dst)
    for window in crop_windows(crop_boxes(dst, crop), crop):
        got = resample_window(TensorSource(x), dst, window)
        top, left, h, w = window.top, window.left, window.height, window.width
        r1, c1 = min(top + h, dst[0]), min(left + w, dst[1])
        if enlarge_by_integer:  # F.interpolate on aligned parts vs the filter: same to float rounding
            assert torch.allclose(got[:, : r1 - top, : c1 - left], whole[:, top:r1, left:c1], atol=1e-5)
        else:
            assert torch.equal(got[:, : r1 - top, : c1 - left], whole[:, top:r1, left:c1])


@settings(max_examples=100, deadline=None)
@given(out=st.tuples(st.integers(2, 60), st.integers(2, 60)), factor=st.sampled_from([2, 3, 4]),
       tiles=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_integer_shrinks_equal_antialiased_interpolate_bit_for_bit(out, factor, tiles, seed):
    # Every pyramid of doubling scales over a scene-sized image: the stage image is exactly
    # F.interpolate's, whichever crops ask for it.
    x = torch.rand(3, out[0] * factor, out[1] * factor, generator=torch.Generator().manual_seed(seed))
    expected = F.interpolate(x[None], size=out, mode="bilinear", align_corners=False, antialias=True)[0]
    crop = (max(1, out[0] // tiles), max(1, out[1] // tiles))
    windows = crop_windows(crop_boxes(out, crop), crop)
    got = resample_windows(TensorSource(x), out, windows)
    for piece, window in zip(got, windows):
        top, left, h, w = window.top, window.left, window.height, window.width
        r1, c1 = min(top + h, out[0]), min(left + w, out[1])
        assert torch.equal(piece[:, : r1 - top, : c1 - left], expected[:, top:r1, left:c1])


@pytest.mark.parametrize("source, crop", [((306, 306), 154), ((306, 306), 306), ((40, 80), 70)])
def test_doubling_enlargements_on_even_offsets_equal_the_whole_enlargement_bit_for_bit(source, crop):
    # The engine's upsampling of Y by two, crop by crop: parts on even offsets above
    # _SAME_KERNEL are the whole map's enlargement (OpenCV's, on a CPU) exactly, and
    # F.interpolate's to float rounding.
    x = torch.rand(7, *source, generator=torch.Generator().manual_seed(0))
    size = (source[0] * 2, source[1] * 2)
    expected = enlarge_planes(x, size)
    torch.testing.assert_close(expected, F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0],
                               rtol=0, atol=1e-6)
    for window in crop_windows(crop_boxes(size, (crop, crop)), (crop, crop)):
        top, left, h, w = window.top, window.left, window.height, window.width
        if top % 2 or left % 2:
            continue
        got = resample_window(TensorSource(x), size, window)
        r1, c1 = min(top + h, size[0]), min(left + w, size[1])
        assert torch.equal(got[:, : r1 - top, : c1 - left], expected[:, top:r1, left:c1])


@settings(max_examples=200, deadline=None)
@given(src=st.tuples(st.integers(2, 70), st.integers(2, 70)), factor=st.sampled_from([2, 3, 4, 8]),
       part=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
       seed=st.integers(0, 2**16))
def test_opencv_enlargement_of_a_part_is_the_whole_enlargement_inside_it(src, factor, part, seed):
    # What makes windows of Y independent of how a stage is cut: an output pixel whose two
    # source neighbours per axis lie in the part comes out of the part's enlargement exactly
    # as out of the whole map's, at every offset and size (vector loop or scalar tail).
    x = torch.rand(3, *src, generator=torch.Generator().manual_seed(seed))
    whole = enlarge_planes(x, (src[0] * factor, src[1] * factor))
    y0, x0 = int(part[0] * (src[0] - 2)), int(part[1] * (src[1] - 2))
    y1, x1 = y0 + 2 + int(part[2] * (src[0] - y0 - 2)), x0 + 2 + int(part[3] * (src[1] - x0 - 2))
    piece = enlarge_planes(x[:, y0:y1, x0:x1], ((y1 - y0) * factor, (x1 - x0) * factor))
    inner = (slice(None), slice(factor, (y1 - y0 - 1) * factor), slice(factor, (x1 - x0 - 1) * factor))
    outer = (slice(None), slice((y0 + 1) * factor, (y1 - 1) * factor), slice((x0 + 1) * factor, (x1 - 1) * factor))
    assert torch.equal(piece[inner], whole[outer])


def test_an_axis_shrunk_to_one_pixel_takes_the_filter():
    # 6 x 2 -> 3 x 1: PyTorch's antialiased kernel gives three equal rows here; the filter
    # gives each row its own neighbourhood. x[r, c] = 2r + c. Row 1 is centred on source row
    # 2.5 and reads rows 1..4 with weights 1/8, 3/8, 3/8, 1/8 (mean row 2.5); the one column
    # is centred on 0.5 and reads columns 0 and 1 equally: 2 * 2.5 + 0.5.
    x = torch.arange(12.0).view(1, 6, 2)
    out = _whole(x, (3, 1))[0, :, 0]
    assert out[1].item() == pytest.approx(5.5, abs=1e-6)
    assert out[0] < out[1] < out[2]


def test_non_integer_scales_stay_close_to_interpolate():
    x = torch.rand(3, 1000, 777, generator=torch.Generator().manual_seed(1))
    expected = F.interpolate(x[None], size=(250, 194), mode="bilinear", align_corners=False, antialias=True)[0]
    assert (_whole(x, (250, 194)) - expected).abs().max() < 1e-5


def test_hand_worked_enlargement_by_four():
    # Output pixel x of a 4x enlargement reads source (x + 0.5) / 4 - 0.5, clamped at the
    # edges: for the row (0, 1), 0 0 0.125 0.375 0.625 0.875 1 1; every row is that row.
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0]])[None, None]
    row = torch.tensor([0.0, 0.0, 0.125, 0.375, 0.625, 0.875, 1.0, 1.0])
    got = enlarge(x, 4)
    assert got.shape == (1, 1, 8, 8) and torch.equal(got[0, 0], row.expand(8, 8))
    assert torch.equal(enlarge(x, 4, (5, 3)), got[..., :5, :3])


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), factor=st.integers(1, 9), seed=st.integers(0, 10_000),
       cut=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_enlarge_is_interpolate_up_to_rounding_and_any_cut_is_a_prefix(h, w, factor, seed, cut):
    # Against float64 interpolation (whose own float32 weights are off by up to ~1e-5 at odd
    # factors): within a few float32 roundings of values in [0, 1]. A cut is the same pixels,
    # bit for bit, made contiguous.
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    whole = enlarge(x, factor)
    exact = F.interpolate(x.double(), scale_factor=factor, mode="bilinear", align_corners=False)
    assert whole.shape == (2, 3, h * factor, w * factor) and whole.dtype == torch.float32
    assert (whole.double() - exact).abs().max() <= 4e-7
    rows, cols = max(1, round(cut[0] * h * factor)), max(1, round(cut[1] * w * factor))
    part = enlarge(x, factor, (rows, cols))
    assert part.is_contiguous() and torch.equal(part, whole[..., :rows, :cols])


def test_enlarge_refuses_a_size_beyond_the_factor():
    with pytest.raises(ValueError, match="whole factor"):
        enlarge(torch.zeros(1, 1, 2, 2), 2, (5, 4))
    with pytest.raises(ValueError, match="whole factor"):
        enlarge(torch.zeros(1, 1, 2, 2), 0)


def test_a_forked_child_enlarges_with_a_pool_of_its_own():
    # A DataLoader worker forked after the parent's OpenCV pool ran inherits the pool but not
    # its threads; work given to it would wait forever. The child must finish, with the values.
    import multiprocessing

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    x = torch.rand(6, 20, 30, generator=torch.Generator().manual_seed(0))
    try:
        expected = enlarge_planes(x, (40, 60))  # the pool runs here first
    finally:
        torch.set_num_threads(threads)

    def child(queue):
        torch.set_num_threads(2)  # the pool, not the one-thread path
        queue.put(bool(torch.equal(enlarge_planes(x, (40, 60)), expected)))

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    process.join(timeout=60)
    if process.is_alive():
        process.kill()
        pytest.fail("the forked child's enlargement hung on the parent's pool")
    assert process.exitcode == 0 and queue.get(timeout=5)


def test_work_on_the_pool_that_asks_the_pool_again_runs_in_line():
    # More maps than pool threads, each asking the pool for more: were the inner maps queued
    # behind the outer ones, every pool thread would wait for ever.
    import threading

    from magseg.engine.opencv import each_map

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = []
        worker = threading.Thread(target=lambda: result.append(
            each_map(lambda i: sum(each_map(lambda j: i * j, 3)), 8)), daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), "each_map inside the pool's work waited for the pool"
        assert result == [[3 * i for i in range(8)]]
    finally:
        torch.set_num_threads(threads)
