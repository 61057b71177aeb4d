"""The agreement condition of routing (the ``"patience"`` family) and the family built on it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest

from moco_compile.passes.planning.config import Budget, PlannerConfig, routes_with_agreement
from moco_compile.passes.planning.counts import count_plans
from moco_compile.passes.planning.design import build_family
from moco_compile.passes.planning.planner import ExitPlanner
from moco_compile.passes.planning.routing import Rounding, route, route_scores
from moco_compile.passes.planning.types import ExitPlan
from tests.synthetic_plans import TOTAL_FLOPS, candidate_exits, synthetic
from tests.test_plan import _problem

PATIENCE_ROWS = 2500

# three exits, two classes; every margin of a row's best class is positive unless said otherwise
FIRST = np.array([[0.5, -1.0],    # row 0: fires at the first exit alone (no exit before it)
                  [-0.3, -0.1],   # row 1: class 1 here, fires at the second exit with class 1: agrees
                  [-0.1, -0.3],   # row 2: class 0 here, class 1 at the second: no agreement there
                  [-0.1, -0.3]])  # row 3: class 0 here, class 1 at the second (no), class 1 at the third (yes)
SECOND = np.array([[-1.0, -1.0],
                   [-1.0, 0.4],
                   [-1.0, 0.4],
                   [-1.0, 0.2]])
THIRD = np.array([[-1.0, -1.0],
                  [-1.0, -1.0],
                  [-1.0, -1.0],
                  [-1.0, 0.3]])


def test_past_the_first_exit_a_row_leaves_only_with_the_class_it_had_at_the_exit_before():
    costs = np.array([1.0, 2.0, 3.0, 10.0])
    plain = route([FIRST, SECOND, THIRD], costs)
    agreeing = route([FIRST, SECOND, THIRD], costs, agreement=True)
    assert plain.exit_index.tolist() == [0, 1, 1, 1]
    assert agreeing.exit_index.tolist() == [0, 1, -1, 2]
    assert agreeing.exit_class.tolist() == [0, 1, -1, 1]
    assert agreeing.cost.tolist() == [1.0, 2.0, 10.0, 3.0]
    assert not agreeing.near_threshold.any()


def test_a_class_tied_within_rounding_at_the_exit_before_may_agree_or_not():
    first = np.array([[-0.1, -0.1 - 1e-5],   # class 0 by a hair: class 1 under some rounding
                      [-0.1, -0.1 - 1e-5],
                      [-0.1, -0.5]])         # class 0 for sure
    second = np.array([[-1.0, 0.4]] * 3)     # class 1 fires: agreement decides
    predictions = np.array([1, 0, 0])
    routing = route([first, second], tolerance=1e-4, full_predictions=predictions, agreement=True)
    assert routing.exit_index.tolist() == [-1, -1, -1]  # no row agrees in exact arithmetic
    assert routing.near_threshold.tolist() == [True, True, False]  # the tied ones could leave in the graph
    # leaving with class 1 is harmless where the full model says 1, a disagreement where it says 0
    assert routing.could_disagree.tolist() == [False, True, False]
    # a tie at the exit that fires counts too: its class may be the previous exit's in the graph
    tied_here = route([np.array([[-0.5, -0.1]]), np.array([[0.4 + 1e-5, 0.4]])], tolerance=1e-4,
                      full_predictions=np.array([0]), agreement=True)
    assert tied_here.exit_index.tolist() == [-1] and tied_here.near_threshold.tolist() == [True]
    assert tied_here.could_disagree.tolist() == [True]


def test_the_exit_before_is_the_open_exit_before():
    """A closed exit (every class off) is not routed: the third exit's predecessor is the first."""
    thresholds = np.array([[0.0, 0.0], [np.inf, np.inf], [0.0, 0.0]], np.float32)
    scores = [FIRST.astype(np.float32), np.array([[0.0, 5.0]] * 4, np.float32), THIRD.astype(np.float32)]
    routing = route_scores(scores, thresholds, agreement=True)
    assert routing.exit_index.tolist() == [0, -1, -1, -1]  # row 3's class at the first exit is 0, at the third 1
    scores[0][3] = [-0.3, -0.1]
    assert route_scores(scores, thresholds, agreement=True).exit_index.tolist() == [0, -1, -1, 2]


@pytest.mark.parametrize("seed", range(3))
def test_rounding_within_tolerance_moves_only_rows_marked_near_and_harms_only_rows_counted(seed):
    """Every margin moved by at most its tolerance: a row routed elsewhere is near a threshold, a row
    leaving with another class than the full model's could disagree (certification counts it)."""
    rng = np.random.default_rng(seed)
    rows, classes, tolerance = 4000, 3, 0.05
    predictions = rng.integers(0, classes, rows)
    margins = [np.round(rng.normal(0, 0.1, (rows, classes)) + 0.1 * np.eye(classes)[predictions], 1)
               for _ in range(4)]  # coarse values: many ties and margins at 0
    routing = route(margins, tolerance=tolerance, full_predictions=predictions, agreement=True)
    moved_any = np.zeros(rows, bool)
    for _ in range(20):
        moved = route([m + rng.uniform(-tolerance, tolerance, m.shape) * 0.999 for m in margins], agreement=True)
        changed = (moved.exit_index != routing.exit_index) | (moved.exit_class != routing.exit_class)
        assert not (changed & ~routing.near_threshold).any()
        assert not ((moved.predictions(predictions) != predictions) & ~routing.could_disagree).any()
        moved_any |= changed
    assert moved_any.any()  # the rounding did move rows


def test_the_patience_family_is_nested_shared_and_routed_with_agreement():
    design = synthetic(600, np.random.default_rng(0))
    plans = build_family("patience", _problem(design, Budget(0.05), PlannerConfig()))
    assert len(plans) > 5 and not np.isfinite(plans[0]).any()
    assert all(np.unique(plan[np.isfinite(plan)]).size <= 1 for plan in plans)  # one threshold
    for before, after in zip(plans, plans[1:]):
        kept = np.isfinite(before)
        assert (after[kept] <= before[kept]).all()
    assert routes_with_agreement("patience") and not routes_with_agreement("shared")
    plain, agreeing = (count_plans(plans, design, Rounding(), agreement) for agreement in (False, True))
    assert (agreeing.exits[:, -1] >= plain.exits[:, -1]).all()  # agreement only keeps rows in
    assert (agreeing.exits[:, -1] > plain.exits[:, -1]).any()


def test_cross_validation_lists_patience_after_shared():
    design = synthetic(1200, np.random.default_rng(3))
    planner = ExitPlanner(Budget(0.05), PlannerConfig(families=("shared", "patience")))
    planner.design(candidate_exits(3), design, 1000, TOTAL_FLOPS)
    assert set(planner.family_savings_) == {"shared", "patience"}


def test_a_patience_plan_is_certified_on_the_reference_cnn_as_it_routes(compiled, plan_split):
    """On the shared compile's calibration rows (its exits as candidates): the patience family is
    built, certified with the test rows routed with agreement, and says so in plan and certificate."""
    result = compiled[0]
    design, test = plan_split(result, "rules"), plan_split(result, "test")
    planner = ExitPlanner(Budget(), PlannerConfig(families=("patience",)))
    plan = planner.fit(result.plan.exits, design, test, result.plan.total_flops)
    assert plan.exits and plan.agreement and plan.certificate["family"] == "patience"
    assert plan.certificate["agreement"] is True
    assert ExitPlan.from_dict(plan.to_dict()).agreement
    thresholds = planner.families_["patience"][planner.chosen_[1]]
    counts = count_plans([thresholds], test, planner.config.rounding, agreement=True)
    assert plan.certificate["disagreements"] == counts.could_disagree[0]
    assert plan.certificate["disagreements"] <= 0.01 * len(test)  # certified at 1%: p-value < 5%
    kept = np.isfinite(thresholds).any(axis=1)
    scores = [s for s, k in zip(test.scores, kept) if k]
    agreeing = route_scores(scores, thresholds[kept], agreement=True)
    assert (agreeing.exit_index != route_scores(scores, thresholds[kept]).exit_index).any()  # agreement acted


@pytest.fixture(scope="module")
def patience_build(reference_onnx, calibration, tmp_path_factory):
    """The reference CNN compiled with the patience family alone (linear heads: faster), saved."""
    from moco_compile import compile

    out = tmp_path_factory.mktemp("patience") / "out"
    rows = {k: v[:PATIENCE_ROWS] for k, v in calibration.items()}
    config = PlannerConfig(families=("patience",), exit_heads=("linear",))
    return compile(reference_onnx, rows, planner_config=config, out_dir=out, measure_latency=False,
                   show_progress=False), out


def test_a_patience_compile_carries_each_rows_class_to_the_next_exit(patience_build):
    """The graph compares each exit's class with the one the row had at the exit before, carried in
    with the rows that go on; compile's verification (every calibration row it ran) passed on rows
    where agreement changes the route, so the graph routes as the certified plan does."""
    from moco_compile.passes.calibration.calibrate import variant_features
    from moco_compile.passes.graph.index import all_nodes

    result, _ = patience_build
    plan = result.plan
    assert plan.agreement and plan.certificate["family"] == "patience" and len(plan.exits) >= 2
    nodes = list(all_nodes(result.model.graph))
    by_output = {output: node for node in nodes for output in node.output}
    for k in range(len(plan.exits)):
        assert by_output[f"moco/exit{k}/class"].op_type == "ArgMax"
    for k in range(1, len(plan.exits)):
        equal = next(n for n in nodes if n.op_type == "Equal" and n.output[0] == f"moco/exit{k}/agrees")
        carried = by_output[equal.input[1]]
        assert list(equal.input[:1]) == [f"moco/exit{k}/class"]
        assert carried.op_type == "Compress" and carried.input[0] == f"moco/exit{k - 1}/class"
    verified = result.report["verification"]["rows"]
    frame = result.frame.take(np.arange(verified))
    features = [variant_features(frame, e.column, e.pooling) for e in plan.exits]
    agreeing = plan.routing(features, verified)
    plain = replace(plan, agreement=False).routing(features, verified)
    assert (agreeing.exit_index != plain.exit_index).sum() >= 10  # agreement acted on verified rows
    assert result.report["verification"]["exit_agreement"] > 0.99


def test_every_cpu_layout_routes_with_agreement_alike(patience_build, reference_model, calibration):
    from moco_compile.passes.graph.index import all_nodes
    from moco_compile.passes.graph.rewrite import apply_plan
    from moco_compile.prepare import model_for_plan

    result, _ = patience_build
    images = calibration["images"][-512:]  # rows the compile never saw
    model, output = model_for_plan(reference_model, None, {"images": images[:1]})
    nested = _run(result.model, images)
    plain = _run(apply_plan(model, replace(result.plan, agreement=False), output, "nested"), images)
    assert (plain[1] != nested[1]).any()
    for layout in ("flat", "whole-batch"):
        compiled = apply_plan(model, result.plan, output, layout)
        logits, exits = _run(compiled, images)
        assert (exits == nested[1]).all(), layout
        np.testing.assert_allclose(logits, nested[0], atol=1e-5)
    # whole-batch: the first exit, with no class to agree with, asks its margins alone whether a row goes on
    produced = {name for node in all_nodes(compiled.graph) for name in node.output}
    assert {"moco/exit0/lowest", "moco/exit1/kept"} <= produced and "moco/exit0/kept" not in produced


def _run(model, images: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})


def test_layouts_that_cannot_carry_a_class_leave_patience_out_or_refuse(patience_build, reference_model,
                                                                        calibration, tmp_path):
    """The bucketed layout (its stages served as separate models) builds no agreement: its default
    families leave patience out, listing it is refused, and neither its rewrite nor a staged export
    of a patience build writes anything."""
    from moco_compile.errors import MocoError
    from moco_compile.passes.graph.rewrite import apply_plan
    from moco_compile.passes.planning.config import DEFAULT_FAMILIES
    from moco_compile.prepare import model_for_plan
    from moco_compile.stage_models import export_triton_staged

    assert "patience" in DEFAULT_FAMILIES and "patience" in PlannerConfig().families
    assert PlannerConfig(exit_layout="bucketed").families == tuple(f for f in DEFAULT_FAMILIES if f != "patience")
    with pytest.raises(ValueError, match="'bucketed' exit layout cannot build"):
        PlannerConfig(exit_layout="bucketed", families=("shared", "patience"))
    result, out = patience_build
    model, output = model_for_plan(reference_model, None, {"images": calibration["images"][:1]})
    with pytest.raises(ValueError, match="bucketed layout does not carry a row's class"):
        apply_plan(model, result.plan, output, "bucketed")
    repository = tmp_path / "repository"
    with pytest.raises(MocoError, match="staged serving does not carry"):
        export_triton_staged(out, repository)
    assert not repository.exists()
