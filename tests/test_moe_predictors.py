"""Routing traces and the predictors of the next layer's experts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moco_compile.errors import TraceMismatchError
from moco_compile.frame import ActivationFrame
from moco_compile.moe.frame import POSITION, RoutingSpec, WINDOW, check_trace, experts_column, hidden_column
from moco_compile.moe.trace import gate_parameters, routing_spec, trace_routing
from moco_compile.passes.moe.expert_predictors import (PREDICTORS, FittedPredictors, distance_rows, fit_predictors,
                                                   held_out_windows, hit_rates, previous_experts, recall_at_k)
from tests.moe_helpers import tiny_model


def test_trace_records_what_enters_each_moe_layer_and_the_experts_it_chose(tmp_path):
    model = tiny_model()
    windows = np.random.default_rng(0).integers(0, 256, (6, 16))
    frame = trace_routing(model, windows, tmp_path / "trace.arrow", batch=4)
    spec = routing_spec(model)
    check_trace(frame, spec)
    assert len(frame) == 6 * 16 and list(frame[POSITION][:17]) == [*range(16), 0]
    with torch.no_grad():  # layer 0's input by hand: embedding + attention of block 0
        block = model.blocks[0]
        x = model.embed_at(torch.from_numpy(windows[:1]))
        hidden = (x + block.attention(block.norm1(x)))[0]
        _, chosen, _ = block.moe.route(block.norm2(hidden))
    np.testing.assert_allclose(frame[hidden_column(0)][:16], hidden.numpy(), atol=1e-6)
    np.testing.assert_array_equal(frame[experts_column(0)][:16], chosen.numpy())


def test_speculative_routing_on_a_layers_own_input_is_its_gate(tmp_path):
    """Fed the hidden state entering layer t itself (not t-1), speculative routing must be exact."""
    model = tiny_model()
    frame = trace_routing(model, np.random.default_rng(1).integers(0, 256, (4, 16)), tmp_path / "t.arrow")
    predictors = fit_predictors(frame, routing_spec(model), gate_parameters(model), max_rows=200)
    for target in (1, 2):
        scores = predictors.scores("speculative", target - 1, 1, frame[hidden_column(target)],
                                   previous_experts(frame, target))
        assert recall_at_k(scores, frame[experts_column(target)]) == 1.0


def test_recall_at_k_by_hand():
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.8, 0.9]])
    assert recall_at_k(scores, np.array([[0, 1], [0, 1]])) == pytest.approx(0.5)
    assert recall_at_k(scores, np.array([[1, 2], [3, 2]])) == pytest.approx(0.75)


def _planted_trace(rows: int, seed: int) -> tuple[ActivationFrame, RoutingSpec, dict]:
    """Layer 1's experts are the top-2 of a fixed linear map of layer 0's hidden state that its own gate
    does not know: a learned estimator can find it, speculative routing cannot."""
    rng = np.random.default_rng(seed)
    d, e = 16, 8
    truth = np.random.default_rng(99).normal(size=(d, e))
    hidden = rng.normal(size=(2, rows, d)).astype(np.float32)
    experts0 = np.argsort(-(hidden[0] @ rng.normal(size=(d, e))), axis=1)[:, :2]
    experts1 = np.argsort(-(hidden[0] @ truth), axis=1)[:, :2]
    columns = {WINDOW: np.arange(rows) // 10, POSITION: np.arange(rows) % 10,
               hidden_column(0): hidden[0], experts_column(0): experts0.astype(np.int16),
               hidden_column(1): hidden[1], experts_column(1): experts1.astype(np.int16)}
    gates = {"norm_weight": np.ones((2, d), np.float32), "norm_bias": np.zeros((2, d), np.float32),
             "norm_eps": np.full(2, 1e-5, np.float32),
             "gate_weight": np.random.default_rng(7).normal(size=(2, e, d)).astype(np.float32)}
    return ActivationFrame.from_arrays(columns), RoutingSpec(2, e, 2, d), gates


def test_learned_estimator_finds_a_planted_routing_rule_on_held_out_rows():
    frame, spec, gates = _planted_trace(3000, seed=0)
    held = held_out_windows(frame, 0.3, seed=0)
    predictors = fit_predictors(frame.take(~held), spec, gates)
    rates = hit_rates(predictors, frame.take(held))
    assert rates["learned"][0] > 0.8  # measured 0.845
    assert rates["speculative"][0] < 0.5 and rates["most_frequent"][0] < 0.5  # chance: 2 of 8 -> 0.25 recall
    assert set(rates) == set(PREDICTORS)


def test_previous_token_experts_stop_at_window_starts():
    frame, _, _ = _planted_trace(30, seed=1)
    previous = previous_experts(frame, 1)
    chosen = frame[experts_column(1)]
    assert (previous[::10] == -1).all()
    np.testing.assert_array_equal(previous[1:10], chosen[:9])


def test_predictors_round_trip_and_count_their_flops(tmp_path):
    frame, spec, gates = _planted_trace(200, seed=2)
    predictors = fit_predictors(frame, spec, gates)
    predictors.save(tmp_path / "p.npz")
    loaded = FittedPredictors.load(tmp_path / "p.npz")
    hidden, previous = frame[hidden_column(0)], previous_experts(frame, 1)
    for name in PREDICTORS:
        np.testing.assert_array_equal(loaded.scores(name, 0, 1, hidden, previous),
                                      predictors.scores(name, 0, 1, hidden, previous))
    d, e = 16, 8
    assert loaded.flops("speculative") == 8 * d + 2 * d * e
    assert loaded.flops("learned") == loaded.flops("speculative") + 2 * (d + 2 * e) * e + 5 * e
    assert loaded.flops("most_frequent") == loaded.flops("previous_token") == 0


def test_a_trace_whose_layers_do_not_match_the_model_is_refused(tmp_path):
    model = tiny_model()
    frame = trace_routing(model, np.zeros((2, 8), np.int64), tmp_path / "t.arrow")
    with pytest.raises(TraceMismatchError, match="do not match the model's 4 MoE layers"):
        check_trace(frame, RoutingSpec(4, 8, 2, 32))
    with pytest.raises(TraceMismatchError, match="width 64"):
        check_trace(frame, RoutingSpec(3, 8, 2, 64))
    with pytest.raises(TraceMismatchError, match="num_layers 3 vs 4"):
        routing_spec(model).check(RoutingSpec(4, 8, 2, 32), "trace")
    with pytest.raises(TraceMismatchError, match="moco moe fit-predictors"):
        FittedPredictors.load(tmp_path / "t.arrow")


def _next_token_trace(rows: int, seed: int) -> tuple[ActivationFrame, RoutingSpec, dict]:
    """Two layers; the NEXT token's layer-0 experts are a fixed linear map of this token's layer-1 hidden state."""
    frame, spec, gates = _planted_trace(rows, seed)
    columns = {name: np.array(frame[name]) for name in frame.columns}
    truth = np.random.default_rng(98).normal(size=(spec.d_model, spec.num_experts))
    experts = np.argsort(-(columns[hidden_column(1)] @ truth), axis=1)[:, :2]
    columns[experts_column(0)][1:] = experts[:-1].astype(np.int16)
    return ActivationFrame.from_arrays(columns), spec, gates


def test_a_probe_per_distance_finds_a_rule_one_token_ahead():
    frame, spec, gates = _next_token_trace(3000, seed=3)
    held = held_out_windows(frame, 0.3, seed=0)
    predictors = fit_predictors(frame.take(~held), spec, gates)
    assert predictors.lookahead == 2 and predictors.target(1, 1) == (1, 0) and predictors.target(1, 2) == (1, 1)
    rates = hit_rates(predictors, frame.take(held), distance=1)
    assert rates["learned"][1] > 0.8  # from layer 1 to the next token's layer 0; chance 0.25
    assert rates["most_frequent"][1] < 0.5
    rows, targets, layer, previous = distance_rows(frame, spec, 1, 1)
    windows = frame[WINDOW]
    assert layer == 0 and (targets == rows + 1).all() and (windows[rows] == windows[targets]).all()
    assert len(rows) == len(frame) - len(np.unique(windows))  # every token but each window's last
    np.testing.assert_array_equal(previous, frame[experts_column(0)][rows])  # the target's predecessor: the source
    probabilities = predictors.use_probabilities("learned", 1, 1, frame[hidden_column(1)][:50], previous[:50])
    assert probabilities.shape == (50, 8) and (probabilities >= 0).all() and (probabilities <= 1).all()
    assert (probabilities.sum(axis=1) <= 2 + 1e-5).all()  # k = 2 times a share, clipped at 1


def test_bad_predictor_requests_are_refused(tmp_path):
    frame, spec, gates = _planted_trace(200, seed=4)
    predictors = fit_predictors(frame, spec, gates, lookahead=1)
    hidden, previous = frame[hidden_column(0)], previous_experts(frame, 1)
    with pytest.raises(ValueError, match="distances 1..1"):
        predictors.scores("learned", 0, 2, hidden, previous)
    with pytest.raises(ValueError, match="gives no probabilities"):
        predictors.use_probabilities("previous_token", 0, 1, hidden, previous)
    with pytest.raises(ValueError, match="lookahead must be 1..2"):
        fit_predictors(frame, spec, gates, lookahead=3)
    old = tmp_path / "old.npz"  # the layout before probes per distance: one per target layer
    np.savez(old, spec=np.array([2, 8, 2, 16]), frequency=predictors.frequency,
             learned_weight=predictors.learned_weight[:1, 0], learned_bias=predictors.learned_bias[:1, 0],
             **{f"gates.{key}": value for key, value in gates.items()})
    with pytest.raises(TraceMismatchError, match="fit them with `moco moe fit-predictors`"):
        FittedPredictors.load(old)
