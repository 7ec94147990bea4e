"""certainty, median_blur, error_map and top_error_pixels against numbers worked out by hand
and against plain references."""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from magseg.engine.certainty import (
    _levels,
    certainty,
    error_map,
    error_score,
    error_score_and_tops,
    median_blur,
    top2,
    top_error_pixels,
)


def test_certainty_is_top1_minus_top2_by_hand():
    # pixel a: (0.7, 0.2, 0.1) -> 0.5 ; pixel b: (0.4, 0.4, 0.2) -> 0.0 ; pixel c: (0, 0, 1) -> 1
    probs = torch.tensor([[0.7, 0.4, 0.0], [0.2, 0.4, 0.0], [0.1, 0.2, 1.0]]).view(1, 3, 1, 3)
    assert torch.allclose(certainty(probs), torch.tensor([[[0.5, 0.0, 1.0]]]))


def test_certainty_is_zero_where_the_best_classes_tie():
    # (0.4, 0.4, 0.2): tie at the top; (0, 0, 0): zero padding; (1/3, 1/3, 1/3)
    probs = torch.tensor([[0.4, 0.0, 1 / 3], [0.4, 0.0, 1 / 3], [0.2, 0.0, 1 / 3]]).view(1, 3, 1, 3)
    assert torch.equal(certainty(probs), torch.zeros(1, 1, 3))


def test_top2_by_hand():
    # (0.2, 0.7, 0.1) -> 0.7, 0.2 ; (0.4, 0.2, 0.4) -> 0.4, 0.4 (a tie at the top) ; two classes
    probs = torch.tensor([[0.2, 0.4], [0.7, 0.2], [0.1, 0.4]]).view(1, 3, 1, 2)
    best, second = top2(probs)
    assert torch.equal(best, torch.tensor([[[0.7, 0.4]]])) and torch.equal(second, torch.tensor([[[0.2, 0.4]]]))
    best, second = top2(probs[:, 1:])
    assert torch.equal(best, torch.tensor([[[0.7, 0.4]]])) and torch.equal(second, torch.tensor([[[0.1, 0.2]]]))
    with pytest.raises(ValueError, match="2 classes"):
        top2(probs[:, :1])


def test_error_score_of_weights_over_their_total_by_hand():
    # R = (0.6, 0.3, 0.1) given as weights (1.2, 0.6, 0.2) with total 2: cert(R) = 0.3;
    # Y = (0.5, 0.4, 0.1): 1 - cert(Y) = 0.9; the score 0.27 either way.
    refined = torch.tensor([1.2, 0.6, 0.2]).view(1, 3, 1, 1)
    coarse = torch.tensor([0.5, 0.4, 0.1]).view(1, 3, 1, 1)
    by_weights = error_score(refined, coarse, torch.full((1, 1, 1), 2.0))
    assert torch.allclose(by_weights, torch.tensor([[[0.27]]]))
    assert torch.allclose(by_weights, error_score(refined / 2, coarse))
    raw, best, coarse_best = error_score_and_tops(refined, coarse, torch.full((1, 1, 1), 2.0))
    assert torch.equal(raw, by_weights)
    assert torch.equal(best, torch.tensor([[[1.2]]])) and torch.equal(coarse_best, torch.tensor([[[0.5]]]))


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


def _distinct_scores(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Scores in [0, scale) with spatial structure (a smooth field plus noise, ranked) and no
    two equal, so the top-K by (blurred level, score) is unique."""
    field = rng.random((shape[0], 3, 3))
    smooth = torch.nn.functional.interpolate(torch.from_numpy(field)[:, None], size=shape[1:], mode="bilinear")
    noisy = smooth[:, 0].numpy() + 0.3 * rng.random(shape)
    ranks = noisy.reshape(shape[0], -1).argsort(1).argsort(1).reshape(shape)
    return ((ranks + 0.5) / ranks[0].size * scale).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    maps=st.integers(1, 3),
    h=st.integers(1, 30),
    w=st.integers(1, 30),
    kernel=st.sampled_from([1, 3, 5, 11, 17]),  # 17 * 17 > 255: the wider count type
    scale=st.sampled_from([1.0, 0.3, 0.001]),  # 0.001: every level is 0, all pixels tie
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["opencv", "torch"]),
)
# 17 x 15 = 255 pixels: scores (rank + 0.5) / 255 sit on half-way points between levels.
@example(maps=1, h=17, w=15, kernel=5, scale=1.0, masked=False, seed=1, method="opencv")
@example(maps=1, h=17, w=15, kernel=5, scale=1.0, masked=False, seed=1, method="torch")
def test_top_error_pixels_is_the_top_k_by_blurred_level_then_score(maps, h, w, kernel, scale, masked, seed,
                                                                   method):
    # Both ways of counting, the host's (OpenCV) and the device's (torch), on CPU tensors.
    rng = np.random.default_rng(seed)
    raw = _distinct_scores(rng, (maps, h, w), scale)
    allowed = rng.random((maps, h, w)) < 0.7 if masked else np.ones((maps, h, w), bool)
    ks = [int(rng.integers(0, allowed[b].sum() + 1)) for b in range(maps)]
    picked = top_error_pixels(torch.from_numpy(raw), kernel, ks, torch.from_numpy(allowed) if masked else None,
                              method=method)
    assert picked.dtype == torch.bool and picked.shape == (maps, h, w)
    for b in range(maps):
        # Reference: the blurred 8-bit levels (quantised in float32, as median_blur does: in
        # float64, a score at a level's half-way point can round the other way), then a plain
        # sort by (level, score) over the allowed pixels.
        levels = _reference_median(np.round(raw[b] * np.float32(255)).astype(np.float64), kernel)
        candidates = np.flatnonzero(allowed[b])
        order = np.lexsort((raw[b].ravel()[candidates], levels.ravel()[candidates]))
        expected = np.zeros(h * w, bool)
        expected[candidates[order[len(order) - ks[b]:]]] = True
        assert np.array_equal(picked[b].numpy().ravel(), expected)


def test_the_counting_quantises_like_median_blur_at_every_half_level():
    # top_error_pixels counts on 8-bit levels of its own making (OpenCV); they must be
    # median_blur's (torch), also for scores a few ulps either side of every half-way point,
    # where rounding in float64 instead of float32 would already differ.
    scores = []
    for level in range(256):
        value = np.float32((level + 0.5) / 255)
        for _ in range(8):
            value = np.nextafter(value, np.float32(0))
        for _ in range(17):
            scores.append(min(value, np.float32(1)))
            value = np.nextafter(value, np.float32(1))
    scores = np.array(scores + [0.0, 1.0], dtype=np.float32)[None]  # (1, N)
    want = (median_blur(torch.from_numpy(scores)[None], 1)[0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(_levels(scores), want)
    # The torch path's levels, the same way: the 255-pixel map of one score per level
    # half-way point, K = 1 picks the pixel of the highest level, and every count agrees.
    for t in (0, 1, 127, 128, 254, 255):
        on_host = top_error_pixels(torch.from_numpy(scores)[None], 1, [int((want >= t).sum())], method="opencv")
        on_device = top_error_pixels(torch.from_numpy(scores)[None], 1, [int((want >= t).sum())], method="torch")
        assert torch.equal(on_host, on_device)
    assert not np.array_equal(np.round(scores.astype(np.float64) * 255).astype(np.uint8), want)


def test_top_error_pixels_agrees_with_the_top_k_of_error_map():
    # The engine's selection against the definition: top-K of error_map (median blur plus the
    # tie-break), on crops of probabilities where no two scores come close.
    g = torch.Generator().manual_seed(3)
    refined = torch.rand(2, 4, 24, 24, generator=g).softmax(1)
    coarse = torch.rand(2, 4, 24, 24, generator=g).softmax(1)
    k = 200
    picked = top_error_pixels(error_score(refined, coarse), 5, [k, k])
    index = error_map(refined, coarse, 5).flatten(1).topk(k, dim=1).indices
    expected = torch.zeros(2, 24 * 24, dtype=torch.bool).scatter_(1, index, True).view(2, 24, 24)
    assert torch.equal(picked, expected)


@pytest.mark.parametrize("method", ["opencv", "torch"])
def test_top_error_pixels_prefers_a_coherent_region_to_a_lone_pixel_by_hand(method):
    # A 3x3 block of 0.9 (0.95 at its centre) and one lone pixel of 1.0 in a map of 0.2.
    # 3x3 medians: 0.2 at the lone pixel and the block's corners, 0.9 at the centre and the
    # middles of the block's sides, which the centre's own score then wins. So with K = 1
    # the centre wins, although the lone pixel's own score is higher.
    raw = torch.full((1, 7, 7), 0.2)
    raw[0, 2:5, 2:5] = 0.9
    raw[0, 3, 3] = 0.95
    raw[0, 0, 6] = 1.0
    picked = top_error_pixels(raw, 3, [1], method=method)
    assert picked.sum() == 1 and picked[0, 3, 3]
    # K = 0 and K = all: nothing, everything; only allowed pixels count.
    assert not top_error_pixels(raw, 3, [0], method=method).any()
    assert top_error_pixels(raw, 3, [49], method=method).all()
    allowed = torch.zeros(1, 7, 7, dtype=torch.bool)
    allowed[0, :, 5:] = True  # all at median 0.2: the highest score, the lone pixel, wins
    picked = top_error_pixels(raw, 3, [1], allowed, method=method)
    assert picked.sum() == 1 and picked[0, 0, 6]


def test_top_error_pixels_rejects_bad_arguments():
    with pytest.raises(ValueError, match="odd"):
        top_error_pixels(torch.zeros(1, 4, 4), 4, [1])
    with pytest.raises(ValueError, match="2 values of K for 1 maps"):
        top_error_pixels(torch.zeros(1, 4, 4), 3, [1, 1])
