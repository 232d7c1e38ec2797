"""How much to trust human labels: agreement between labellers, biases, and the interval of a win rate.

Pure functions of counts and label lists (the standard library only), used by the service's feedback
studio (`/tunery/v1/feedback/queues/{id}/quality`, comparisons) and testable by hand.

    cohen_kappa(["a", "a", "b"], ["a", "b", "b"])      two labellers over the same items
    fleiss_kappa([{"a": 2}, {"a": 1, "b": 1}])          many labellers, each item's label counts
    binomial_p_value(70, 100)                           is 70 of 100 "left" wins more than chance?
    wilson_interval(30, 40)                             95% interval of a 30/40 win rate
    length_controlled_win_rate([1, 0, 0.5], [40, -3, 0])  the win rate had both answers been equally long
    plurality(["a", "a", "b"])                          the item's verdict and its agreement
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

Label = TypeVar("Label", bound=Hashable)


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two labellers' labels on the same items (position i of each is one item):
    (p_o - p_e) / (1 - p_e), with p_o the share of items they agree on and p_e the agreement expected from
    each labeller's own label frequencies. None when undefined: no items, or both always gave the one
    same label (p_e = 1)."""
    if len(first) != len(second):
        raise ValueError(f"label lists differ in length: {len(first)} and {len(second)}")
    n = len(first)
    if n == 0:
        return None
    observed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    count_1, count_2 = Counter(first), Counter(second)
    expected = sum(count_1[k] * count_2[k] for k in count_1) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def fleiss_kappa(items: Sequence[Mapping[Label, int]]) -> float | None:
    """Fleiss' kappa over items labelled at least twice; `items[i]` counts each label given to item i.

    Items may have different numbers of labels: each item's agreement P_i is the share of its labeller
    pairs that agree, sum_j n_ij (n_ij - 1) / (n_i (n_i - 1)); P is their mean, and chance agreement P_e is
    sum_j p_j^2 with p_j the share of all labels that are j. With the same number of labels on every item
    this is Fleiss (1971) exactly. Items with fewer than two labels are left out. None when undefined (no
    such item, or a single label used throughout).
    """
    rated = [{k: v for k, v in item.items() if v > 0} for item in items]
    rated = [item for item in rated if sum(item.values()) >= 2]
    if not rated:
        return None
    agreements = []
    totals: Counter[Label] = Counter()
    for item in rated:
        n = sum(item.values())
        agreements.append(sum(c * (c - 1) for c in item.values()) / (n * (n - 1)))
        totals.update(item)
    observed = sum(agreements) / len(agreements)
    all_labels = sum(totals.values())
    expected = sum((c / all_labels) ** 2 for c in totals.values())
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def binomial_p_value(successes: int, n: int, p: float = 0.5) -> float:
    """Exact two-sided binomial test: the probability, under rate `p`, of an outcome no more likely than
    `successes` of `n` (the method of R's binom.test). 1.0 for n = 0."""
    if n == 0:
        return 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..{n}, got {successes}")

    def log_pmf(k: int) -> float:
        if p in (0.0, 1.0):
            return 0.0 if k == (n if p == 1.0 else 0) else -math.inf
        return (
            math.lgamma(n + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n - k + 1)
            + k * math.log(p)
            + (n - k) * math.log1p(-p)
        )

    observed = log_pmf(successes)
    tolerance = 1e-7  # relative, as binom.test: outcomes equally likely up to rounding count as "as extreme"
    total = sum(math.exp(log_pmf(k)) for k in range(n + 1) if log_pmf(k) <= observed + math.log1p(tolerance))
    return min(1.0, total)


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (95% by default); None for n = 0. Unlike the normal
    approximation it stays inside [0, 1] and behaves at 0/n and n/n, where small samples live."""
    if n == 0:
        return None
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class LengthControlled:
    rate: float  # the win rate predicted for answers of equal length
    interval: tuple[float, float] | None  # 95% bootstrap interval over the items
    length_effect: float  # the fitted logit coefficient of tanh(length difference / its spread)


def _fit_length_model(outcomes: Sequence[float], x: Sequence[float], ridge: float) -> tuple[float, float]:
    """(theta, phi) maximising sum y log p + (1 - y) log(1 - p) - ridge/2 phi^2 with p = sigmoid(theta +
    phi x), by Newton's method (the objective is concave). Outcomes may be fractional (a tie is 0.5)."""
    theta = phi = 0.0
    for _ in range(100):
        g0 = g1 = 0.0
        h00 = h01 = h11 = 0.0
        for y, xi in zip(outcomes, x, strict=True):
            z = theta + phi * xi
            p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
            w = max(p * (1.0 - p), 1e-12)
            g0 += y - p
            g1 += (y - p) * xi
            h00 += w
            h01 += w * xi
            h11 += w * xi * xi
        g1 -= ridge * phi
        h11 += ridge
        det = h00 * h11 - h01 * h01
        if det <= 1e-18:
            break
        step0 = (h11 * g0 - h01 * g1) / det
        step1 = (h00 * g1 - h01 * g0) / det
        scale = min(1.0, 5.0 / max(abs(step0), abs(step1), 1e-12))  # damped: logits move at most 5 a step
        theta += scale * step0
        phi += scale * step1
        if max(abs(step0), abs(step1)) < 1e-10:
            break
    return theta, phi


def length_controlled_win_rate(
    outcomes: Sequence[float],
    length_differences: Sequence[float],
    ridge: float = 1.0,
    resamples: int = 400,
    seed: int = 0,
) -> LengthControlled | None:
    """The candidate's win rate with the answers' length difference taken out, as the field's
    length-controlled evaluations do: fit P(win) = sigmoid(theta + phi * tanh(d / s)) to the items, d the
    candidate's length minus the baseline's and s the spread (standard deviation) of d, and report
    sigmoid(theta), the predicted win rate at d = 0. `outcomes`: 1 a win, 0 a loss, 0.5 a tie. `ridge`:
    a Gaussian prior on phi (in logits) that keeps a small or separable sample finite. The interval is a
    percentile bootstrap over the items (deterministic for a `seed`). When every length difference is the
    same (length cannot be told apart from the model) or every item has the same outcome, this is the raw
    rate with its Wilson interval. None for no items."""
    n = len(outcomes)
    if n != len(length_differences):
        raise ValueError(f"{n} outcomes but {len(length_differences)} length differences")
    if n == 0:
        return None
    mean_d = sum(length_differences) / n
    spread = math.sqrt(sum((d - mean_d) ** 2 for d in length_differences) / n)
    raw = sum(outcomes) / n
    if spread == 0.0 or len(set(outcomes)) == 1:
        return LengthControlled(raw, wilson_interval(sum(outcomes), n), 0.0)
    x = [math.tanh(d / spread) for d in length_differences]

    def rate(ys: Sequence[float], xs: Sequence[float]) -> tuple[float, float]:
        theta, phi = _fit_length_model(ys, xs, ridge)
        return 1.0 / (1.0 + math.exp(-theta)), phi

    point, phi = rate(outcomes, x)
    draws = random.Random(seed)
    rates = []
    for _ in range(resamples):
        picks = [draws.randrange(n) for _ in range(n)]
        rates.append(rate([outcomes[i] for i in picks], [x[i] for i in picks])[0])
    rates.sort()
    interval = (rates[int(0.025 * (resamples - 1))], rates[int(0.975 * (resamples - 1))]) if rates else None
    return LengthControlled(point, interval, phi)


def plurality(labels: Sequence[Label]) -> tuple[Label | None, float]:
    """The label given most often and the share of labels that gave it; (None, share) when two labels tie
    for the most (a conflict: no verdict), (None, 0.0) for no labels."""
    if not labels:
        return None, 0.0
    ranked = Counter(labels).most_common()
    top, count = ranked[0]
    share = count / len(labels)
    if len(ranked) > 1 and ranked[1][1] == count:
        return None, share
    return top, share


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
