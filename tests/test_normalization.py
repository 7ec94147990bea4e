"""Pixel statistics: the scale check predict runs against the training data's."""

from __future__ import annotations

import numpy as np
import pytest

from magseg.normalization import ChannelStats, scale_mismatches

# Training statistics of an 8-bit band and of a band in dB (negative): scales 150 and 20.
MEAN, STD = (100.0, -15.0), (50.0, 5.0)


def _stats(*channels):
    stats = ChannelStats(len(channels))
    stats.update(np.array(channels, dtype=np.float64)[:, None, :])  # (C, 1, N)
    return stats


@pytest.mark.parametrize("values, expected", [
    # mean 1200, std 100: 1300 / 150 = 8.67 > 8        mean -15, std 1: 16 / 20 = 0.8
    (([1100, 1300], [-14, -16]), [(0, 1300 / 150)]),
    # mean 1050, std 50: 1100 / 150 = 7.33, inside     mean 1, std 0.5: 1.5 / 20 = 0.075 < 1/8
    (([1000, 1100], [0.5, 1.5]), [(1, 1.5 / 20)]),
    # mean 2, std 1: 3 / 150 = 0.02                    mean -150, std 10: 160 / 20 = 8, on the edge
    (([1, 3], [-140, -160]), [(0, 3 / 150)]),
])
def test_scale_mismatches_by_hand(values, expected):
    off = scale_mismatches(_stats(*values), MEAN, STD)
    assert [c for c, _ in off] == [c for c, _ in expected]
    for (_, ratio), (_, want) in zip(off, expected):
        assert ratio == pytest.approx(want)


@pytest.mark.parametrize("factor", [1, 3, 7.9, 1 / 7.9])
def test_the_training_data_rescaled_by_less_than_the_factor_passes(factor):
    rng = np.random.default_rng(0)
    pixels = rng.normal(MEAN, STD, size=(10_000, 2)).T
    assert scale_mismatches(_stats(*(pixels * factor)), MEAN, STD) == []


@pytest.mark.parametrize("factor", [8.5, 257, 1 / 8.5, 1 / 255])
def test_the_training_data_rescaled_by_more_than_the_factor_is_off_on_every_band(factor):
    rng = np.random.default_rng(1)
    pixels = rng.normal(MEAN, STD, size=(10_000, 2)).T
    off = scale_mismatches(_stats(*(pixels * factor)), MEAN, STD)
    assert [c for c, _ in off] == [0, 1]
    assert all(ratio == pytest.approx(factor, rel=0.02) for _, ratio in off)
