"""Exact binomial statistics for the risk of an exit plan (disagreement rate, accuracy harm)."""
from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats


def binomial_p_value(failures: int, rows: int, budget: float) -> float:
    """p-value of H0 "true failure rate >= budget" after ``failures`` in ``rows`` i.i.d. rows.

    Exact binomial tail P(Binom(rows, budget) <= failures); small values reject H0.
    """
    if rows == 0:
        return 1.0
    return float(stats.binom.cdf(failures, rows, budget))


def clopper_pearson_upper(failures: int, rows: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper confidence bound of a binomial rate."""
    if rows == 0 or failures >= rows:
        return 1.0
    return float(stats.beta.ppf(confidence, failures + 1, rows - failures))


def rows_needed(budget: float, confidence: float) -> int:
    """Fewest rows for which zero failures certify a rate below ``budget`` at ``confidence``.

    ``1 - budget`` rounds to 1 for budgets below about 1e-16: their logarithm is taken with ``log1p``
    (as for every budget below 0.5: exact where ``log(1 - budget)`` loses digits)."""
    step = math.log1p(-budget) if budget < 0.5 else math.log(1 - budget)
    rows = math.log(1 - confidence) / step
    if not math.isfinite(rows):
        raise ValueError(f"certifying a rate below {budget:g} at confidence {confidence:g} needs more rows than "
                         "can be counted")
    return math.ceil(rows)


def max_certifiable_failures(rows: int, budget: float, delta: float) -> int:
    """Most failures in ``rows`` rows that still reject H0 "rate >= budget" at level ``delta``
    (-1 when even zero failures cannot)."""
    if rows == 0:
        return -1
    failures = int(stats.binom.ppf(delta, rows, budget))  # smallest count whose tail reaches delta
    return failures if binomial_p_value(failures, rows, budget) <= delta else failures - 1


def fixed_sequence(p_values: Sequence[float], delta: float) -> int:
    """Fixed-sequence testing (Bauer 1991; Learn-then-Test, Angelopoulos et al. 2021, sec. 3).

    Hypotheses are tested in their given order at level ``delta`` each, stopping at the
    first that is not rejected; the family-wise error rate is at most ``delta`` when the
    order was fixed before the p-values were seen.  Returns the index of the last
    rejected hypothesis, -1 when the first is not rejected.
    """
    for index, p_value in enumerate(p_values):
        if p_value > delta:
            return index - 1
    return len(p_values) - 1
