"""The post-training K/refiner choice (magseg.training.choice): patch-only unless a candidate
beats it by more than the bootstrap noise of the validation split."""

from __future__ import annotations

import pytest
import torch

from magseg.evaluation.metrics import scores
from magseg.training.choice import GRID, Candidate, choose, miou_batch, window_matrices

IN_MEAN = [True, True]


def _units(right: list[list[int]], wrong: list[list[int]]) -> torch.Tensor:
    """``(scenes, windows, 2, 2)``: in each window, ``right`` pixels of each class correct
    and ``wrong`` of each class taken for the other."""
    s, w = len(right), len(right[0])
    m = torch.zeros(s, w, 2, 2, dtype=torch.int64)
    for i in range(s):
        for j in range(w):
            m[i, j, 0, 0] = m[i, j, 1, 1] = right[i][j]
            m[i, j, 0, 1] = m[i, j, 1, 0] = wrong[i][j]
    return m


def test_window_matrices_split_the_scene_matrix():
    pred = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    target = torch.tensor([[0, 1, 0, 0], [1, 255, 0, 0], [0, 1, 0, 1], [1, 1, 0, 1]])
    units = window_matrices(pred, target, 2, grid=2)
    assert units.shape == (4, 2, 2)
    # Top-left window: pixels (0,0) 0->0, (0,1) 1->1, (1,0) 1->1, (1,1) ignored (255).
    assert units[0].tolist() == [[1, 0], [0, 2]]
    # Top-right: (0,2) truth 0 predicted 1, the rest 0 -> 0.
    assert units[1].tolist() == [[3, 1], [0, 0]]
    full = torch.zeros(2, 2, dtype=torch.int64)
    for i in range(4):
        for j in range(4):
            if target[i, j] < 2:
                full[target[i, j], pred[i, j]] += 1
    assert torch.equal(units.sum(0), full)


def test_miou_batch_matches_scores():
    gen = torch.Generator().manual_seed(0)
    m = torch.randint(0, 50, (5, 3, 3), generator=gen)
    m[2, 1, :] = 0
    m[2, :, 1] = 0  # class 1 absent from truth and prediction: out of the mean
    in_mean = [False, True, True]
    got = miou_batch(m, in_mean)
    for i in range(5):
        assert float(got[i]) == pytest.approx(scores(m[i], in_mean)["miou"])


def test_a_split_too_small_to_tell_keeps_patch_only():
    # One validation scene: the candidate wins on the whole (94 right of 100 per class
    # against 90 on average) but loses in a third of the windows, so its gain's interval
    # reaches below 0: patch-only stays, though the point estimate says otherwise.
    base_right = [[90] * GRID * GRID]
    cand_right = [[99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 80, 80, 80, 80, 80]]
    base = Candidate(False, 1.0, _units(base_right, [[100 - r for r in row] for row in base_right]))
    cand = Candidate(True, 0.5, _units(cand_right, [[100 - r for r in row] for row in cand_right]))
    pick, records, unit = choose([cand, base], base, IN_MEAN, own_k=0.5)
    assert unit == "windows"
    assert records[1]["gain"] > 0  # it did win on the point estimate
    lo, hi = records[1]["interval"]
    assert lo < 0 < hi and records[1]["beats_noise"] is False
    assert (pick.refiner, pick.k) == (False, 1.0)
    assert records[0]["baseline"] and records[0]["gain"] == 0.0


def test_a_candidate_that_wins_everywhere_is_chosen():
    # Four scenes, every window 5 points better: the whole bootstrap interval is above 0.
    base_right = [[90] * GRID * GRID for _ in range(4)]
    cand_right = [[95] * GRID * GRID for _ in range(4)]
    other_right = [[93] * GRID * GRID for _ in range(4)]
    mk = lambda right: _units(right, [[100 - r for r in row] for row in right])  # noqa: E731
    base = Candidate(False, 1.0, mk(base_right))
    cands = [Candidate(True, 0.5, mk(cand_right)), Candidate(False, 0.5, mk(other_right)), base]
    pick, records, _ = choose(cands, base, IN_MEAN, own_k=0.5)
    assert (pick.refiner, pick.k) == (True, 0.5)
    rec = {(r["refiner"], r["k"]): r for r in records}
    # IoU of each class: 95 / (95 + 5 + 5) against 90 / (90 + 10 + 10).
    assert rec[(True, 0.5)]["gain"] == pytest.approx(95 / 105 - 90 / 110)
    assert rec[(True, 0.5)]["interval"][0] == pytest.approx(95 / 105 - 90 / 110)  # no spread
    assert rec[(False, 0.5)]["beats_noise"] and rec[(True, 0.5)]["beats_noise"]


def test_scenes_are_resampled_when_there_are_enough():
    right = [[90 + (i % 3)] * GRID * GRID for i in range(12)]
    units = _units(right, [[100 - r for r in row] for row in right])
    base = Candidate(False, 1.0, units)
    _, _, unit = choose([Candidate(True, 1.0, units), base], base, IN_MEAN, own_k=1.0)
    assert unit == "scenes"
