"""Metrics against confusion matrices computed by hand, and the DeepGlobe 'unknown' convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from magseg.evaluation.metrics import ConfusionMatrix, confusion_matrix, scores

# Class 0 is 'unknown' (in the matrix, out of the mean), 1 and 2 are counted.
TARGET = torch.tensor([[0, 1, 1], [2, 2, 1]])
PRED = torch.tensor([[1, 1, 2], [2, 2, 1]])
IN_MEAN = [False, True, True]


def test_confusion_matrix_by_hand():
    # rows = ground truth, columns = prediction:
    #   gt 0: one pixel predicted 1               -> m[0,1] = 1
    #   gt 1: (0,1)->1, (0,2)->2, (1,2)->1       -> m[1,1] = 2, m[1,2] = 1
    #   gt 2: (1,0)->2, (1,1)->2                  -> m[2,2] = 2
    expected = torch.tensor([[0, 1, 0], [0, 2, 1], [0, 0, 2]])
    assert torch.equal(confusion_matrix(PRED, TARGET, 3), expected)


def test_scores_by_hand_with_unknown_out_of_the_mean():
    s = scores(confusion_matrix(PRED, TARGET, 3), IN_MEAN)
    # IoU1 = 2 / (3 gt + 3 predicted - 2) = 1/2; IoU2 = 2 / (2 + 3 - 2) = 2/3; IoU0 = 0 / 1.
    assert s["iou"] == pytest.approx([0.0, 0.5, 2 / 3])
    assert s["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    # Accuracy and FWIoU over pixels whose ground truth is a counted class (5 of 6).
    assert s["accuracy"] == pytest.approx(4 / 5)
    assert s["fwiou"] == pytest.approx((3 * 0.5 + 2 * (2 / 3)) / 5)
    assert s["pixels"] == 6


def test_unknown_ground_truth_is_a_false_positive_of_the_class_predicted():
    """The convention of MagNet/FCtL/GLNet: 'unknown' stays in the matrix, so predicting
    'class 1' on an unknown pixel costs class 1 IoU; removing that pixel raises it."""
    with_unknown = scores(confusion_matrix(PRED, TARGET, 3), IN_MEAN)
    ignored = TARGET.clone()
    ignored[0, 0] = 255  # the same pixel, but as nodata: out of the matrix entirely
    without = scores(confusion_matrix(PRED, ignored, 3), IN_MEAN)
    assert with_unknown["iou"][1] == pytest.approx(2 / 4)
    assert without["iou"][1] == pytest.approx(2 / 3)
    assert without["pixels"] == 5


def test_all_classes_in_mean_when_not_told():
    s = scores(confusion_matrix(PRED, TARGET, 3))
    assert s["miou"] == pytest.approx((0 + 0.5 + 2 / 3) / 3)
    assert s["accuracy"] == pytest.approx(4 / 6)


def test_class_absent_everywhere_is_nan_and_left_out_of_the_mean():
    target = torch.tensor([1, 1, 2, 2])
    pred = torch.tensor([1, 2, 2, 2])
    s = scores(confusion_matrix(pred, target, 4), [False, True, True, True])
    # Class 3 never occurs: IoU undefined, not 0 (which would drag the mean down).
    assert math.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_class_predicted_but_absent_from_ground_truth_scores_zero():
    target = torch.tensor([1, 1, 1, 1])
    pred = torch.tensor([1, 1, 1, 2])
    s = scores(confusion_matrix(pred, target, 3), [False, True, True])
    assert s["iou"][2] == 0.0
    assert s["miou"] == pytest.approx((3 / 4 + 0) / 2)


def test_ignore_value_and_out_of_range_targets_are_dropped():
    target = torch.tensor([255, 1, 7, 0])
    pred = torch.tensor([1, 1, 1, 0])
    m = confusion_matrix(pred, target, 3)
    assert int(m.sum()) == 2
    assert m[1, 1] == 1 and m[0, 0] == 1


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 2)


def test_global_matrix_is_not_the_mean_of_per_image_scores():
    """mIoU from the summed matrix differs from averaging per-image mIoUs (and is the one
    reported): image A is big and mostly right, image B small and all wrong."""
    acc = ConfusionMatrix(3, IN_MEAN)
    a_t = torch.tensor([1] * 8 + [2] * 8)
    a_p = torch.tensor([1] * 8 + [2] * 7 + [1])
    b_t = torch.tensor([2, 2])
    b_p = torch.tensor([1, 1])
    ma = acc.update(a_p, a_t)
    mb = acc.update(b_p, b_t)
    assert torch.equal(acc.matrix, ma + mb)
    # Summed matrix: gt1 -> 8 right; gt2 -> 7 right, 3 predicted 1.
    assert acc.matrix.tolist() == [[0, 0, 0], [0, 8, 0], [0, 3, 7]]
    global_miou = acc.scores()["miou"]
    assert global_miou == pytest.approx((8 / 11 + 7 / 10) / 2)
    per_image = (scores(ma, IN_MEAN)["miou"] + scores(mb, IN_MEAN)["miou"]) / 2
    assert per_image != pytest.approx(global_miou)


def test_iadd_merges_workers():
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(PRED, TARGET)
    b.update(TARGET, TARGET)
    total = ConfusionMatrix(3)
    total += a
    total += b.matrix
    assert torch.equal(total.matrix, a.matrix + b.matrix)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 6),
    data=st.data(),
)
def test_matrix_matches_a_pixel_loop(n, data):
    size = data.draw(st.integers(1, 40))
    target = np.asarray(data.draw(st.lists(st.sampled_from([*range(n), 255]), min_size=size, max_size=size)))
    pred = np.asarray(data.draw(st.lists(st.integers(0, n - 1), min_size=size, max_size=size)))
    expected = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(target, pred):
        if t != 255:
            expected[t, p] += 1
    m = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), n)
    assert m.tolist() == expected.tolist()
    s = scores(m)
    for c in range(n):
        tp, gt, pr = expected[c, c], expected[c].sum(), expected[:, c].sum()
        union = gt + pr - tp
        if union == 0:
            assert math.isnan(s["iou"][c])
        else:
            assert s["iou"][c] == pytest.approx(tp / union)


def test_accuracy_assessment_by_hand():
    # The matrix above: [[0, 1, 0], [0, 2, 1], [0, 0, 2]].
    s = scores(confusion_matrix(PRED, TARGET, 3), IN_MEAN)
    # Producer's: diagonal / row total (ground truth): 0/1, 2/3, 2/2.
    assert s["producer_accuracy"] == pytest.approx([0.0, 2 / 3, 1.0])
    # User's: diagonal / column total (prediction, unknown's row included): 0/0 undefined,
    # 2/3, 2/3.
    assert math.isnan(s["user_accuracy"][0])
    assert s["user_accuracy"][1:] == pytest.approx([2 / 3, 2 / 3])
    # Kappa over the 5 pixels of counted ground truth: p_o = 4/5; row totals (0, 3, 2),
    # column totals over those rows (0, 2, 3): p_e = (0 + 3*2 + 2*3) / 25 = 12/25;
    # kappa = (4/5 - 12/25) / (1 - 12/25) = 8/13.
    assert s["kappa"] == pytest.approx(8 / 13)


def test_kappa_textbook_example_and_edges():
    from magseg.evaluation.metrics import kappa

    # Two raters, 50 items: [[20, 5], [10, 15]]: p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5.
    assert kappa([[20, 5], [10, 15]]) == pytest.approx(0.4)
    assert kappa([[7, 0], [0, 5]]) == pytest.approx(1.0)
    assert math.isnan(kappa([[0, 0], [0, 0]]))
    assert math.isnan(kappa([[9, 0], [0, 0]]))  # one class only: chance agrees totally
