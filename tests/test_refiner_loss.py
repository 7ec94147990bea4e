"""The refiner's training loss: PointRend point sampling and class balancing."""

import pytest
import torch
from conftest import CONFIGS

from magseg.config import load_config
from magseg.data.scenes import IGNORE
from magseg.errors import ConfigError
from magseg.training.losses import (
    gather_points,
    margin_uncertainty,
    segmentation_loss,
    uncertain_points,
)


def test_point_sampling_takes_the_most_uncertain_candidates():
    # A hand-made map: all pixels sure (-1) except a 3 x 3 square of ties (0) and a ring of
    # half-sure pixels (-0.5) around it. With every pixel a candidate (oversample H*W/N),
    # the hard points are exactly the most uncertain ones, most uncertain first.
    u = torch.full((1, 10, 10), -1.0)
    u[0, 3:8, 3:8] = -0.5
    u[0, 4:7, 4:7] = 0.0
    gen = torch.Generator().manual_seed(0)
    index = uncertain_points(u, count=9, oversample=400 / 9, importance=1.0, generator=gen)
    assert index.shape == (1, 9)
    assert sorted(index[0].tolist()) == [r * 10 + c for r in range(4, 7) for c in range(4, 7)]
    # Half hard, half random: the hard half is all ties or half-sure, the random half is
    # drawn from the whole map.
    index = uncertain_points(u.expand(64, -1, -1), count=20, oversample=200 / 20, importance=0.5,
                             generator=gen)
    hard, rand = gather_points(u.expand(64, -1, -1), index).split(10, dim=1)
    assert (hard > -1).all() and (hard == 0).float().mean() > 0.5
    assert (rand == -1).float().mean() > 0.5  # 84 % of the map is sure


def test_point_sampling_is_deterministic_for_a_seed():
    u = torch.rand(2, 16, 16)
    a = uncertain_points(u, 30, generator=torch.Generator().manual_seed(5))
    b = uncertain_points(u, 30, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (2, 30) and int(a.max()) < 256


def test_margin_uncertainty_and_gather_points():
    logits = torch.tensor([[[[0.0, 5.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2): a tie, a sure pixel
    u = margin_uncertainty(logits)
    assert u.shape == (1, 1, 2) and u[0, 0, 0] == 0 and u[0, 0, 1] < -0.9
    assert torch.equal(gather_points(logits, torch.tensor([[1, 0]])), torch.tensor([[[5.0, 0.0], [0.0, 0.0]]]))


def test_class_balance_weighs_a_rare_class_like_a_common_one():
    # 1 rare pixel among 99 common ones, each with a loss of its own size.
    logits = torch.zeros(1, 2, 1, 100)
    target = torch.zeros(1, 1, 100, dtype=torch.long)
    target[0, 0, 0] = 1
    logits[0, 0, 0, 0] = 4.0  # the rare pixel is badly wrong
    plain = segmentation_loss(logits, target)
    balanced = segmentation_loss(logits, target, balance=1.0)
    rare, common = torch.nn.functional.cross_entropy(logits[..., :1], target[..., :1]), torch.log(torch.tensor(2.0))
    assert plain == pytest.approx(float((rare + 99 * common) / 100), rel=1e-5)
    assert balanced == pytest.approx(float((rare + common) / 2), rel=1e-5)
    # IGNORE pixels count for nothing, balanced or not.
    target[0, 0, 50:] = IGNORE
    assert segmentation_loss(logits, target, balance=1.0) == pytest.approx(float((rare + common) / 2), rel=1e-5)


def test_refiner_loss_settings_are_validated():
    for bad in ("train.refiner_points=0", "train.refiner_oversample=0.5", "train.refiner_importance=1.5",
                "train.refiner_balance=-1", "train.refiner_ohem=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[1]):
            load_config(CONFIGS / "tiny.yaml", [bad])
