"""Paired t intervals checked against hand-worked numbers."""

import math

import pytest

from keras_vmoe.study.statistics import half_width_of, paired_difference


def test_paired_interval_hand_worked():
    # Differences 0.03, 0.01, 0.05, 0.03: mean 0.03; deviations 0, -0.02,
    # 0.02, 0 -> sample variance (0.0004 + 0.0004) / 3 = 0.00026667, std
    # 0.01633; standard error 0.01633 / 2 = 0.0081650; t(0.975, 3) = 3.182446
    # -> half-width 0.025985; interval (0.004015, 0.055985): resolved.
    d = paired_difference([0.83, 0.81, 0.85, 0.83], [0.80, 0.80, 0.80, 0.80])
    assert d.mean == pytest.approx(0.03)
    assert d.low == pytest.approx(0.004015, abs=1e-6)
    assert d.high == pytest.approx(0.055985, abs=1e-6)
    assert d.num_pairs == 4 and d.resolved


def test_missing_seeds_are_left_out_and_one_pair_has_no_interval():
    d = paired_difference([0.9, None, float("nan")], [0.8, 0.7, 0.6])
    assert d.num_pairs == 1 and d.mean == pytest.approx(0.1)
    assert d.low is None and d.high is None and not d.resolved
    assert paired_difference([None], [0.5]) is None


def test_ninety_percent_interval_is_narrower():
    # t(0.95, 2 dof) = 2.919986; std 0.02 / sqrt(3) * 2.919986 = 0.033717.
    d = paired_difference([0.82, 0.84, 0.80], [0.8] * 3, confidence=0.9)
    assert d.high - d.mean == pytest.approx(0.033717, abs=1e-6)
    assert math.isinf(half_width_of(0.01, 1))


def test_bad_arguments():
    with pytest.raises(ValueError, match="one entry per seed"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([0.1], [0.1], confidence=1.0)
