"""Shadow-evaluation statistics with known ground truth: interval coverage, drift false alarms and power."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from moco_compile.passes.planning.bounds import clopper_pearson_interval as clopper_pearson
from moco_compile.runtime.shadow import project_savings, stream_drift


@pytest.mark.parametrize("rows, rate", [(200, 0.01), (2000, 0.01), (2000, 0.2)])
def test_interval_covers_the_true_rate_at_least_as_often_as_stated(rows, rate):
    counts = np.arange(rows + 1)
    covered = np.array([low <= rate <= high for low, high in (clopper_pearson(int(k), rows, 0.95) for k in counts)])
    coverage = binom.pmf(counts, rows, rate)[covered].sum()  # exact, over every possible count
    assert 0.95 <= coverage < 0.995  # valid, and not vacuous


def _stream(rng, rows, exit_rates, disagreement):
    """Exits and disagreements of a stream whose exit rate steps through ``exit_rates`` (equal parts)."""
    rate = np.repeat(exit_rates, rows // len(exit_rates))
    exited = rng.random(rows) < rate
    exits = np.where(exited, rng.integers(0, 3, rows), -1)
    disagrees = exited & (rng.random(rows) < disagreement / rate)
    return exits, disagrees


def test_drift_false_alarms_stay_within_the_stated_level():
    rng = np.random.default_rng(0)
    repeats = 500
    alarms = 0
    for _ in range(repeats):
        exits, disagrees = _stream(rng, 4000, [0.7], 0.01)  # exactly as at compile time, at the budget
        windows = stream_drift(exits, disagrees, expected_exit_rate=0.7, budget=0.01, windows=20)
        alarms += any(w.exits_fell or w.disagreement_above_budget for w in windows)
    # two families of tests, each at 5% over all windows: at most 10% plus binomial slack
    assert alarms <= binom.ppf(0.999, repeats, 0.10)


def test_an_exit_rate_measured_on_few_rows_is_compared_as_an_estimate():
    """The compile's exit rate comes from its own test rows: compared as an exact rate it flags streams
    exactly like the calibration data far above the stated level; compared with those rows (Fisher) it
    does not."""
    rng = np.random.default_rng(2)
    repeats, compile_rows = 500, 400
    alarms = {"estimate": 0, "exact": 0}
    for _ in range(repeats):
        measured = rng.binomial(compile_rows, 0.7) / compile_rows
        exits, disagrees = _stream(rng, 4000, [0.7], 0.005)
        for kind, rows in (("estimate", compile_rows), ("exact", None)):
            windows = stream_drift(exits, disagrees, expected_exit_rate=measured, budget=0.01, windows=20,
                                   compile_rows=rows)
            alarms[kind] += any(w.exits_fell for w in windows)
    limit = binom.ppf(0.999, repeats, 0.05)
    assert alarms["estimate"] <= limit < alarms["exact"], alarms


def test_drift_is_found_where_exits_fall():
    rng = np.random.default_rng(1)
    found, misplaced = 0, 0
    for _ in range(200):
        exits, disagrees = _stream(rng, 4000, [0.7, 0.45], 0.005)
        windows = stream_drift(exits, disagrees, expected_exit_rate=0.7, budget=0.01, windows=20, compile_rows=2000)
        flagged = [w.start for w in windows if w.exits_fell]
        found += bool(flagged)
        misplaced += any(start < 2000 for start in flagged)
    assert found >= 190 and misplaced <= 10


def test_projection_scales_with_time_per_row():
    projection = project_savings(0.002, 0.0015, qps=100, days=30, utilisation=0.5, device_hour_price=3.0)
    requests = 100 * 86_400 * 30
    assert projection["requests"] == requests
    assert projection["device_hours_original"] == pytest.approx(requests * 0.002 / 3600 / 0.5)
    assert projection["fraction_saved"] == pytest.approx(0.25)
    assert projection["cost_saved"] == pytest.approx(3.0 * projection["device_hours_saved"])
