"""certainty, median_blur and error_map against numbers worked out by hand."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.certainty import certainty, error_map, median_blur


def test_certainty_is_top1_minus_top2_by_hand():
    # pixel a: (0.7, 0.2, 0.1) -> 0.5 ; pixel b: (0.4, 0.4, 0.2) -> 0.0 ; pixel c: (0, 0, 1) -> 1
    probs = torch.tensor([[0.7, 0.4, 0.0], [0.2, 0.4, 0.0], [0.1, 0.2, 1.0]]).view(1, 3, 1, 3)
    assert torch.allclose(certainty(probs), torch.tensor([[[0.5, 0.0, 1.0]]]))


def test_certainty_is_zero_where_the_best_classes_tie():
    # (0.4, 0.4, 0.2): tie at the top; (0, 0, 0): zero padding; (1/3, 1/3, 1/3)
    probs = torch.tensor([[0.4, 0.0, 1 / 3], [0.4, 0.0, 1 / 3], [0.2, 0.0, 1 / 3]]).view(1, 3, 1, 3)
    assert torch.equal(certainty(probs), torch.zeros(1, 1, 3))


@settings(max_examples=30, deadline=None)
@given(classes=st.integers(2, 9), seed=st.integers(0, 10_000), quantise=st.booleans())
def test_certainty_equals_top1_minus_top2_of_topk(classes, seed, quantise):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(2, classes, 5, 6, generator=g) * 3, dim=1)
    if quantise:  # coarse values make ties frequent
        probs = (probs * 4).round() / 4
    top2 = probs.topk(2, dim=1).values
    assert torch.allclose(certainty(probs), top2[:, 0] - top2[:, 1])


def test_certainty_order_of_classes_does_not_matter():
    probs = torch.softmax(torch.randn(2, 5, 4, 6), dim=1)
    shuffled = probs[:, torch.randperm(5)]
    assert torch.equal(certainty(probs), certainty(shuffled))


def test_certainty_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        certainty(torch.ones(1, 1, 2, 2))


def test_median_blur_3x3_by_hand_with_replicated_edges():
    # Worked by hand: e.g. the top-left pixel sees [[1,1,2],[1,1,2],[4,4,5]] -> median 2.
    x = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=torch.float32).view(1, 3, 3) / 255
    expected = torch.tensor([[2, 3, 3], [4, 5, 6], [7, 7, 8]], dtype=torch.float32).view(1, 3, 3) / 255
    assert torch.allclose(median_blur(x, 3), expected, atol=1e-7)


def test_median_blur_removes_an_isolated_spike_and_keeps_a_region():
    x = torch.zeros(1, 7, 7)
    x[0, 1, 1] = 1.0  # lone pixel: removed
    x[0, 3:7, 3:7] = 1.0  # 4x4 block: its interior survives
    out = median_blur(x, 3)
    assert out[0, 1, 1] == 0
    assert torch.all(out[0, 4:7, 4:7] == 1)


def _reference_median(x: np.ndarray, k: int) -> np.ndarray:
    r = k // 2
    padded = np.pad(x, r, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k))
    return np.median(windows.reshape(*x.shape, k * k), axis=-1)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    k=st.sampled_from([1, 3, 5, 7, 11]),
    seed=st.integers(0, 2**16),
)
def test_median_blur_matches_a_sliding_window_reference(h, w, k, seed):
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 256, size=(h, w))  # on the 1/255 grid: quantisation is exact
    out = median_blur(torch.from_numpy(levels / 255).float()[None], k)[0].numpy()
    assert np.allclose(out * 255, _reference_median(levels.astype(float), k), atol=1e-3)


def test_error_map_by_hand_without_blur():
    # R certainties (0.5, 1.0, 0.2); Y certainties (0.0, 0.5, 1.0) -> 0.5*1, 1*0.5, 0.2*0
    refined = torch.tensor([[0.75, 1.0, 0.6], [0.25, 0.0, 0.4]]).view(1, 2, 1, 3)
    coarse = torch.tensor([[0.5, 0.75, 1.0], [0.5, 0.25, 0.0]]).view(1, 2, 1, 3)
    assert torch.allclose(error_map(refined, coarse, kernel=1), torch.tensor([[[0.5, 0.5, 0.0]]]))


def test_error_map_is_blurred_raw_score_plus_tie_break():
    # The coarse map is unsure (0.5/0.5) everywhere; the refined one is sure (cert 1) on a
    # 3x3 block and unsure elsewhere, plus one lone sure pixel at (0, 6).
    coarse = torch.full((1, 2, 7, 7), 0.5)
    refined = torch.full((1, 2, 7, 7), 0.5)
    refined[0, 0, 2:5, 2:5], refined[0, 1, 2:5, 2:5] = 1.0, 0.0
    refined[0, 0, 0, 6], refined[0, 1, 0, 6] = 1.0, 0.0
    q = error_map(refined, coarse, kernel=3)
    raw = certainty(refined) * (1 - certainty(coarse))
    assert torch.allclose(q, median_blur(raw, 3) + 1e-3 * raw)
    # Block centre: all 9 neighbours sure -> 1 (+ tie-break); the lone pixel loses to its
    # neighbours: median 0, only the tie-break 1e-3 remains; block corner: 4 of 9 -> 0.
    assert q[0, 3, 3] == pytest.approx(1.001)
    assert q[0, 0, 6] == pytest.approx(0.001)
    assert q[0, 2, 2] == pytest.approx(0.001)
    # The ranking puts the coherent block first.
    assert q[0, 3, 3] > q[0, 0, 6]
