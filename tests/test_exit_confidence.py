"""Calibrated probabilities for exited rows: the temperature fit, the swap that keeps the exit's class on
top, the graph's nodes, and a compiled softmax-ending model whose full-model probabilities are soft.

The compiled model: ``guarded_soft`` (conftest): the reference CNN with ``Softmax(logits / 4)`` as its
output (a network whose probabilities are far less peaked than its rules': the case the issue
measured), 2,000 calibration rows, 5% budget, with an out-of-distribution guard.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from scipy.special import log_softmax, softmax

from moco_compile.constants import PROBABILITIES
from moco_compile.frame import ActivationFrame
from moco_compile.importer import import_model
from moco_compile.passes.calibration.calibrate import FeatureProbe, variant_features
from moco_compile.passes.calibration.exit_confidence import (TemperatureFitter, expected_calibration_error, exited_logits,
                                                 exited_logits_nodes)
from moco_compile.passes.graph.rewrite import insert_exits



def _rows(seed: int, rows: int = 500, classes: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=3.0, size=(rows, classes))


# -- the fit --------------------------------------------------------------------------------------------
def test_fit_recovers_the_temperature_that_made_the_full_models_probabilities():
    logits = _rows(0)
    log_probs = log_softmax(logits, axis=1).astype(np.float32)
    full = softmax(logits / 2.5, axis=1)
    scale = TemperatureFitter().fit(log_probs, log_probs, full)
    assert scale == pytest.approx(1 / 2.5, rel=1e-3)


def test_fit_minimises_the_binary_cross_entropy_of_the_emitted_class():
    """Pinned against a grid search of the same objective written out independently."""
    log_probs = log_softmax(_rows(1), axis=1).astype(np.float32)
    full = softmax(_rows(2), axis=1)
    margins = log_probs - np.array([0.0, -3.0, 0.0, 0.0, 0.0], np.float32)  # class 1 often wins the margins
    scale = TemperatureFitter().fit(log_probs, margins, full)

    def loss(s: float) -> float:
        top = softmax(exited_logits(log_probs, margins, s).astype(np.float64), axis=1).max(axis=1)
        target = full[np.arange(len(full)), margins.argmax(axis=1)]
        top = np.clip(top, 1e-300, 1 - 1e-16)
        return float(-(target * np.log(top) + (1 - target) * np.log1p(-top)).mean())

    grid = np.exp(np.linspace(np.log(0.01), np.log(100), 4001))
    best = grid[np.argmin([loss(s) for s in grid])]
    assert scale == pytest.approx(best, rel=5e-3)
    assert loss(scale) <= loss(best) + 1e-9


def test_fit_refuses_bad_bounds():
    with pytest.raises(ValueError, match="0 < low < high"):
        TemperatureFitter(bounds=(2.0, 1.0)).fit(np.zeros((3, 2)), np.zeros((3, 2)), np.full((3, 2), 0.5))


# -- the swap ---------------------------------------------------------------------------------------------
def test_the_exit_class_stays_on_top_and_the_confidence_is_kept():
    """Per-class thresholds let rows leave with a class the rule finds less probable than another:
    that class's scaled log-probability trades places with the largest one."""
    log_probs = log_softmax(_rows(3), axis=1).astype(np.float32)
    margins = log_probs - np.array([0.0, -30.0, 0.0, 0.0, 0.0], np.float32)
    carried = exited_logits(log_probs, margins, 0.7)
    cls = margins.argmax(axis=1)
    assert (cls != log_probs.argmax(axis=1)).mean() > 0.3  # the case exists in these rows
    np.testing.assert_array_equal(carried.argmax(axis=1), cls)
    np.testing.assert_allclose(np.sort(carried, axis=1), np.sort(0.7 * log_probs, axis=1), rtol=1e-6)
    agree = cls == log_probs.argmax(axis=1)
    np.testing.assert_allclose(carried[agree], 0.7 * log_probs[agree], rtol=1e-6)


def test_exited_logits_nodes_compute_the_numpy_values():
    log_probs = log_softmax(_rows(4), axis=1).astype(np.float32)
    margins = log_probs - np.array([0.0, -30.0, 0.0, 0.0, 0.0], np.float32)
    initializers: list = []
    nodes = exited_logits_nodes("log_probs", "margins", 0.7, "carried", "c", initializers)
    spec = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["n", 5])
            for name in ("log_probs", "margins", "carried")]
    model = helper.make_model(helper.make_graph(nodes, "swap", spec[:2], spec[2:], initializers),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    carried, = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]) \
        .run(None, {"log_probs": log_probs, "margins": margins})
    np.testing.assert_array_equal(carried, exited_logits(log_probs, margins, 0.7))


def test_expected_calibration_error_by_hand():
    confidence = np.array([0.95, 0.95, 0.55, 0.55, 0.55, 0.55])
    correct = np.array([True, True, True, False, False, False])
    # bin of 0.95: accuracy 1, |1 - 0.95| = 0.05 (2 rows); bin of 0.55: accuracy 0.25, 0.30 (4 rows)
    assert expected_calibration_error(confidence, correct) == pytest.approx((2 * 0.05 + 4 * 0.30) / 6)


# -- a compiled softmax-ending model with soft probabilities ----------------------------------------------
@pytest.fixture(scope="module")
def soft(guarded_soft):
    return guarded_soft[:2]


@pytest.fixture(scope="module")
def unseen(calibration, guarded_soft) -> np.ndarray:
    """Calibration-like rows the compile did not see."""
    rows = guarded_soft[2]
    return calibration["images"][rows:rows + 1000]


def _run(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]) \
        .run(None, {"images": images})


def test_exited_rows_carry_the_full_models_confidence(soft, unseen):
    model, result = soft
    assert all(e.confidence_scale is not None and e.confidence_scale < 1 for e in result.plan.exits)
    images = unseen
    probabilities, exits = _run(result.model, images)
    full, = _run(model, images)
    exited = exits >= 0
    assert exited.mean() > 0.3
    compiled_top, full_top = probabilities[exited].max(axis=1), full[exited].max(axis=1)
    assert abs(compiled_top.mean() - full_top.mean()) < 0.05
    report = result.report["exited_confidence"]
    assert report["mean_top_probability_uncalibrated"] > report["mean_top_probability_full_model"] + 0.2
    assert abs(report["mean_top_probability"] - report["mean_top_probability_full_model"]) < 0.05
    # this network is underconfident against the labels: calibrated exits inherit its calibration error
    assert abs(report["ece"] - report["ece_full_model"]) < 0.05 < report["ece_full_model"] - report["ece_uncalibrated"]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert result.report["verification"]["exited_argmax_matches_rule"]


def test_graph_carries_the_plans_calibrated_probabilities(soft, unseen):
    """Exited rows' outputs equal the softmax of :func:`exited_logits` on the plan's scores."""
    model, result = soft
    plan = result.plan
    images = unseen[:300]
    imported = import_model(model)
    frame = ActivationFrame.from_arrays(FeatureProbe(imported.model, imported.output,
                                                     [e.cut for e in plan.exits])({"images": images}, "rows"))
    assert np.allclose(frame[PROBABILITIES].sum(axis=1), 1.0, atol=1e-5)
    features = [variant_features(frame, e.column, e.pooling) for e in plan.exits]
    routing = plan.routing(features, len(images))
    probabilities, exits = _run(result.model, images)
    for k, exit_ in enumerate(plan.exits):
        rows = (exits == k) & (routing.exit_index == k) & ~routing.near_threshold
        log_probs = exit_.scores(features[k][rows])
        expected = softmax(exited_logits(log_probs, log_probs - exit_.thresholds, exit_.confidence_scale), axis=1)
        np.testing.assert_allclose(probabilities[rows], expected, atol=1e-5)


def test_a_class_with_a_far_lower_threshold_stays_the_argmax(soft, unseen):
    """Thresholds that let class 0 leave wherever its log-probability is above -50: rows leave with
    class 0 though the rule finds another class more probable, and their output's argmax is 0."""
    model, result = soft
    first = result.plan.exits[0]
    thresholds = np.where(np.arange(10) == 0, -50.0, np.maximum(first.thresholds, -0.01)).astype(np.float32)
    compiled = insert_exits(import_model(model).model, [replace(first, thresholds=thresholds)], "probabilities")
    images = unseen[:300]
    probabilities, exits = _run(compiled, images)
    exited = exits == 0
    full, = _run(model, images)
    assert exited.mean() > 0.9 and (full[exited].argmax(axis=1) != 0).mean() > 0.5
    assert (probabilities[exited].argmax(axis=1) == 0).all()
