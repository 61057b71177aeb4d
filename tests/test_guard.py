"""The out-of-distribution guard: its statistic, routing with it, the graph, the certificate, bad input.

The compile: ``guarded_soft`` (conftest: the reference CNN with a softmax head, 2,000 calibration
rows, 5% budget, ``ood_guard=0.01``); unfamiliar rows are uniform-noise images.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from sklearn.covariance import ledoit_wolf

from moco_compile import compile
from moco_compile.constants import EXIT_OUTPUT
from moco_compile.frame import ActivationFrame
from moco_compile.importer import import_model
from moco_compile.passes.calibration.calibrate import FeatureProbe, variant_features
from moco_compile.passes.calibration.guard import GuardFitter, guard_nodes
from moco_compile.passes.graph.rewrite import insert_exits
from moco_compile.passes.planning.config import Budget, PlannerConfig
from moco_compile.passes.planning.counts import Split, count_plans
from moco_compile.passes.planning.routing import GuardVerdicts, route, route_scores
from moco_compile.passes.planning.splits import SPLITS
from moco_compile.passes.planning.types import Exit, ExitPlan

BUDGET = 0.05  # as guarded_soft compiles
LEVEL = 0.01


def _gaussian_classes(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes in 6 correlated dims with features on very different scales."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(6, 6))
    targets = rng.integers(0, 3, rows)
    centres = np.random.default_rng(98).normal(scale=3.0, size=(3, 6))
    features = (rng.normal(size=(rows, 6)) @ mixing + centres[targets]) * np.array([1, 10, 100, 1e-2, 1, 5])
    return features.astype(np.float32), targets


# -- the statistic ------------------------------------------------------------------------------------
def test_guard_distance_is_the_mahalanobis_distance_to_the_nearest_class_mean():
    """Pinned against an independent computation in float64 (standardise, Ledoit-Wolf within-class
    covariance, squared Mahalanobis distance to each class mean, minimum)."""
    features, targets = _gaussian_classes(600, seed=0)
    guard = GuardFitter(level=0.05).fit(features, targets)
    rows = _gaussian_classes(50, seed=1)[0]
    x = features.astype(np.float64)
    mean, scale = x.mean(0), x.std(0)
    standard = (x - mean) / scale
    centres = np.stack([standard[targets == c].mean(0) for c in range(3)])
    precision = np.linalg.inv(ledoit_wolf(standard - centres[targets], assume_centered=True)[0])
    offsets = ((rows - mean) / scale)[:, None, :] - centres[None]
    expected = np.einsum("ncd,de,nce->nc", offsets, precision, offsets).min(axis=1)
    np.testing.assert_allclose(guard.distances(rows), expected, rtol=1e-4)


def test_guard_turns_away_about_its_level_of_familiar_rows_and_every_far_row():
    features, targets = _gaussian_classes(3000, seed=0)
    guard = GuardFitter(level=0.05).fit(features, targets)
    fresh, _ = _gaussian_classes(20_000, seed=2)
    rate = float((guard.distances(fresh) > guard.threshold).mean())
    assert 0.03 < rate < 0.07  # cross-fitted threshold: near the level on new rows of the same kind
    far = fresh[:200] + 20 * fresh.std(axis=0)
    assert (guard.distances(far) > guard.threshold).all()


def test_wide_features_are_checked_along_their_principal_directions():
    """Beyond ``max_width`` features the guard whitens only the principal within-class directions:
    a [D, max_width] matrix, and rows far from the fitting rows are still turned away."""
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(800, 8))
    features = (latent @ rng.normal(size=(8, 300)) + 0.1 * rng.normal(size=(800, 300))).astype(np.float32)
    targets = (latent[:, 0] > 0).astype(np.int64)
    guard = GuardFitter(level=0.05, max_width=16).fit(features, targets)
    assert guard.weight.shape == (300, 16) and guard.means.shape == (2, 16)
    assert (guard.distances(rng.normal(scale=5.0, size=(200, 300)).astype(np.float32)) > guard.threshold).all()
    assert (guard.distances(features[:400]) > guard.threshold).mean() < 0.1


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5])
def test_guard_level_outside_zero_one_is_refused(level):
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        GuardFitter(level=level).fit(*_gaussian_classes(100, seed=0))
    with pytest.raises(ValueError, match=r"ood_guard must be in \(0, 1\)"):
        PlannerConfig(ood_guard=level)


def test_guard_nodes_compute_the_numpy_distance():
    """The graph's float32 distance is numpy's within a small fraction of the rounding the
    certificate allows for (``PlannerConfig.guard_rounding``, relative to the threshold)."""
    features, targets = _gaussian_classes(600, seed=0)
    guard = GuardFitter(level=0.05).fit(features, targets)
    initializers: list = []
    nodes = guard_nodes(guard, "features", "unfamiliar", "guard", 18, initializers)
    graph = helper.make_graph(nodes, "guard", [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT,
                                                                             ["n", 6])],
                              [helper.make_tensor_value_info(name, elem, ["n"]) for name, elem in
                               (("unfamiliar", onnx.TensorProto.BOOL), ("guard/distance", onnx.TensorProto.FLOAT))],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    rows = np.concatenate([_gaussian_classes(500, seed=3)[0], 5 * _gaussian_classes(500, seed=4)[0]])
    unfamiliar, distance = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]) \
        .run(None, {"features": rows})
    assert np.abs(distance - guard.distances(rows)).max() <= 0.01 * PlannerConfig().guard_rounding * guard.threshold
    np.testing.assert_array_equal(unfamiliar, guard.distances(rows) > guard.threshold)
    assert 0 < unfamiliar.mean() < 1


# -- routing with the guard ------------------------------------------------------------------------------
def test_a_guarded_row_cannot_leave_there_and_may_leave_later():
    first = np.array([[1.0, -1.0], [1.0, -1.0], [-1.0, -1.0]])
    second = np.array([[2.0, -1.0], [-1.0, -1.0], [-1.0, 3.0]])
    no = np.zeros(3, bool)
    guard = GuardVerdicts((np.array([True, True, False]), no), (no, no))
    routing = route([first, second], costs=np.array([1.0, 2.0, 10.0]), guard=guard)
    assert routing.exit_index.tolist() == [1, -1, 1]
    assert routing.exit_class.tolist() == [0, -1, 1]
    assert routing.cost.tolist() == [2.0, 10.0, 2.0]
    assert not routing.near_threshold.any()


def test_rows_within_rounding_of_the_guard_threshold_may_go_either_way():
    """Row 0: the rule fires with the full model's class, the guard may or may not block: near, harmless.
    Row 1: same with another class: near, and counted.  Row 2: within rounding of the guard but its
    margin cannot fire: not near.  Row 3: certainly blocked with a wrong class: not counted."""
    margins = np.array([[1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0], [-1.0, 1.0]])
    predictions = np.array([0, 0, 0, 0])
    guard = GuardVerdicts((np.array([True, False, True, True]),), (np.array([True, True, True, False]),))
    routing = route([margins], full_predictions=predictions, guard=guard)
    assert routing.exit_index.tolist() == [-1, 0, -1, -1]
    assert routing.near_threshold.tolist() == [True, True, False, False]
    assert routing.could_disagree.tolist() == [False, True, False, False]


def test_route_scores_reads_the_guard_of_each_open_exit():
    scores = [np.array([[0.0, -5.0]]), np.array([[0.0, -5.0]]), np.array([[0.0, -5.0]])]
    thresholds = np.array([[-1.0, -1.0], [np.inf, np.inf], [-1.0, -1.0]])
    blocked = GuardVerdicts((np.array([True]), np.array([False]), np.array([False])), (np.zeros(1, bool),) * 3)
    assert route_scores(scores, thresholds, guard=blocked).exit_index.tolist() == [2]


# -- a compiled reference CNN with the guard ---------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(guarded_soft):
    return guarded_soft[1]


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(0).random((256, 1, 28, 28), dtype=np.float32)


@pytest.fixture(scope="module")
def unseen(calibration, guarded_soft) -> np.ndarray:
    """Calibration-like rows the compile did not see."""
    rows = guarded_soft[2]
    return calibration["images"][rows:rows + 256]


def _exits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([EXIT_OUTPUT], {"images": images})[0]


def test_every_exit_has_its_guard_in_the_graph(guarded):
    plan = guarded.plan
    assert plan.exits and all(e.guard is not None and e.guard.level == LEVEL for e in plan.exits)
    graph, guards = guarded.model.graph, 0
    while True:  # one level per exit: the guard's nodes beside the exit's If
        names = {node.name for node in graph.node}
        level = sum(name.endswith("/guard/whiten") for name in names)
        ifs = [node for node in graph.node if node.op_type == "If"]
        if not ifs:
            break
        assert level == 1 and any(node.op_type == "Or" for node in graph.node)
        guards += level
        graph = next(a.g for a in ifs[0].attribute if a.name == "then_branch")
    assert guards == len(plan.exits)
    assert guarded.report["ood_guard"] == LEVEL and "guard" in guarded.report["traffic_scope"]
    assert all(item["guard_rate"] is not None for item in guarded.report["exits"])


def test_the_guard_sends_noise_rows_to_the_full_network(guarded, noise, guarded_soft):
    unguarded = [replace(e, guard=None) for e in guarded.plan.exits]
    model = import_model(guarded_soft[0]).model
    without = _exits(insert_exits(model, unguarded, "probabilities"), noise)
    with_guard = _exits(guarded.model, noise)
    assert (without >= 0).mean() > 0.5  # the rules alone take most noise rows
    assert (with_guard >= 0).mean() < 0.1, (without >= 0).mean()


def test_graph_routes_noise_rows_as_the_plan_simulates(guarded, noise, unseen, guarded_soft):
    """The rows where the guard decides: the graph's exits equal the plan's routing (rows within
    rounding of a threshold excepted), with the tolerance the certificate used."""
    plan = guarded.plan
    imported = import_model(guarded_soft[0])
    probe = FeatureProbe(imported.model, imported.output, [e.cut for e in plan.exits])
    mixed = np.concatenate([noise, unseen])
    frame = ActivationFrame.from_arrays(probe({"images": mixed}, "rows"))
    routing = plan.routing([variant_features(frame, e.column, e.pooling) for e in plan.exits], len(mixed),
                           PlannerConfig().rounding)
    exits = _exits(guarded.model, mixed)
    assert ((exits == routing.exit_index) | routing.near_threshold).all()
    assert routing.near_threshold.sum() <= 2
    assert (routing.exit_index[:256] < 0).mean() > 0.9 and (routing.exit_index[256:] >= 0).mean() > 0.5


def test_the_whole_batch_layout_routes_guarded_rows_as_the_nested_graph(guarded, noise, unseen, guarded_soft):
    """Whole-batch, an exit goes on while any row is undecided or turned away by its guard: noise and
    calibration-like rows, together and one at a time, leave where and with what the nested graph gives."""
    model = import_model(guarded_soft[0]).model
    whole = ort.InferenceSession(insert_exits(model, guarded.plan.exits, "probabilities", "whole-batch")
                                 .SerializeToString(), providers=["CPUExecutionProvider"])
    nested = ort.InferenceSession(guarded.model.SerializeToString(), providers=["CPUExecutionProvider"])
    mixed = np.concatenate([noise[:64], unseen[:64]])
    for rows in [mixed] + [mixed[i:i + 1] for i in range(0, len(mixed), 8)]:
        (whole_probs, whole_exits), (nested_probs, nested_exits) = (s.run(None, {"images": rows})
                                                                    for s in (whole, nested))
        assert (whole_exits == nested_exits).all()
        np.testing.assert_allclose(whole_probs, nested_probs, atol=1e-6)
    assert len(set(nested.run([EXIT_OUTPUT], {"images": mixed})[0])) > 1

def test_certificate_counts_the_test_rows_as_the_guarded_graph_routes_them(guarded):
    result = guarded
    certificate, frame, plan = result.plan.certificate, result.frame, result.plan
    test = frame[frame["split"] == SPLITS.index("test")]
    features = [variant_features(test, e.column, e.pooling) for e in plan.exits]
    config = PlannerConfig(ood_guard=LEVEL)
    routing = plan.routing(features, len(test), config.rounding)
    split = Split([e.scores(f) for e, f in zip(plan.exits, features)], test["predictions"],
                  guard=_verdicts(plan, features, config))
    failures = count_plans([np.array([e.thresholds for e in plan.exits])], split, config.rounding) \
        .failures(0, Budget(BUDGET))
    assert failures.disagreements == certificate["disagreements"]
    assert int((routing.predictions(test["predictions"]) != test["predictions"]).sum()) \
        == certificate["disagreements"] - certificate["near_threshold_rows"]
    unguarded = ExitPlan([replace(e, guard=None) for e in plan.exits], plan.total_flops)
    assert (unguarded.routing(features, len(test)).exit_index != routing.exit_index).any()  # the guard acted
    assert result.report["verification"]["rerouted_rows"] <= result.report["verification"]["near_threshold_rows"]


def _verdicts(plan: ExitPlan, features: list[np.ndarray], config: PlannerConfig) -> GuardVerdicts:
    pairs = [e.guard.verdicts(f, config.rounding.guard) for e, f in zip(plan.exits, features)]
    return GuardVerdicts(tuple(b for b, _ in pairs), tuple(n for _, n in pairs))


def test_guarded_plan_round_trips_through_json(guarded):
    plan = guarded.plan
    again = ExitPlan.from_dict(plan.to_dict())
    assert all(isinstance(e, Exit) and e.guard is not None for e in again.exits)
    features = [variant_features(guarded.frame[:300], e.column, e.pooling) for e in again.exits]
    for before, after, f in zip(plan.exits, again.exits, features):
        np.testing.assert_array_equal(before.guard.distances(f), after.guard.distances(f))
        assert after.guard.threshold == before.guard.threshold and after.guard.level == LEVEL
    predictions = guarded.frame["predictions"][:300]
    np.testing.assert_array_equal(again.evaluate(features, predictions).exit_index,
                                  plan.evaluate(features, predictions).exit_index)


def test_compile_refuses_a_guard_level_outside_zero_one(reference_onnx, calibration, tmp_path):
    with pytest.raises(ValueError, match=r"ood_guard must be in \(0, 1\)"):
        compile(reference_onnx, calibration, out_dir=tmp_path / "out", ood_guard=1.0, show_progress=False)
    assert not (tmp_path / "out").exists()
