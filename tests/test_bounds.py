"""The certificate's statistics: exact binomial p-values, Clopper-Pearson bounds and fixed-sequence testing,
checked against scipy."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from moco_compile.passes.planning.bounds import (binomial_p_value, clopper_pearson_interval, clopper_pearson_upper,
                                                 fixed_sequence, max_certifiable_failures, rows_needed)


def test_binomial_statistics_match_scipy():
    assert rows_needed(0.01, 0.95) == 299
    assert binomial_p_value(0, 299, 0.01) <= 0.05 < binomial_p_value(0, 298, 0.01)
    assert clopper_pearson_upper(0, 299, 0.95) == pytest.approx(0.01, rel=0.01)
    for rows, failures in [(500, 3), (2000, 12), (10000, 80)]:
        oracle = stats.binomtest(failures, rows, 0.01, alternative="less").pvalue
        assert binomial_p_value(failures, rows, 0.01) == pytest.approx(oracle)


BOUND_GRID_ROWS = [1, 2, 7, 50, 301]
BOUND_GRID_CONFIDENCES = [0.8, 0.9, 0.95, 0.99]


def _counts(rows: int) -> np.ndarray:
    """Every count for small ``rows``, else both ends, their neighbours and the middle."""
    return np.arange(rows + 1) if rows <= 50 else np.array([0, 1, rows // 3, rows // 2, rows - 1, rows])


@pytest.mark.parametrize("confidence", BOUND_GRID_CONFIDENCES)
@pytest.mark.parametrize("rows", BOUND_GRID_ROWS)
def test_clopper_pearson_bounds_match_scipy_exact_intervals(rows, confidence):
    counts = _counts(rows)
    two_sided = [stats.binomtest(int(k), rows).proportion_ci(confidence, method="exact") for k in counts]
    upper = [stats.binomtest(int(k), rows, alternative="less").proportion_ci(confidence, method="exact").high
             for k in counts]
    for k, oracle, oracle_upper in zip(counts, two_sided, upper):  # scalars in, floats out
        low, high = clopper_pearson_interval(int(k), rows, confidence)
        assert isinstance(low, float) and isinstance(high, float)
        assert (low, high) == pytest.approx((oracle.low, oracle.high), rel=1e-9, abs=1e-12)
        bound = clopper_pearson_upper(int(k), rows, confidence)
        assert isinstance(bound, float) and bound == pytest.approx(oracle_upper, rel=1e-9, abs=1e-12)
    low, high = clopper_pearson_interval(counts, np.full(len(counts), rows), confidence)  # arrays in, arrays out
    assert isinstance(low, np.ndarray) and low.shape == counts.shape == high.shape
    np.testing.assert_allclose(low, [ci.low for ci in two_sided], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(high, [ci.high for ci in two_sided], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(clopper_pearson_upper(counts, rows, confidence), upper, rtol=1e-9, atol=1e-12)
    assert low[0] == 0.0 and high[-1] == 1.0 and clopper_pearson_upper(rows, rows, confidence) == 1.0


def test_bounds_take_arrays_and_no_rows():
    failures, rows = np.array([0, 3, 12, 0]), np.array([299, 500, 2000, 0])
    p_values = binomial_p_value(failures, rows, 0.01)
    assert isinstance(p_values, np.ndarray)
    np.testing.assert_allclose(p_values[:3], [stats.binomtest(int(k), int(n), 0.01, alternative="less").pvalue
                                              for k, n in zip(failures[:3], rows[:3])])
    assert p_values[3] == binomial_p_value(0, 0, 0.01) == 1.0
    assert clopper_pearson_upper(failures, rows, 0.95)[3] == clopper_pearson_upper(0, 0, 0.95) == 1.0
    assert clopper_pearson_interval(0, 0, 0.95) == (0.0, 1.0)
    low, high = clopper_pearson_interval(np.array([[0, 1], [2, 3]]), 3, 0.9)  # broadcast, shape kept
    assert low.shape == high.shape == (2, 2) and low[0, 0] == 0.0 and high[1, 1] == 1.0


@pytest.mark.parametrize("rows", [150, 299, 1000, 2000, 5000])
def test_max_certifiable_failures_is_the_last_count_that_rejects(rows):
    most = max_certifiable_failures(rows, 0.01, 0.05)
    assert most == -1 or binomial_p_value(most, rows, 0.01) <= 0.05
    assert binomial_p_value(most + 1, rows, 0.01) > 0.05


def test_fixed_sequence_stops_at_the_first_failure():
    assert fixed_sequence([0.001, 0.01, 0.2, 0.001], 0.05) == 1
    assert fixed_sequence([0.3, 0.001], 0.05) == -1
    assert fixed_sequence([0.01, 0.02], 0.05) == 1
    assert fixed_sequence([], 0.05) == -1
