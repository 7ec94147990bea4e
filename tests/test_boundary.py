"""Boundary IoU and boundary F-score against counts worked out by hand, the reference
definition (iterated 3x3 erosion of a zero-padded mask), and accumulation over images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.evaluation.boundary import (
    GT_CONTOUR,
    GT_HITS,
    INTER,
    PRED_CONTOUR,
    PRED_HITS,
    UNION,
    BoundaryTally,
    boundary_counts,
    boundary_region,
    boundary_scores,
    distance_of,
)


def _split(rows: int, cols: int, first: int) -> torch.Tensor:
    """Class 1 in columns [0, first), class 2 from there on."""
    labels = torch.full((rows, cols), 2)
    labels[:, :first] = 1
    return labels


def test_distance_is_the_ratio_of_the_diagonal_rounded_at_least_one():
    assert distance_of((7, 12), 0.1) == 1  # 0.1 * 13.89
    assert distance_of((2448, 2448), 0.02) == 69  # 0.02 * 3462.0
    assert distance_of((4, 4), 0.001) == 1


def test_boundary_iou_by_hand_with_the_frame_as_a_contour():
    # 7 x 12, d = 1: ground truth splits at column 6, the prediction one column later.
    target, pred = _split(7, 12, 6), _split(7, 12, 7)
    counts = boundary_counts(pred, target, 3, iou_ratio=0.1)
    # Class 1, truth: rows 0 and 6 (frame) x cols 0-5, and rows 1-5 x cols 0 (frame) and 5
    # = 12 + 10 = 22; prediction likewise with cols 0-6 and 0, 6 = 14 + 10 = 24; both:
    # rows 0, 6 x cols 0-5 and rows 1-5 x col 0 = 17; union 22 + 24 - 17 = 29.
    assert counts[1, INTER].item() == 17 and counts[1, UNION].item() == 29
    # Class 2: truth 12 + 10 = 22, prediction (cols 7-11) 10 + 10 = 20, both 10 + 5 = 15.
    assert counts[2, INTER].item() == 15 and counts[2, UNION].item() == 27
    assert counts[0].tolist() == [0] * 6  # absent everywhere
    s = boundary_scores(counts, [False, True, True])
    assert s["boundary_iou"][1:] == pytest.approx([17 / 29, 15 / 27])
    assert s["boundary_miou"] == pytest.approx((17 / 29 + 15 / 27) / 2)
    assert math.isnan(s["boundary_iou"][0])


def test_boundary_f_by_hand_with_a_spurious_pixel():
    # 8 x 8 of class 1 with a 3 x 3 square of class 2 at rows/cols 2-4; the prediction adds
    # a lone class-2 pixel at (6, 6). Tolerance t = 1.
    target = torch.ones((8, 8), dtype=torch.long)
    target[2:5, 2:5] = 2
    pred = target.clone()
    pred[6, 6] = 2
    counts = boundary_counts(pred, target, 3, f_ratio=0.01)
    # Class 2: the square's contour is its 8 outer pixels; the prediction's adds (6, 6),
    # 2 (chessboard) from the nearest one (4, 4): a miss. P = 8/9, R = 8/8.
    assert counts[2, [PRED_CONTOUR, PRED_HITS, GT_CONTOUR, GT_HITS]].tolist() == [9, 8, 8, 8]
    # Class 1: 12 pixels touch the square; the prediction adds (6, 6)'s 4 neighbours, of
    # which (5, 6) and (6, 5) are 1 from (4, 5) and (5, 4): hits; (7, 6) and (6, 7) are 2
    # away: misses. P = 14/16, R = 12/12.
    assert counts[1, [PRED_CONTOUR, PRED_HITS, GT_CONTOUR, GT_HITS]].tolist() == [16, 14, 12, 12]
    s = boundary_scores(counts, [False, True, True])
    assert s["boundary_f"][1:] == pytest.approx([14 / 15, 16 / 17])
    assert s["boundary_precision"][1:] == pytest.approx([7 / 8, 8 / 9])
    assert s["boundary_recall"][1:] == pytest.approx([1.0, 1.0])
    assert s["boundary_mf"] == pytest.approx((14 / 15 + 16 / 17) / 2)


def test_a_class_only_predicted_has_f_zero_and_iou_zero():
    target = torch.ones((10, 10), dtype=torch.long)
    pred = target.clone()
    pred[4:6, 4:6] = 2
    s = boundary_scores(boundary_counts(pred, target, 3, iou_ratio=0.05, f_ratio=0.05))
    assert s["boundary_iou"][2] == 0.0
    assert s["boundary_f"][2] == 0.0


def test_nodata_ground_truth_is_not_counted():
    target, pred = _split(7, 12, 6), _split(7, 12, 7)
    counted = boundary_counts(pred, target, 3, iou_ratio=0.1)
    target[:, 0] = 255  # the frame column of class 1: out of every count
    masked = boundary_counts(pred, target, 3, iou_ratio=0.1)
    # Class 1 loses its 7 pixels of column 0 from both regions, and (as the new edge of the
    # truth) gains column 1's interior pixels rows 1-5 in the truth's region only.
    assert masked[1, INTER].item() == counted[1, INTER].item() - 7
    assert masked[1, UNION].item() == counted[1, UNION].item() - 7 + 5


def _reference_region(mask: np.ndarray, d: int) -> np.ndarray:
    """Cheng et al.'s reference: pad with one zero, erode d times with a 3x3 square (the
    outside of the padded array never erodes), subtract."""
    padded = np.pad(mask.astype(np.uint8), 1)
    for _ in range(d):
        big = np.pad(padded, 1, constant_values=1)
        padded = np.min([big[1 + dy : 1 + dy + padded.shape[0], 1 + dx : 1 + dx + padded.shape[1]]
                         for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    return mask & ~padded[1:-1, 1:-1].astype(bool)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 14), w=st.integers(1, 14), d=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_boundary_region_is_the_reference_erosion(h, w, d, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < 0.6
    got = boundary_region(torch.from_numpy(mask), d).numpy()
    np.testing.assert_array_equal(got, _reference_region(mask, d))


@settings(max_examples=20, deadline=None)
@given(h=st.integers(2, 24), w=st.integers(2, 24), seed=st.integers(0, 2**16))
def test_a_perfect_prediction_scores_one_on_every_class_with_a_boundary(h, w, seed):
    target = torch.from_numpy(np.random.default_rng(seed).integers(0, 3, (h, w)))
    s = boundary_scores(boundary_counts(target, target, 3))
    present = [c for c in range(3) if (target == c).any()]
    assert all(s["boundary_iou"][c] == 1.0 for c in present)
    # F is undefined (NaN) only for a class that fills the image: it has no contour.
    assert all(s["boundary_f"][c] == 1.0 or (math.isnan(s["boundary_f"][c]) and (target == c).all())
               for c in present)


def test_the_tally_sums_counts_over_images_never_averages_scores():
    a_t, a_p = _split(7, 12, 6), _split(7, 12, 7)
    b_t = torch.ones((8, 8), dtype=torch.long)
    b_t[2:5, 2:5] = 2
    b_p = b_t.clone()
    b_p[6, 6] = 2
    tally = BoundaryTally(3, [False, True, True], iou_ratio=0.1, f_ratio=0.01)
    first = tally.update(a_p, a_t)
    second = tally.update(b_p, b_t)
    assert torch.equal(tally.counts, first + second)
    merged = BoundaryTally(3, [False, True, True])
    merged += first
    merged += second
    assert torch.equal(merged.counts, tally.counts)
    one_image = boundary_scores(first, [False, True, True])["boundary_iou"][1]
    assert tally.scores()["boundary_iou"][1] != pytest.approx(one_image)
