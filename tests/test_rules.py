"""Rule fitting: the fitted scores must evaluate the same in float32 whatever the batch."""
from __future__ import annotations

import numpy as np
import pytest

from moco_compile.passes.calibration.rules import OneVsRestRuleFitter, SoftmaxRuleFitter


@pytest.mark.parametrize("fitter", [SoftmaxRuleFitter(), OneVsRestRuleFitter()])
def test_a_near_constant_feature_does_not_make_logits_cancel_in_float32(fitter):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 2000)
    informative = rng.normal(0, 1, (2000, 8)) + 2.0 * np.eye(3)[targets] @ rng.normal(0, 1, (3, 8))
    # a text model's CLS embedding: the same value in every row up to float32 noise
    constant = 1.0 + rng.normal(0, 7e-9, (2000, 4))
    features = np.concatenate([informative, constant], axis=1).astype(np.float32)
    rule = fitter.fit(features, targets, 3)
    exact = features.astype(np.float64) @ rule.weight.astype(np.float64) + rule.bias
    batched = features @ rule.weight + rule.bias
    one_by_one = np.concatenate([features[i:i + 1] @ rule.weight + rule.bias for i in range(200)])
    # the rounding bound of passes.routing assumes logits move by at most 5e-5
    assert np.abs(batched - exact).max() < 1e-5 and np.abs(one_by_one - exact[:200]).max() < 1e-5
    assert (rule(features).argmax(axis=1) == targets).mean() > 0.8  # and the rule still learns
