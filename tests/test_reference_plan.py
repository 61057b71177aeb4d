"""The reference CNN's certified plan on its shipped calibration set, pinned.

A refactor must not change what moco builds.  The suite's shared compile (``compiled``: the
first 4,000 rows of ``models/artifacts/fashion_calib.npz``, default budget) gave the softmax-probe
plan at commit 0d0df57, before the layout change of issue 25, and after it (the whole 10,000-row set
and the 6-block MiniLM reference were checked identical too, once).  Since MLP exit heads are tried
(issue 28; from 1,000 rule-fitting rows until that floor was dropped, which left this plan alone) the
plan has MLP heads at every exit and saves 55.4% on the report rows where the probes saved 47.0%.  Since MLP heads may read a
3x3 grid (``grid3``) this draw's plan saves 52.1% (three random 4,000-row draws: 54.2 / 54.7 / 57.1% with
it, 51.8 / 52.5 / 54.7% without); these figures were pinned then.  Exits, heads, family and the test's counts must match exactly; thresholds and figures within
float noise (a different CPU's BLAS may move a fitted weight in its last bits, never a count).
"""
from __future__ import annotations

import numpy as np
import pytest

PINNED = {
    "exits": [("relu_2", "layer1.0", "grid3"), ("relu_4", "layer1", "grid3"), ("relu_6", "layer2.0", "grid+max"),
              ("relu_8", "layer2", "grid3"), ("relu_10", "layer3.0", "grid3+max")],
    "heads": ["MLPScores"] * 5,
    "threshold": -0.05023009330034256,  # the shared-all family: one log-probability threshold, every class on
    "confidence_scales": [1.1595610836146626, 0.9336393343808385, 0.9639658625449005, 1.224157920635217,
                          1.1655082939885737],
    "family": "shared-all",
    "test_rows": 2000,
    "family_size": 760,
    "plans_certified": 561,
    "chosen_plan": 560,
    "disagreements": 12,
    "near_threshold_rows": 0,
    "p_value": 0.03830767761147372,
    "compute_reduction": 0.5214559955321885,
}


def test_the_reference_cnn_plan_is_the_pinned_one(compiled):
    build = compiled[0]
    plan, certificate = build.plan, build.plan.certificate
    assert [(e.cut.tensor, e.cut.module, e.pooling) for e in plan.exits] == PINNED["exits"]
    assert [type(e.scores).__name__ for e in plan.exits] == PINNED["heads"]
    for exit_, scale in zip(plan.exits, PINNED["confidence_scales"]):
        assert np.allclose(exit_.thresholds, PINNED["threshold"], rtol=0, atol=1e-5)
        assert exit_.confidence_scale == pytest.approx(scale, abs=1e-3)
    for key in ("family", "test_rows", "family_size", "plans_certified", "chosen_plan", "disagreements",
                "near_threshold_rows"):
        assert certificate[key] == PINNED[key], key
    assert certificate["p_value"] == pytest.approx(PINNED["p_value"], rel=1e-9)
    assert build.report["compute_reduction"] == pytest.approx(PINNED["compute_reduction"], abs=1e-6)
