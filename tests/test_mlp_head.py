"""MLP exit heads (issue 28 item 1): distilled from the full model on the reference CNN's own
activations, stronger than the linear probe where it is chosen, written into the graph as the plan
computes them, and kept out where the planner is told to."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moco_compile.constants import PROBABILITIES, PREDICTIONS
from moco_compile.frame import ActivationFrame
from moco_compile.importer import import_model
from moco_compile.passes.calibration.calibrate import FeatureProbe, variant_features
from moco_compile.passes.calibration.mlp_head import DistilledMLPFitter, MLPScores
from moco_compile.passes.calibration.rules import SoftmaxRuleFitter, high_precision_coverage
from moco_compile.passes.planning.config import PlannerConfig
from moco_compile.passes.planning.types import Exit

FIT_ROWS = 3000
PRECISION = 0.995


@pytest.fixture(scope="module")
def early_cut(compiled, calibration, reference_onnx):
    """The reference CNN's rows at its first planned exit's cut: (features of its pooling, full-model
    predictions, full-model probabilities)."""
    imported = import_model(reference_onnx)
    exit_ = compiled[0].plan.exits[0]
    probe = FeatureProbe(imported.model, imported.output, [exit_.cut])
    frame = ActivationFrame.from_arrays(probe({"images": calibration["images"]}, "rows"))
    return variant_features(frame, exit_.column, exit_.pooling), frame[PREDICTIONS], frame[PROBABILITIES]


def test_a_distilled_mlp_admits_more_held_out_rows_than_the_linear_probe(early_cut):
    """At the precision a 1% budget asks of each exit, on rows neither head was fitted on."""
    features, predictions, probabilities = early_cut
    held = slice(FIT_ROWS, None)
    linear = SoftmaxRuleFitter().fit(features[:FIT_ROWS], predictions[:FIT_ROWS], 10)
    mlp = DistilledMLPFitter().fit(features[:FIT_ROWS], probabilities[:FIT_ROWS], 10)
    coverage = [high_precision_coverage(head(features[held]), predictions[held], PRECISION) for head in (linear, mlp)]
    assert coverage[1] > coverage[0] + 0.02, coverage


def test_wide_features_fitted_on_principal_components_keep_the_head_s_quality(early_cut):
    """A head fitted on the leading principal components still reads every feature (the projection folded
    into its hidden layer) and admits about as many held-out rows as one fitted on every feature; one fitted
    on two components admits far fewer (the projection is the one the fit used, and it matters)."""
    features, predictions, probabilities = early_cut
    held = slice(FIT_ROWS, None)
    width = features.shape[1]

    def coverage(**projection) -> float:
        head = DistilledMLPFitter(**projection).fit(features[:FIT_ROWS], probabilities[:FIT_ROWS], 10)
        assert head.hidden_weight.shape == (width, 64)
        return high_precision_coverage(head(features[held]), predictions[held], PRECISION)

    whole = coverage(project_above=None)
    assert width > 48
    assert coverage(project_above=8, projected_features=48) > whole - 0.02
    assert coverage(project_above=1, projected_features=2) < whole - 0.1


def test_fitting_is_seeded_and_scores_are_log_probabilities(early_cut):
    features, predictions, probabilities = early_cut
    first, second = (DistilledMLPFitter(max_iter=30).fit(features[:500], probabilities[:500], 10) for _ in range(2))
    np.testing.assert_array_equal(first.hidden_weight, second.hidden_weight)
    scores = first(features[:50])
    np.testing.assert_allclose(np.exp(scores).sum(axis=1), 1, rtol=1e-5)
    assert first.flops == 2 * first.hidden_weight.size + 2 * first.hidden_bias.size + 2 * first.weight.size + 5 * 10


def test_class_indices_and_bad_targets(early_cut):
    features, predictions, _ = early_cut
    head = DistilledMLPFitter(max_iter=20).fit(features[:300], predictions[:300], 10)
    absent = np.setdiff1d(np.arange(10), predictions[:300])
    assert (head(features[:300]).argmax(axis=1)[:, None] != absent).all()  # a class never seen never wins
    with pytest.raises(ValueError, match="3 columns"):
        DistilledMLPFitter().fit(features[:10], np.full((10, 4), 0.25), 3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        DistilledMLPFitter().fit(np.full((10, 3), np.nan), predictions[:10], 10)


def test_an_mlp_exit_survives_plan_json(compiled):
    exit_ = compiled[0].plan.exits[0]
    head = MLPScores(np.ones((4, 10), np.float32), np.zeros(10, np.float32), "log_softmax",
                     np.ones((exit_.scores.weight.shape[0], 4), np.float32), np.zeros(4, np.float32))
    data = Exit(exit_.cut, exit_.column, exit_.pooling, head, exit_.thresholds, 1.0).to_dict()
    again = Exit.from_dict(data)
    assert isinstance(again.scores, MLPScores)
    np.testing.assert_array_equal(again.scores.hidden_weight, head.hidden_weight)
    np.testing.assert_array_equal(again.scores(np.ones((2, head.hidden_weight.shape[0]), np.float32)),
                                  head(np.ones((2, head.hidden_weight.shape[0]), np.float32)))
    linear = Exit.from_dict({**data, "weight": exit_.scores.weight.tolist(), "hidden_weight": None})
    assert type(linear.scores).__name__ == "LinearScores"


def test_the_graph_runs_each_mlp_head_as_matmul_add_relu_and_routes_as_the_plan(compiled, calibration,
                                                                                 reference_onnx):
    """The shared compile's exits with MLP heads distilled on its rule-fitting rows: each head sits in
    the rewritten graph as its hidden layer then the scores, and the graph routes rows as the plan's
    numpy scores do (rows within float rounding of a threshold excepted)."""
    from dataclasses import replace

    from moco_compile.passes.graph.rewrite import insert_exits
    from moco_compile.passes.planning.splits import SPLITS
    from moco_compile.passes.planning.types import ExitPlan

    build = compiled[0]
    rules = build.frame[build.frame["split"] == SPLITS.index("rules")]
    exits = [replace(e, scores=DistilledMLPFitter(max_iter=60).fit(variant_features(rules, e.column, e.pooling),
                                                                   rules[PROBABILITIES], 10),
                     thresholds=np.full(10, -0.05, np.float32)) for e in build.plan.exits]
    imported = import_model(reference_onnx)
    model = insert_exits(imported.model, exits, imported.output)
    nodes = {output: node for graph in _graphs(model.graph) for node in graph.node for output in node.output}
    relus = [node for node in nodes.values() if node.op_type == "Relu" and node.output[0].endswith("/hidden")]
    assert len(relus) == len(exits)
    for relu in relus:
        add = nodes[relu.input[0]]
        assert add.op_type == "Add" and nodes[add.input[0]].op_type == "MatMul"
    images = calibration["images"][-500:]
    graph_exits = ort.InferenceSession(model.SerializeToString()).run(["moco_exit"], {"images": images})[0]
    frame = ActivationFrame.from_arrays(FeatureProbe(imported.model, imported.output, [e.cut for e in exits])(
        {"images": images}, "rows"))
    routing = ExitPlan(exits, build.plan.total_flops).routing(
        [variant_features(frame, e.column, e.pooling) for e in exits], len(images), PlannerConfig().rounding)
    assert len(set(graph_exits.tolist())) >= 3
    assert ((graph_exits == routing.exit_index) | routing.near_threshold).all()


def test_linear_only_and_bad_heads(compiled):
    assert PlannerConfig(exit_heads=("linear",)).exit_heads == ("linear",)
    for heads in (("mlp",), ("linear", "conv")):
        with pytest.raises(ValueError, match="must list 'linear' and only heads of"):
            PlannerConfig(exit_heads=heads)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)


@pytest.mark.slow  # a compile per head set: end-to-end
def test_mlp_heads_are_kept_only_where_they_pay_for_the_plan(compiled):
    """fit_candidates with MLP heads allowed: some cut takes one, and the probes come along; then the
    plan-level choice (same folds for both): heads whose design scores are the full model's own
    log-probabilities (a perfect head) win over the probes, the same scores shuffled across rows (no
    information) lose to them; where the design rows cannot tell (here: told to trust no gap), both head
    sets go on to be certified, each at half the error rate, and the one that saves more on the test rows
    is kept; unless the test rows are too few to certify anything at half the rate: then the probes alone."""
    from dataclasses import replace

    from moco_compile.passes.planning.candidates import fit_candidates
    from moco_compile.passes.planning.config import Budget
    from moco_compile.passes.planning.pipeline import FrameRows, RowCounter, _certified, _design
    from moco_compile.passes.planning.splits import RowSplit, min_test_rows, split_sizes
    from moco_compile.passes.planning.splits import SPLITS

    build = compiled[0]
    rules = build.frame[build.frame["split"] == SPLITS.index("rules")]
    # MLP heads on these 2,000 rows; two families, two repeats: quick
    config, budget = PlannerConfig(families=("shared-all", "shared"), family_cv_repeats=2), Budget()
    candidates = fit_candidates(rules, [e.cut for e in build.plan.exits], 10, budget, config)
    probes = candidates.probes_only
    assert probes is not None and any(isinstance(e.scores, MLPScores) for e in candidates.exits)
    assert not any(isinstance(e.scores, MLPScores) for e in probes.exits)
    perfect = np.log(np.clip(rules[PROBABILITIES], 1e-30, 1)).astype(np.float32)
    args = (rules[PREDICTIONS], None, 2000, build.plan.total_flops, budget, config, 0)
    rng = np.random.default_rng(0)
    for scores, expected in ((perfect, "heads"), (perfect[rng.permutation(len(perfect))], "probes")):
        heads = replace(candidates, design_scores=[scores] * len(candidates.exits))
        (planner, kept), = _design(heads, *args)
        assert kept is (heads if expected == "heads" else probes), expected
        assert planner.families_
    undecided = replace(config, family_choice_errors=1e6)
    heads = replace(candidates, design_scores=[perfect] * len(candidates.exits))
    options = _design(heads, *args[:5], undecided, 0)
    assert [kept for _, kept in options] == [probes, heads]
    too_few = min_test_rows(budget, undecided, head_sets=2) - 1  # certifies one set, not two at half the rate
    assert too_few >= min_test_rows(budget, undecided)
    (_, kept), = _design(heads, args[0], None, too_few, *args[3:5], undecided, 0)
    assert kept is probes
    split = RowSplit.draw(len(build.frame), 0, split_sizes(len(build.frame), budget, undecided))
    plan, planner, kept, _ = _certified(options, FrameRows(build.frame), split, undecided)
    assert plan.certificate["head_sets"] == 2 and plan.certificate["family_confidence"] == pytest.approx(0.975)
    savings = [p.certify(c["test"], head_sets=2).certificate["test_compute_reduction"] for p, c in (
        (p, FrameRows(build.frame).count(RowCounter(k.exits, p.families_, split, undecided.rounding)))
        for p, k in options)]
    assert (kept, plan.certificate["test_compute_reduction"]) == (options[int(np.argmax(savings))][1], max(savings))
    twins = [_design(replace(candidates, design_scores=probes.design_scores), *args)[0] for _ in range(2)]
    plan, planner, _, _ = _certified(twins, FrameRows(build.frame), split, undecided)
    assert planner is twins[0][0] and plan.certificate["head_sets"] == 2  # equal savings: the first is kept
