"""The refine step's cheaper arithmetic: the same results as the plain formulas, by hand on
small tensors and as properties on random ones."""

import pytest
import torch
import torch.nn.functional as F

from magseg.config import RefineConfig
from magseg.engine import resample
from magseg.engine.certainty import error_score, top_error_pixels
from magseg.engine.pyramid import crop_boxes, cut_crops
from magseg.engine.refine_step import labels_of, refine_crops, refine_labels, top_k_owned
from magseg.engine.refiner_network import Refiner
from magseg.engine.resample import _enlarge_axis, edge_padded, enlarge, enlarge_columns, enlarge_rows, pool_cells


def test_pool_cells_by_hand_with_partial_cells():
    # 3 x 5 at stride 2: cells of rows {0, 1}, {2} and of columns {0, 1}, {2, 3}, {4}.
    x = torch.arange(15, dtype=torch.float32).view(1, 1, 3, 5)
    expected = torch.tensor([[(0 + 1 + 5 + 6) / 4, (2 + 3 + 7 + 8) / 4, (4 + 9) / 2],
                             [(10 + 11) / 2, (12 + 13) / 2, 14.0]])
    assert torch.equal(pool_cells(x, 2)[0, 0], expected)


@pytest.mark.parametrize("shape, stride", [((2, 3, 61, 45), 8), ((1, 2, 8, 16), 8), ((1, 1, 5, 7), 3),
                                           ((3, 7, 77, 64), 4), ((1, 1, 3, 3), 4), ((1, 2, 6, 6), 1)])
def test_pool_cells_is_avg_pool_with_ceil_mode(shape, stride):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    expected = F.avg_pool2d(x, stride, ceil_mode=True)
    got = pool_cells(x, stride)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)


def test_pool_cells_gives_the_same_values_with_and_without_autograd():
    # Training pools with autograd (a cat of the partial cells), inference into one buffer:
    # the same sums in the same order.
    x = torch.rand(2, 3, 19, 13)
    with torch.no_grad():
        inferred = pool_cells(x, 4)
    trained = pool_cells(x.clone().requires_grad_(), 4)
    assert torch.equal(inferred, trained.detach())
    trained.sum().backward()  # differentiable


def test_the_refiner_pools_its_inputs_by_cells():
    refiner = Refiner(3, channels=4, context_stride=4)
    fine, coarse = torch.rand(1, 3, 10, 9), torch.rand(1, 3, 10, 9)
    small_fine, small_coarse = refiner._pooled(fine, coarse)
    assert torch.equal(small_fine, pool_cells(fine, 4)) and torch.equal(small_coarse, pool_cells(coarse, 4))


def test_refine_crops_keeps_y_bit_for_bit_where_not_picked_and_takes_r_where_picked():
    # Values whose difference does not round-trip (R - Y + Y != R in float32) show that the
    # select is exact both ways.
    boxes = crop_boxes((6, 6), (6, 6))
    g = torch.Generator().manual_seed(3)
    coarse = torch.rand(1, 3, 6, 6, generator=g) * 1e-3
    refined = torch.rand(1, 3, 6, 6, generator=g).softmax(1)
    out = coarse.clone()
    picked = refine_crops(out, refined, boxes, RefineConfig(points=20, kernel=1))
    assert picked.sum() == 20
    assert torch.equal(out, torch.where(picked[:, None], refined, coarse))


def test_refine_crops_with_a_zero_total_leaves_unpicked_pixels_alone():
    # Weights that all underflowed at a pixel (total 0) give R = 0 there, not 0/0 = NaN, and
    # nothing of it reaches the pixels that keep Y.
    boxes = crop_boxes((2, 2), (2, 2))
    first = torch.tensor([[0.5, 0.5], [0.9, 0.9]])
    coarse = torch.stack([first, 1 - first])[None]
    weights = torch.tensor([[[0.0, 0.8], [0.3, 0.2]], [[0.0, 0.2], [0.3, 0.2]]])[None]
    total = weights.sum(1)
    out = coarse.clone()
    picked = refine_crops(out, weights.clone(), boxes, RefineConfig(points=2, kernel=1), total=total)
    assert picked.sum() == 2 and not out.isnan().any()
    assert picked[0, 0, 1]  # the sure R where Y is unsure; the other pick is a tie at score 0
    assert torch.equal(out[:, :, ~picked[0]], coarse[:, :, ~picked[0]])
    assert torch.equal(out[0, :, 0, 1], torch.tensor([0.8, 0.2]))  # the surest R, picked


@pytest.mark.parametrize("factor, small, size", [(8, (10, 9), (77, 70)), (4, (5, 7), (17, 28)),
                                                 (3, (4, 4), (12, 10)), (8, (1, 3), (8, 20))])
def test_enlarging_band_by_band_gives_the_whole_enlargement_bit_for_bit(factor, small, size):
    x = torch.randn(2, 3, *small, generator=torch.Generator().manual_seed(factor))
    whole = enlarge(x, factor, size)
    columns = edge_padded(_enlarge_axis(x, 3, factor, size[1]), 2)
    for band in (factor, 2 * factor, 5 * factor):
        parts = [enlarge_rows(columns, factor, slice(start, min(start + band, size[0])))
                 for start in range(0, size[0], band)]
        assert torch.equal(torch.cat(parts, dim=2), whole)
    with pytest.raises(ValueError, match="multiple of"):
        enlarge_rows(columns, factor, slice(1, 2))
    # Any run of columns from a multiple of the factor, made on the transposed map: the
    # same values as enlarging the last axis in place.
    for start in range(0, size[1], factor):
        for stop in (start + 1, size[1]):
            assert torch.equal(enlarge_columns(x, factor, slice(start, stop)),
                               _enlarge_axis(x, 3, factor, stop)[..., start:stop])


def test_row_bands_cover_the_rows_in_multiples(monkeypatch):
    maps = torch.zeros(2, 3, 50, 10)  # 240 bytes a row
    monkeypatch.setattr(resample, "BAND_BYTES", 240 * 12)
    assert resample.row_bands(maps) == [slice(s, min(s + 12, 50)) for s in range(0, 50, 12)]
    assert resample.row_bands(maps, multiple=8) == [slice(0, 8), slice(8, 16), slice(16, 24),
                                                    slice(24, 32), slice(32, 40), slice(40, 48),
                                                    slice(48, 50)]
    monkeypatch.setattr(resample, "BAND_BYTES", 1)  # at least one multiple a band
    assert resample.row_bands(maps, multiple=8)[0] == slice(0, 8)


def _probs(batch, classes, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(batch, classes, 5, 5, generator=g) * 3, size=(h, w),
                         mode="bilinear").softmax(1)


@pytest.mark.parametrize("gate", [True, False])
def test_the_refiners_weights_made_band_by_band_equal_the_whole_map_arithmetic(monkeypatch, gate):
    monkeypatch.setattr(resample, "BAND_BYTES", 4 * 5 * 45 * 4 * 8)  # bands of 8 rows
    refiner = Refiner(5, channels=8, context_stride=4, gate=gate)
    torch.nn.init.normal_(refiner.context[-1].weight, std=2.0)
    fine, coarse = _probs(2, 5, 37, 45, 1), _probs(2, 5, 37, 45, 2)
    with torch.no_grad():
        delta, gate_map = refiner._delta_and_gate(fine, coarse, shift=True)  # whole maps
        expected = (delta if gate_map is None else delta * gate_map).exp() * fine
        weights, total = refiner.weights_and_total(fine, coarse)
        assert torch.equal(refiner.weights(fine, coarse), weights)
    # The same operations on the same values; only ATen's vector loops end elsewhere in a band
    # than in a whole map, and their scalar remainder (sigmoid, exp, a + alpha * b) may round
    # the last bit otherwise.
    assert torch.allclose(weights, expected, rtol=1e-6, atol=0)
    assert torch.allclose(total, expected.sum(1), rtol=1e-6, atol=0)
    assert (weights - fine).abs().max() > 1e-3  # the correction did something


def test_the_labels_made_band_by_band_are_those_of_the_whole_maps(monkeypatch):
    monkeypatch.setattr(resample, "BAND_BYTES", 2 * 4 * 16 * 4 * 3)  # bands of 3 rows
    boxes = crop_boxes((16, 32), (16, 16))
    coarse, refined = _probs(2, 4, 16, 16, 3), _probs(2, 4, 16, 16, 4) * 1.7
    total = refined.sum(1)
    refine = RefineConfig(points=0.5, kernel=3)
    labels, picked = refine_labels(coarse, refined, boxes, refine, total=total)
    raw = error_score(refined, coarse, total)
    assert torch.equal(picked, top_k_owned(raw, boxes, refine))
    assert torch.equal(labels, torch.where(picked, labels_of(refined), labels_of(coarse)))
    assert picked.flatten(1).sum(1).tolist() == [128, 128]


@pytest.mark.parametrize("spikes", [0.0, 0.3, 0.6])
def test_top_error_pixels_from_a_first_bracket_far_off_picks_what_full_bisection_picks(spikes):
    # The host's counting starts near the raw map's K-th level; isolated spikes, which the
    # median removes, put the blurred map's K-th level far below it (the bracket widens and
    # moves). The device's counting bisects all 256 levels: the picks must be the same.
    g = torch.Generator().manual_seed(7)
    smooth = F.interpolate(torch.rand(3, 1, 6, 6, generator=g), size=(61, 47), mode="bilinear")[:, 0]
    raw = smooth * 0.4 + (torch.rand(3, 61, 47, generator=g) < spikes) * 0.6
    raw += torch.rand(3, 61, 47, generator=g) * 1e-4  # distinct scores: no tie left to chance
    allowed = torch.rand(3, 61, 47, generator=g) < 0.9
    ks = [50, 1500, 2500]
    host = top_error_pixels(raw, 11, ks, allowed, method="opencv")
    assert torch.equal(host, top_error_pixels(raw, 11, ks, allowed, method="torch"))
    assert host.flatten(1).sum(1).tolist() == ks


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("offsets", [[(0, 0), (5, 3)], [(6, 11), (2, 0)]])
def test_the_refiners_weights_from_cells_and_crops_are_its_windows_weights_cut_to_the_crops(monkeypatch, gate, offsets):
    # Crops at offsets on and off the cell grid (stride 4), bands of 8 rows: the windows'
    # cells and the crops alone give the windows' values on the crops.
    monkeypatch.setattr(resample, "BAND_BYTES", 5 * 30 * 4 * 8)
    refiner = Refiner(5, channels=8, context_stride=4, gate=gate)
    torch.nn.init.normal_(refiner.context[-1].weight, std=2.0)
    fine, coarse = _probs(2, 5, 37, 45, 5), _probs(2, 5, 37, 45, 6)
    crop = (29, 30)
    with torch.no_grad():
        weights, total = refiner.weights_and_total(fine, coarse)
        on_crops, crop_total = refiner.weights_from_cells(
            pool_cells(fine, 4), pool_cells(coarse, 4), cut_crops(fine, offsets, crop),
            cut_crops(coarse, offsets, crop), offsets)
    assert on_crops.shape == (2, 5, *crop) and crop_total.shape == (2, *crop)
    for i, (dy, dx) in enumerate(offsets):
        # Bit for bit but for the last bit of ATen's scalar remainder (as above).
        window = (i, slice(None), slice(dy, dy + crop[0]), slice(dx, dx + crop[1]))
        assert torch.allclose(on_crops[i], weights[window], rtol=1e-6, atol=0)
        assert torch.allclose(crop_total[i], total[(i, *window[2:])], rtol=1e-6, atol=0)
    assert (on_crops - cut_crops(fine, offsets, crop)).abs().max() > 1e-3  # the correction acted
