"""Exact binomial statistics for the risk of an exit plan (disagreement rate, accuracy harm) and
for proportions measured elsewhere (shadow evaluations, memory steps, analytics rules).

Every function here is the one place moco computes its statistic.  :func:`binomial_p_value`,
:func:`clopper_pearson_upper` and :func:`clopper_pearson_interval` take scalars or numpy arrays
(broadcast together): scalars give floats, arrays give arrays.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def _result(values: np.ndarray):
    """A float for a 0-d result, else the array."""
    return float(values) if values.ndim == 0 else values


def binomial_p_value(failures, rows, budget: float):
    """p-value of H0 "true failure rate >= budget" after ``failures`` in ``rows`` i.i.d. rows.

    Exact binomial tail P(Binom(rows, budget) <= failures); small values reject H0; 1 for no rows.
    """
    failures, rows = np.broadcast_arrays(np.asarray(failures), np.asarray(rows))
    return _result(np.where(rows == 0, 1.0, stats.binom.cdf(failures, rows, budget)))


def _upper(failures: np.ndarray, rows: np.ndarray, level: float) -> np.ndarray:
    """The ``level`` quantile of the exact upper bound's beta (1 where every row failed or none exists)."""
    reachable = (rows > 0) & (failures < rows)
    bound = np.ones(failures.shape, np.float64)
    bound[reachable] = stats.beta.ppf(level, failures[reachable] + 1, rows[reachable] - failures[reachable])
    return bound


def _lower(successes: np.ndarray, rows: np.ndarray, level: float) -> np.ndarray:
    """The ``level`` quantile of the exact lower bound's beta (0 where nothing succeeded)."""
    reachable = successes > 0
    bound = np.zeros(successes.shape, np.float64)
    bound[reachable] = stats.beta.ppf(level, successes[reachable], rows[reachable] - successes[reachable] + 1)
    return bound


def clopper_pearson_upper(failures, rows, confidence: float):
    """One-sided Clopper-Pearson upper confidence bound of a binomial rate (1 for no rows)."""
    failures, rows = np.broadcast_arrays(np.asarray(failures), np.asarray(rows))
    return _result(_upper(failures, rows, confidence))


def clopper_pearson_interval(successes, rows, confidence: float):
    """Two-sided Clopper-Pearson (exact) interval ``(low, high)`` of a proportion: each tail
    holds at most ``(1 - confidence) / 2``."""
    successes, rows = np.broadcast_arrays(np.asarray(successes), np.asarray(rows))
    alpha = 1 - confidence
    return _result(_lower(successes, rows, alpha / 2)), _result(_upper(successes, rows, 1 - alpha / 2))


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
