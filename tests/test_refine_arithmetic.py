"""The refine step's cheaper arithmetic: the same results as the plain formulas, by hand on
small tensors and as properties on random ones."""

import pytest
import torch
import torch.nn.functional as F

from magseg.config import RefineConfig
from magseg.engine.pyramid import crop_boxes
from magseg.engine.refine_step import refine_crops
from magseg.engine.refiner_network import Refiner, pool_cells


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
