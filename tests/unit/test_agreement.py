"""Agreement statistics against hand-worked and published numbers."""

from __future__ import annotations

import math

import pytest

from tunery.data.agreement import (
    binomial_p_value,
    cohen_kappa,
    fleiss_kappa,
    median,
    plurality,
    wilson_interval,
)


def test_cohen_kappa_two_by_two() -> None:
    # 50 items: both "yes" 20, A yes / B no 5, A no / B yes 10, both "no" 15.
    # p_o = 35/50 = 0.7; A says yes 0.5, B 0.6: p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_edges() -> None:
    assert cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert cohen_kappa([], []) is None
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # one label throughout: chance agreement is 1
    with pytest.raises(ValueError):
        cohen_kappa(["a"], ["a", "b"])


def test_fleiss_kappa_published_example() -> None:
    # Fleiss' kappa's textbook table: 10 subjects, 14 raters, 5 categories; kappa = 0.210
    rows = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    items = [{j: n for j, n in enumerate(row)} for row in rows]
    assert fleiss_kappa(items) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_unequal_counts_by_hand() -> None:
    # P_i: {a:2} -> 1, {a:1,b:1} -> 0, {b:3} -> 1; mean 2/3. Labels: a 3, b 4 of 7: P_e = 25/49.
    # kappa = (2/3 - 25/49) / (1 - 25/49) = 23/72. The single-label item is left out.
    items = [{"a": 2}, {"a": 1, "b": 1}, {"b": 3}, {"a": 1}]
    assert fleiss_kappa(items) == pytest.approx(23 / 72)
    assert fleiss_kappa([{"a": 1}]) is None
    assert fleiss_kappa([{"a": 2}, {"a": 3}]) is None


def test_fleiss_equals_cohen_shape_for_perfect_agreement() -> None:
    assert fleiss_kappa([{"a": 2}, {"b": 2}, {"a": 2}]) == pytest.approx(1.0)


def test_binomial_p_value_by_hand() -> None:
    # P(X >= 7 | n=10, p=.5) = (120 + 45 + 10 + 1) / 1024 = 0.171875; two-sided doubles it
    assert binomial_p_value(7, 10) == pytest.approx(0.34375)
    assert binomial_p_value(3, 10) == pytest.approx(0.34375)
    assert binomial_p_value(0, 5) == pytest.approx(2 / 32)
    assert binomial_p_value(5, 10) == pytest.approx(1.0)
    assert binomial_p_value(0, 0) == 1.0
    # asymmetric p: X=0 of 3 at p=0.2 has probability 0.512, the most likely outcome: p-value 1
    assert binomial_p_value(0, 3, 0.2) == pytest.approx(1.0)
    # X=3 of 3 at p=0.2: 0.008; X=2: 0.096 > 0.008, so only X=3 is as extreme
    assert binomial_p_value(3, 3, 0.2) == pytest.approx(0.008)
    assert binomial_p_value(700, 1000) < 1e-30


def test_wilson_interval() -> None:
    # 30/40: centre (0.75 + z^2/80) / (1 + z^2/40) = 0.7281, half-width 0.1300
    low, high = wilson_interval(30, 40) or (0, 0)
    assert low == pytest.approx(0.5981, abs=1e-4)
    assert high == pytest.approx(0.8581, abs=1e-4)
    low, high = wilson_interval(0, 10) or (1, 1)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_plurality_and_median() -> None:
    assert plurality(["a", "a", "b"]) == ("a", pytest.approx(2 / 3))
    assert plurality(["a", "b"]) == (None, 0.5)
    assert plurality([]) == (None, 0.0)
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert median([]) is None


def test_length_controlled_win_rate_worked_by_hand() -> None:
    from tunery.data.agreement import length_controlled_win_rate

    # 15 prompts where the candidate's answer is 50 characters longer: 12 wins; 5 where it is 50 shorter:
    # 1 win. Raw rate 13/20 = 0.65. The differences have mean 25 and spread sqrt(1875), so x = +-tanh(c)
    # for the two groups alike; unregularised, the fit is sigmoid(theta + phi x) = 12/15 = 0.8 for the
    # longer group and 1/5 = 0.2 for the shorter, so theta + phi x = logit 0.8 and theta - phi x =
    # logit 0.2 = -logit 0.8: theta = 0 and the length-controlled rate is exactly 1/2.
    outcomes = [1.0] * 12 + [0.0] * 3 + [1.0] + [0.0] * 4
    diffs = [50.0] * 15 + [-50.0] * 5
    fit = length_controlled_win_rate(outcomes, diffs, ridge=0.0, resamples=0)
    assert fit is not None and fit.rate == pytest.approx(0.5, abs=1e-9)
    x = math.tanh(50 / math.sqrt(1875))  # |d - mean| = 25 or 75 -> spread sqrt((15*625 + 5*5625)/20)
    x_short = math.tanh(-50 / math.sqrt(1875))
    assert x == -x_short and fit.length_effect * x == pytest.approx(math.log(4), abs=1e-9)
    # the default prior on the length effect shrinks it a little, so the rate moves towards the raw 0.65
    shrunk = length_controlled_win_rate(outcomes, diffs)
    assert shrunk is not None and 0.5 < shrunk.rate < 0.65 and shrunk.interval is not None
    assert shrunk.interval[0] < shrunk.rate < shrunk.interval[1]


def test_length_controlled_win_rate_without_a_length_effect() -> None:
    from tunery.data.agreement import length_controlled_win_rate, wilson_interval

    # equal lengths: the raw rate (a tie counts half) and its Wilson interval
    fit = length_controlled_win_rate([1, 0, 1, 0.5], [0, 0, 0, 0])
    assert fit is not None and fit.rate == 0.625 and fit.interval == wilson_interval(2.5, 4)
    # wins and losses spread evenly over longer and shorter answers: length explains nothing
    outcomes = [1.0, 0.0] * 10 + [1.0] * 4
    diffs = [30.0, 30.0, -30.0, -30.0] * 6
    fit = length_controlled_win_rate(outcomes, diffs)
    assert fit is not None and fit.rate == pytest.approx(sum(outcomes) / len(outcomes), abs=0.02)
    # a candidate that wins exactly when it is longer: perfectly confounded, and the prior keeps it finite
    fit = length_controlled_win_rate([1.0] * 10 + [0.0] * 10, [30.0] * 10 + [-30.0] * 10)
    assert fit is not None and fit.rate == pytest.approx(0.5, abs=1e-9) and fit.length_effect > 1
    assert length_controlled_win_rate([], []) is None
    with pytest.raises(ValueError, match="2 outcomes but 1"):
        length_controlled_win_rate([1, 0], [3])
