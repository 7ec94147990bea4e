"""Top-K selection, point sampling and scatter on small tensors."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.engine.pointrend_reference import pixel_centres, point_sample, scatter_points, top_k_points
from magseg.engine.refine_step import num_points


def test_num_points_count_and_fraction():
    assert num_points(10, 100) == 10
    assert num_points(500, 100) == 100  # a count never exceeds what a crop has
    assert num_points(0.25, 100) == 25
    assert num_points(1.0, 37) == 37
    assert num_points(0, 100) == 0


def test_top_k_picks_exactly_the_k_highest_pixels():
    score = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.7], [0.0, 0.6, 0.5]])
    # highest: 0.9 (index 1), 0.8 (3), 0.7 (5), 0.6 (7)
    assert sorted(top_k_points(score, 3).tolist()) == [1, 3, 5]
    assert sorted(top_k_points(score, 4).tolist()) == [1, 3, 5, 7]
    assert top_k_points(score, 0).tolist() == []


def test_top_k_never_picks_masked_pixels():
    score = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.7], [0.0, 0.6, 0.5]])
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[0, 1] = False  # the best pixel is not this crop's
    assert sorted(top_k_points(score, 3, mask).tolist()) == [3, 5, 7]


def test_top_k_of_a_batch_is_the_top_k_of_each_map():
    score = torch.tensor([[[0.1, 0.9], [0.3, 0.8]], [[0.7, 0.2], [0.6, 0.5]]])
    mask = torch.tensor([[[True, False], [True, True]], [[True, True], [True, True]]])
    picked = top_k_points(score, 2, mask)
    assert picked.shape == (2, 2)
    assert [sorted(row) for row in picked.tolist()] == [[2, 3], [0, 2]]
    assert top_k_points(score, 0).shape == (2, 0)


@settings(max_examples=50, deadline=None)
@given(h=st.integers(1, 30), w=st.integers(1, 30), data=st.data())
def test_top_k_property_selected_beat_the_rest(h, w, data):
    score = torch.rand(h, w)
    k = data.draw(st.integers(0, h * w))
    picked = top_k_points(score, k)
    assert picked.numel() == k and picked.unique().numel() == k
    rest = torch.ones(h * w, dtype=torch.bool)
    rest[picked] = False
    if 0 < k < h * w:
        assert score.view(-1)[picked].min() >= score.view(-1)[rest].max()


def test_pixel_centres_by_hand():
    # 2x4 grid: index 5 is row 1, col 1 -> x = 1.5/4, y = 1.5/2
    pts = pixel_centres(torch.tensor([0, 5, 7]), (2, 4))
    assert torch.allclose(pts, torch.tensor([[0.125, 0.25], [0.375, 0.75], [0.875, 0.75]], dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), seed=st.integers(0, 1000))
def test_point_sample_at_pixel_centres_is_exactly_the_pixel(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(2, 3, h, w, generator=g) ** 8  # values spread over many magnitudes
    index = torch.randint(0, h * w, (2, 17), generator=g)
    sampled = point_sample(feats, pixel_centres(index, (h, w)))
    expected = feats[torch.arange(2)[:, None], :, index // w, index % w].permute(0, 2, 1)
    assert torch.equal(sampled, expected)


def test_point_sample_is_bilinear_between_centres_like_grid_sample():
    feats = torch.rand(2, 3, 9, 11)
    points = torch.rand(2, 40, 2)
    ref = F.grid_sample(feats, (2 * points - 1).unsqueeze(2), align_corners=False, padding_mode="border")
    assert torch.allclose(point_sample(feats, points), ref.squeeze(3), atol=1e-6)
    # Halfway between two horizontal neighbours -> their mean, by hand.
    f = torch.tensor([[[[0.0, 1.0]]]])
    assert point_sample(f, torch.tensor([[[0.5, 0.5]]], dtype=torch.float64)).item() == 0.5


def test_scatter_changes_exactly_those_pixels_and_nothing_else():
    target = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    index = torch.tensor([[1, 2], [3, 0]])
    values = -torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2) - 1
    out = scatter_points(target, index, values)
    changed = out != target
    # batch 0: pixels 1=(0,1) and 2=(1,0) in every channel; batch 1: pixels 3=(1,1), 0=(0,0)
    expected = torch.zeros_like(changed)
    expected[0, :, 0, 1] = expected[0, :, 1, 0] = True
    expected[1, :, 1, 1] = expected[1, :, 0, 0] = True
    assert torch.equal(changed, expected)
    assert out[0, :, 0, 1].tolist() == values[0, :, 0].tolist()
    assert out[1, :, 0, 0].tolist() == values[1, :, 1].tolist()
    assert torch.equal(target, torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2))  # input untouched


def test_scatter_in_place_writes_into_the_target():
    target = torch.zeros(1, 2, 3, 3)
    same = scatter_points(target, torch.tensor([[4]]), torch.tensor([[[1.0], [2.0]]]), inplace=True)
    assert same is target
    assert target[0, :, 1, 1].tolist() == [1.0, 2.0] and target.sum() == 3.0
