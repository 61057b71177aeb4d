"""The reference CNN's certified plan on its shipped calibration set, pinned.

A refactor must not change what moco builds.  The suite's shared compile (``compiled``: the
first 4,000 rows of ``models/artifacts/fashion_calib.npz``, default budget) gave these figures
once MLP exit heads joined the default (issue 28; with linear heads only it gave 47.0% at 0d0df57
and through the layout change of issue 25).  Exits,
family and the test's counts must match exactly; thresholds and figures within float noise (a
different CPU's BLAS may move a fitted weight in its last bits, never a count).
"""
from __future__ import annotations

import numpy as np
import pytest

PINNED = {
    "exits": [("relu_2", "layer1.0", "grid+max", "LinearScores"), ("relu_4", "layer1", "grid+max", "MLPScores"),
              ("relu_6", "layer2.0", "grid+max", "MLPScores"), ("relu_8", "layer2", "grid", "MLPScores"),
              ("relu_10", "layer3.0", "mean", "MLPScores")],
    "threshold": -0.03214694559574127,  # the shared-all family: one log-probability threshold, every class on
    "confidence_scales": [1.179998656408129, 0.8176226815420343, 0.7489149471768867, 0.9382724187448942,
                          0.9227049596345526],
    "family": "shared-all",
    "test_rows": 2000,
    "family_size": 686,
    "plans_certified": 561,
    "chosen_plan": 560,
    "disagreements": 12,
    "near_threshold_rows": 0,
    "p_value": 0.03830767761147372,
    "compute_reduction": 0.5076649183704804,
}


def test_the_reference_cnn_plan_is_the_pinned_one(compiled):
    build = compiled[0]
    plan, certificate = build.plan, build.plan.certificate
    assert [(e.cut.tensor, e.cut.module, e.pooling, type(e.scores).__name__) for e in plan.exits] == PINNED["exits"]
    for exit_, scale in zip(plan.exits, PINNED["confidence_scales"]):
        assert np.allclose(exit_.thresholds, PINNED["threshold"], rtol=0, atol=1e-5)
        assert exit_.confidence_scale == pytest.approx(scale, abs=1e-3)
    for key in ("family", "test_rows", "family_size", "plans_certified", "chosen_plan", "disagreements",
                "near_threshold_rows"):
        assert certificate[key] == PINNED[key], key
    assert certificate["p_value"] == pytest.approx(PINNED["p_value"], rel=1e-9)
    assert build.report["compute_reduction"] == pytest.approx(PINNED["compute_reduction"], abs=1e-6)
