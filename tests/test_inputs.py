"""The backbone's inputs (magseg.engine.inputs): a window covering whole source pixels is
resized to the input from those pixels in one filter; any other window through its stage
pixels. Eager and compiled agree to float rounding, the compiled one padded as
``run_backbone`` pads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stage_cuts import window_input

from magseg.engine import fused
from magseg.engine.inputs import backbone_inputs
from magseg.engine.resample import TensorSource, window_pieces
from magseg.geometry import Rect

needs_numba = pytest.mark.skipif(not fused.available(), reason="numba (the compiled loops) is not installed")


def test_one_filter_from_the_source_pixels_by_hand():
    # An 8 x 8 ramp (each pixel its column), a stage of 4 x 4 (factor 2), the whole stage
    # as the window, an input of 2 x 2. Output column 0 sits at source x = 4 * 0.5 - 0.5 =
    # 1.5 with a triangle of half-width 4: columns 0..5 weigh 0.625, 0.875, 0.875, 0.625,
    # 0.375, 0.125 (sum 3.5), so it is (0.875 + 1.75 + 1.875 + 1.5 + 0.625) / 3.5 = 6.625 / 3.5.
    # Through the stage it would be 2.0204 (8 -> 4 gives 0.714, 2.5, 4.5, 6.286; 4 -> 2
    # weighs the first three 0.75, 0.75, 0.25): a wider blur, two filters in a row.
    image = torch.arange(8.0).repeat(1, 8, 1)
    got = backbone_inputs(TensorSource(image), (4, 4), [Rect(0, 0, 4, 4)], (2, 2))
    assert got.shape == (1, 1, 2, 2)
    torch.testing.assert_close(got[0, 0, :, 0], torch.full((2,), 6.625 / 3.5), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[0, 0, :, 1], torch.full((2,), 7 - 6.625 / 3.5), rtol=0, atol=1e-6)


def test_window_pieces_only_where_windows_cover_whole_source_pixels():
    image = torch.randn(2, 12, 18)
    source = TensorSource(image)
    # factors 2 and 3; the third window leaves the grid
    pieces = window_pieces(source, (6, 6), [Rect(1, 2, 3, 4), Rect(3, 0, 3, 4), Rect(4, 0, 3, 4)])
    assert torch.equal(pieces[0], image[:, 2:8, 6:18]) and torch.equal(pieces[1], image[:, 6:12, 0:12])
    assert pieces[2] is None
    assert window_pieces(source, (5, 6), [Rect(0, 0, 2, 2)]) == [None]  # 12 / 5: no whole factor
    assert window_pieces(source, (24, 36), [Rect(0, 0, 2, 2)]) == [None]  # a stage larger than the image
    assert window_pieces(source, (12, 18), [Rect(0, 0, 2, 2)]) == [None]  # the image's own: nothing to save


@pytest.mark.parametrize("seed", range(6))
def test_inputs_equal_the_reference_over_generated_sizes(seed):
    # Windows inside and across the grid's edge, whole and fractional factors, shrinking and
    # growing to the input: each equals stage_cuts.window_input, bit for bit (eager),
    # whatever the other windows of its batch are.
    rng = np.random.default_rng(seed)
    for _ in range(8):
        h, w = (int(v) for v in rng.integers(6, 40, 2))
        f, g = (int(v) for v in rng.integers(1, 4, 2))
        stage = (h, w) if rng.random() < 0.7 else (h + 1, w)  # sometimes no whole factor
        image = torch.randn(3, h * f, w * g)
        wh, ww = (int(v) for v in rng.integers(3, 12, 2))
        windows = [Rect(int(rng.integers(-2, stage[0] - 1)), int(rng.integers(-2, stage[1] - 1)), wh, ww)
                   for _ in range(3)]
        input_size = tuple(int(v) for v in rng.integers(2, 16, 2))
        got = backbone_inputs(TensorSource(image), stage, windows, input_size)
        assert got.shape == (3, 3, *input_size)
        for batch, window in zip(got, windows):
            assert torch.equal(batch, window_input(image, stage, window, input_size)), (stage, window)


@needs_numba
@pytest.mark.parametrize("stage,extent,input_size", [
    ((612, 612), (612, 612), (512, 512)),   # DeepGlobe's stage 0 of a 2448 px scene: 4x, one window
    ((1224, 1224), (764, 764), (639, 639)),  # its stage 1: 2x, grown windows
    ((2448, 2448), (764, 764), (639, 639)),  # its last stage: the window's own pixels
])
def test_compiled_inputs_agree_with_eager_and_are_padded_as_run_backbone_pads(stage, extent, input_size):
    torch.manual_seed(0)
    image = torch.randn(3, 2448, 2448)
    windows = [Rect(0, 0, *extent), Rect(stage[0] - extent[0], stage[1] - extent[1], *extent)]
    with torch.inference_mode():
        eager = backbone_inputs(TensorSource(image), stage, windows, input_size, 32)
        compiled = backbone_inputs(TensorSource(image), stage, windows, input_size, 32, compiled=True,
                                   reading=True)
    assert compiled.shape == eager.shape == (2, 3, *(-(-n // 32) * 32 for n in input_size))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=2e-5)
    inside = compiled[..., : input_size[0], : input_size[1]]
    # run_backbone's own padding of the unpadded input (reflection)
    assert torch.equal(compiled, F.pad(inside, (0, compiled.shape[-1] - input_size[1], 0,
                                                 compiled.shape[-2] - input_size[0]), mode="reflect"))


@needs_numba
def test_the_compiled_shrink_of_views_equals_that_of_their_batch():
    torch.manual_seed(1)
    image = torch.randn(3, 90, 120)
    views = [image[:, 5:65, 10:90], image[:, 30:90, 40:120]]  # rows apart: cut from a larger map
    with torch.inference_mode():
        assert torch.equal(fused.shrink_planes(views, (37, 50), 8),
                           fused.shrink_planes(torch.stack(views), (37, 50), 8))


def test_flat_rows_reads_a_cut_plane_in_place():
    plane = torch.arange(40.0).view(5, 8)
    flat, stride = fused.flat_rows(plane[1:4, 2:7])  # rows 8 apart, from pixel (1, 2) to (3, 6)
    assert stride == 8 and flat.shape == (2 * 8 + 5,) and flat[0] == 10 and flat[-1] == 30
    assert np.shares_memory(flat, plane.numpy())
    for r in range(3):
        assert np.array_equal(flat[r * 8 : r * 8 + 5], plane[1 + r, 2:7].numpy())
    flat, stride = fused.flat_rows(plane.t()[1:3])  # pixels 8 apart: copied
    assert stride == 5 and np.array_equal(flat, plane.t()[1:3].flatten().numpy())
