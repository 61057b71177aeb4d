"""The reference CNN's certified plan on its whole shipped calibration set, pinned.

A refactor must not change what moco builds: these figures were printed by ``compile`` at
commit 0d0df57 (before the layout change of issue 25) and again after it, on the same 10,000
rows. Exits, family and the test's counts must match exactly; thresholds and figures within
float noise (a different CPU's BLAS may move a fitted weight in its last bits, never a count).
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import CALIBRATION_NPZ, REFERENCE_ONNX

PINNED = {
    "exits": [("relu_2", "layer1.0", "grid+max"), ("relu_6", "layer2.0", "grid+max"), ("relu_10", "layer3.0", "grid")],
    "threshold": -0.05702858790755272,  # the shared family: one log-probability threshold, every class on
    "confidence_scales": [1.0933679927157973, 0.8657620891514504, 0.6914007913449522],
    "family": "shared",
    "test_rows": 5000,
    "family_size": 740,
    "plans_certified": 628,
    "chosen_plan": 627,
    "disagreements": 38,
    "near_threshold_rows": 0,
    "p_value": 0.04656573877667938,
    "compute_reduction": 0.5165392673401532,
}


@pytest.fixture(scope="module")
def reference_build():
    from moco_compile import compile

    with np.load(CALIBRATION_NPZ) as data:
        calibration = {name: data[name] for name in data.files}
    return compile(REFERENCE_ONNX, calibration, measure_latency=False, show_progress=False)


@pytest.mark.slow
def test_the_reference_cnn_plan_is_the_pinned_one(reference_build):
    plan, certificate = reference_build.plan, reference_build.plan.certificate
    assert [(e.cut.tensor, e.cut.module, e.pooling) for e in plan.exits] == PINNED["exits"]
    for exit_, scale in zip(plan.exits, PINNED["confidence_scales"]):
        assert np.allclose(exit_.thresholds, PINNED["threshold"], rtol=0, atol=1e-5)
        assert exit_.confidence_scale == pytest.approx(scale, abs=1e-3)
    for key in ("family", "test_rows", "family_size", "plans_certified", "chosen_plan", "disagreements",
                "near_threshold_rows"):
        assert certificate[key] == PINNED[key], key
    assert certificate["p_value"] == pytest.approx(PINNED["p_value"], rel=1e-9)
    assert reference_build.report["compute_reduction"] == pytest.approx(PINNED["compute_reduction"], abs=1e-6)
