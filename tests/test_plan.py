"""Routing semantics and the plan certificate."""
from __future__ import annotations

import numpy as np
import pytest

from moco_compile.passes.calibrate import variant_features
from moco_compile.passes.bounds import binomial_p_value, clopper_pearson_upper, rows_needed
from moco_compile.passes.plan import ExitPlan, route


def test_rows_leave_at_the_first_exit_with_a_positive_margin():
    first = np.array([[0.5, -1.0], [-0.2, -0.1], [-1.0, 2.0]])
    second = np.array([[3.0, 0.0], [-0.5, 0.4], [0.0, 9.0]])
    exit_index, exit_class = route([first, second])
    assert exit_index.tolist() == [0, 1, 0]
    assert exit_class.tolist() == [0, 1, 1]


def test_rows_with_no_positive_margin_run_the_full_network():
    exit_index, exit_class = route([np.full((3, 4), -np.inf)])
    assert exit_index.tolist() == [-1, -1, -1] and exit_class.tolist() == [-1, -1, -1]


def test_binomial_statistics():
    assert rows_needed(0.01, 0.95) == 299
    assert binomial_p_value(0, 299, 0.01) <= 0.05 < binomial_p_value(0, 298, 0.01)
    assert clopper_pearson_upper(0, 299, 0.95) == pytest.approx(0.01, rel=0.01)


def test_certificate_matches_the_test_split(compiled):
    """Re-derive the certified figures from the stored frame and the plan."""
    from moco_compile.api import SPLITS

    result, _ = compiled
    certificate = result.plan.certificate
    frame = result.frame
    test = frame[frame["split"] == SPLITS.index("test")]
    evaluation = result.plan.evaluate([variant_features(test, e.column, e.pooling) for e in result.plan.exits],
                                      test["predictions"])
    assert len(test) == certificate["test_rows"]
    assert round(evaluation.disagreement * len(test)) == certificate["disagreements"]
    assert certificate["p_value"] == pytest.approx(
        binomial_p_value(certificate["disagreements"], certificate["test_rows"], certificate["max_disagreement"]))
    assert certificate["plans_tested"] <= certificate["family_size"]
    assert result.report["splits"]["test"] == certificate["test_rows"]
    assert sum(result.report["splits"].values()) == len(frame)


def test_plan_round_trips_through_json(compiled):
    result, _ = compiled
    again = ExitPlan.from_dict(result.plan.to_dict())
    features = [variant_features(result.frame[:300], e.column, e.pooling) for e in again.exits]
    predictions = result.frame["predictions"][:300]
    np.testing.assert_array_equal(again.evaluate(features, predictions).exit_index,
                                  result.plan.evaluate(features, predictions).exit_index)


def test_each_plan_family_is_certified_at_a_bonferroni_share(compiled):
    certificate = compiled[0].plan.certificate
    assert set(certificate["families"]) == {"per-class", "shared"}
    assert certificate["family_confidence"] == pytest.approx(1 - (1 - certificate["confidence"]) / 2)
    assert certificate["p_value"] <= 1 - certificate["family_confidence"]
    # the chosen family is the certified one that saves most on the test split
    assert certificate["test_compute_reduction"] == max(v for v in certificate["families"].values() if v is not None)
    assert certificate["families"][certificate["family"]] == certificate["test_compute_reduction"]


def test_shared_family_sets_one_threshold_for_every_open_exit(compiled, plan_split):
    from moco_compile.passes.plan import ExitPlanner

    result, _ = compiled
    plan = ExitPlanner(0.01, families=("shared",)).fit(result.plan.exits, plan_split(result, "rules"),
                                                       plan_split(result, "test"), result.plan.total_flops)
    assert plan.exits and plan.certificate["family"] == "shared"
    assert plan.certificate["family_confidence"] == pytest.approx(0.95)
    thresholds = np.concatenate([e.thresholds for e in plan.exits])
    assert np.isfinite(thresholds).all() and np.unique(thresholds).size == 1
    with pytest.raises(ValueError, match="families"):
        ExitPlanner(families=("greedy",))
