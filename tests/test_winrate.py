"""win_rate: tie-adjusted win rates with Wilson score intervals, checked against values derived by hand."""

import dataclasses
import math

import pytest

from dpo_trainer.evaluation import win_rate
from dpo_trainer.evaluation.winrate import wilson_interval

Z95 = 1.959963984540054  # NormalDist().inv_cdf(0.975)


def test_wilson_by_hand_seven_of_ten():
    """p = 0.7, n = 10, z = 1.959964, z² = 3.841459, z²/n = 0.3841459:

    centre = (0.7 + 0.1920729) / 1.3841459 = 0.6444934
    half   = 1.959964 / 1.3841459 * sqrt(0.21/10 + 3.841459/400) = 1.4160097 * 0.1749390 = 0.2477153
    interval = [0.3967781, 0.8922087]  (the textbook Wilson interval for 7 of 10)
    """
    result = win_rate([1.0] * 7 + [0.0] * 3)
    assert (result.rate, result.wins, result.ties, result.n) == (0.7, 7.0, 0, 10)
    assert result.low == pytest.approx(0.3967781, abs=1e-6)
    assert result.high == pytest.approx(0.8922087, abs=1e-6)
    assert (result.low, result.high) == wilson_interval(0.7, 10, 0.95)


def test_ties_count_half_a_win():
    """Two wins, two ties, one loss: wins = 3.0, p = 0.6, n = 5, z²/n = 0.7682918:

    centre = (0.6 + 0.3841459) / 1.7682918 = 0.5565518
    half   = 1.959964 / 1.7682918 * sqrt(0.24/5 + 3.841459/100) = 1.1083940 * 0.2939636 = 0.3258275
    """
    result = win_rate([1.0, 1.0, 0.5, 0.5, 0.0])
    assert (result.rate, result.wins, result.ties, result.n) == (0.6, 3.0, 2, 5)
    assert result.low == pytest.approx(0.2307243, abs=1e-6)
    assert result.high == pytest.approx(0.8823792, abs=1e-6)
    assert win_rate([0.5] * 4).rate == 0.5


def test_all_wins_and_all_losses():
    """All n wins: centre + half = 1 exactly and low = n / (n + z²); all losses mirror it."""
    wins = win_rate([1.0] * 10)
    assert wins.rate == 1.0 and wins.high == 1.0
    assert wins.low == pytest.approx(10 / (10 + Z95**2), abs=1e-12) and wins.low < 1.0
    losses = win_rate([0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    assert losses.rate == 0.0 and losses.low == 0.0
    assert losses.high == pytest.approx(1 - wins.low, abs=1e-12)


def test_single_outcome_and_confidence():
    one = win_rate([1.0])
    assert 0.0 < one.low < 1.0 == one.high
    narrow, wide = win_rate([1.0, 0.0] * 20, confidence=0.8), win_rate([1.0, 0.0] * 20, confidence=0.99)
    assert wide.low < narrow.low < 0.5 < narrow.high < wide.high
    assert narrow.high - 0.5 == pytest.approx(0.5 - narrow.low)  # symmetric around p = 0.5
    with pytest.raises(ValueError, match="confidence"):
        win_rate([1.0], confidence=1.0)


def test_accepts_any_sequence_of_reals():
    assert win_rate((1, 0.5, 0)).wins == 1.5
    assert win_rate(iter([1.0, 1.0])).n == 2


def test_str_and_frozen():
    result = win_rate([1.0] * 144 + [0.0] * 56)
    assert str(result) == "0.72 [0.65, 0.78] (n=200)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.rate = 0.5


def test_no_outcomes_rejected():
    with pytest.raises(ValueError, match="at least one outcome"):
        win_rate([])


@pytest.mark.parametrize("bad", [0.3, 2.0, -1.0, 0.25, math.inf])
def test_bad_values_rejected(bad):
    with pytest.raises(ValueError, match=r"outcome 2 is"):
        win_rate([1.0, 0.0, bad])


def test_nan_outcomes_are_unparsed_and_left_out():
    # a judge's reply without a verdict is no tie: 2 wins of 3 verdicts, the NaN counted apart
    result = win_rate([1.0, math.nan, 1.0, 0.0])
    assert (result.n, result.wins, result.unparsed) == (3, 2.0, 1)
    assert result.rate == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="all 2 are unparsed"):
        win_rate([math.nan, math.nan])


@pytest.mark.parametrize("bad", ["1", None, True, [1.0]])
def test_non_numbers_rejected(bad):
    with pytest.raises(TypeError, match=r"outcome 1 is"):
        win_rate([1.0, bad])
