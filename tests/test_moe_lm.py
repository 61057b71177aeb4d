"""The committed reference MoE LM on committed held-out text: what benchmarks/RESULTS.md reports about it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.moe_lm import load_model, perplexity
from models.train_moe_lm import SAMPLE, routing_entropy
from moco_compile.moe.trace import gate_parameters, routing_spec, trace_routing
from moco_compile.passes.moe.expert_predictors import fit_predictors, hit_rates


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model()


@pytest.fixture(scope="module")
def sample():
    with np.load(SAMPLE) as data:
        return {name: data[name] for name in data.files}


def test_the_reference_model_predicts_held_out_text_and_routes_with_balance(model, sample):
    assert perplexity(model, sample["test"]) < 5.0  # full test split: 4.49 per byte; uniform bytes: 256
    entropy = routing_entropy(model, sample["test"])
    assert min(entropy["load_entropy_bits"]) > 2.7  # of log2(8) = 3: every expert used
    assert max(entropy["gate_entropy_bits"]) < 2.0  # yet each token's gate is decided


def test_learned_estimator_beats_speculative_routing_at_every_layer(model, sample, tmp_path):
    calibration = trace_routing(model, sample["calibration"], tmp_path / "calibration.arrow")
    test = trace_routing(model, sample["test"][:, :-1], tmp_path / "test.arrow")
    predictors = fit_predictors(calibration, routing_spec(model), gate_parameters(model), max_rows=2000, lookahead=1)
    rates = hit_rates(predictors, test)
    assert all(learned > speculative for learned, speculative in zip(rates["learned"], rates["speculative"]))
    # within a token a later gate on an earlier state beats frequencies; across tokens it does not (the next
    # token is not seen yet), where only the learned probe beats them
    assert all(speculative > frequent for speculative, frequent in zip(rates["speculative"][:-1],
                                                                      rates["most_frequent"][:-1]))
    assert rates["learned"][-1] > rates["most_frequent"][-1] > rates["speculative"][-1]
