"""Exact binomial statistics for the risk of an exit plan (disagreement rate, accuracy harm)."""
from __future__ import annotations

import math

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
    """Fewest rows for which zero failures certify a rate below ``budget`` at ``confidence``."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - budget))
