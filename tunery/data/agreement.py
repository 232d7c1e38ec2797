"""How much to trust human labels: agreement between labellers, biases, and the interval of a win rate.

Pure functions of counts and label lists (the standard library only), used by the service's feedback
studio (`/tunery/v1/feedback/queues/{id}/quality`, comparisons) and testable by hand.

    cohen_kappa(["a", "a", "b"], ["a", "b", "b"])      two labellers over the same items
    fleiss_kappa([{"a": 2}, {"a": 1, "b": 1}])          many labellers, each item's label counts
    binomial_p_value(70, 100)                           is 70 of 100 "left" wins more than chance?
    wilson_interval(30, 40)                             95% interval of a 30/40 win rate
    plurality(["a", "a", "b"])                          the item's verdict and its agreement
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
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


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (95% by default); None for n = 0. Unlike the normal
    approximation it stays inside [0, 1] and behaves at 0/n and n/n, where small samples live."""
    if n == 0:
        return None
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


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
