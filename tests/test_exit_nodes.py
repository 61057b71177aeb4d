"""What one exit adds to the nested graph, node by node: the batch-1 path pays a launch per node.

Exits are hand-made on the reference CNN (least-squares rules on three cuts, thresholds set so each
exit takes a share of the rows): no compile, so the structure and the routing can be checked in a
few seconds on the shipped model and calibration rows.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moco_compile.frame import ActivationFrame
from moco_compile.importer import import_model
from moco_compile.passes.calibration.calibrate import FeatureProbe, cut_column, variant_features
from moco_compile.passes.calibration.exit_confidence import exited_logits, swap_is_identity
from moco_compile.passes.calibration.pooling import pooling_cost
from moco_compile.passes.calibration.rules import LinearScores
from moco_compile.passes.graph.index import all_graphs
from moco_compile.passes.graph.rewrite import insert_exits
from moco_compile.passes.planning.types import Exit, ExitPlan
from moco_compile.prepare import cut_points_of

SWAP_OPS = {"ArgMax", "GatherElements", "ScatterElements"}
# kinds of the pinned reference plan; relu_4 enters a block with a Conv shortcut, the others an identity one
CUTS = {"relu_2": "grid+max", "relu_4": "grid", "relu_10": "mean"}


@pytest.fixture(scope="module")
def reference(reference_model, calibration):
    """``(imported, rows, features, full_logits, plan)``: a plan of three shared-threshold exits on the
    reference CNN, each taking about a third of the rows that reach it."""
    imported = import_model(reference_model)
    rows = calibration["images"][:512]
    _, cuts = cut_points_of(imported, {"images": rows}, 64)
    cuts = [c for c in cuts if c.tensor in CUTS]
    frame = ActivationFrame.from_arrays(FeatureProbe(imported.model, imported.output, cuts)({"images": rows}, "rows"))
    full_logits, = ort.InferenceSession(imported.model.SerializeToString()).run(None, {"images": rows})
    exits, features, left = [], [], np.ones(len(rows), bool)
    for cut in cuts:
        pooling = CUTS[cut.tensor]
        pooled = variant_features(frame, cut_column(cut), pooling)
        weight, *_ = np.linalg.lstsq(np.c_[pooled, np.ones(len(pooled))], full_logits, rcond=None)
        scores = LinearScores(weight[:-1].astype(np.float32), weight[-1].astype(np.float32), "log_softmax")
        top = scores(pooled).max(axis=1)
        threshold = np.float32(np.quantile(top[left], 0.65))
        left &= top <= threshold
        exits.append(Exit(cut, cut_column(cut), pooling, scores, np.full(10, threshold, np.float32),
                          pooling_cost(cut.shape, pooling) + scores.flops, confidence_scale=0.8))
        features.append(pooled)
    return imported, rows, features, full_logits, ExitPlan(exits, cuts[0].flops_before + cuts[0].flops_after)


def _run(model: onnx.ModelProto, rows: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": rows})


def _levels(model: onnx.ModelProto) -> list[onnx.GraphProto]:
    """The main graph, then each exit If's then-branch, outermost first."""
    return [g for g in all_graphs(model.graph) if g is model.graph or g.name.startswith("moco_level_")
            and not g.name.endswith("_skipped")]


def test_swap_is_identity_only_for_one_shared_finite_threshold():
    assert swap_is_identity(np.full(4, -0.05, np.float32), 0.9)
    assert not swap_is_identity(np.array([-0.05, -0.05, -3.0, -0.05]), 0.9)  # per class: a class may jump
    assert not swap_is_identity(np.array([-0.05, np.inf, -0.05]), 0.9)  # a class off: margins' argmax moves
    assert swap_is_identity(np.full(4, np.inf), 0.9)  # every class off: no row leaves, nothing is read
    assert not swap_is_identity(np.full(4, -0.05), -1.0)
    assert not swap_is_identity(np.zeros(0), 1.0)


def test_shared_threshold_exits_carry_their_scaled_log_probabilities_from_one_node(reference):
    """One Mul per exit, no ArgMax / GatherElements / ScatterElements, and exited rows carry
    ``scale * log p`` (what the swap would give them: it moves nothing)."""
    imported, rows, features, full_logits, plan = reference
    model = insert_exits(imported.model, plan.exits, "logits")
    levels = _levels(model)
    assert len(levels) == len(plan.exits) + 1
    for k, graph in enumerate(levels[:-1]):
        assert not SWAP_OPS & {n.op_type for n in graph.node}
        producers = {out: n for n in graph.node for out in n.output}
        merge = producers[f"moco/exit{k}/merged/logits"]
        scaled = producers[merge.input[0]]
        assert scaled.op_type == "Mul" and scaled.input[0] == f"moco/exit{k}/log_probs"
    logits, exit_index = _run(model, rows)
    routing = plan.routing(features, len(rows))
    settled = ~routing.near_threshold
    assert (exit_index[settled] == routing.exit_index[settled]).all()
    assert all((routing.exit_index == k).sum() > 20 for k in range(-1, len(plan.exits)))
    for k, exit_ in enumerate(plan.exits):
        here = (exit_index == k) & (routing.exit_index == k)
        log_probs = exit_.scores(features[k][here])
        np.testing.assert_allclose(logits[here], exited_logits(log_probs, log_probs - exit_.thresholds, 0.8),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[exit_index == -1], full_logits[exit_index == -1], atol=1e-4)


def test_per_class_thresholds_keep_the_swap(reference):
    imported, _, _, _, plan = reference
    exits = [replace(e, thresholds=e.thresholds + np.linspace(0, 1, 10, dtype=np.float32)) for e in plan.exits]
    levels = _levels(insert_exits(imported.model, exits, "logits"))
    for graph in levels[:-1]:
        ops = Counter(n.op_type for n in graph.node)
        assert (ops["ArgMax"], ops["GatherElements"], ops["ScatterElements"]) == (2, 2, 2)


def test_exit_ids_are_one_where_per_exit_and_route_like_the_plan(reference):
    """``level`` on every row from one Where on the exit's keep mask (the scatter overwrites the
    continuing rows): no Shape + ConstantOfShape above the innermost level."""
    imported, rows, features, _, plan = reference
    model = insert_exits(imported.model, plan.exits, "logits")
    for k, graph in enumerate(_levels(model)[:-1]):
        ids = next(n for n in graph.node if n.output[0] == f"moco/exit{k}/exit_ids")
        assert ids.op_type == "Where" and ids.input[0] == f"moco/exit{k}/keep"
        level = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}[ids.input[1]]
        assert ids.input[1] == ids.input[2] and level == k
        assert "ConstantOfShape" not in {n.op_type for n in graph.node}
    # batches with a mix of routes, where every row leaves at the first exit, where none leaves
    full = _run(model, rows)[1]
    for index in (np.arange(4), np.flatnonzero(full == 0)[:8], np.flatnonzero(full == -1)[:3]):
        np.testing.assert_array_equal(_run(model, rows[index])[1], full[index])


def test_a_residual_remainder_enters_through_an_identity_pool(reference):
    """Where the compressed cut tensor feeds a Conv and the block's residual Add, the remainder reads
    it through a 1x1 MaxPool (onnxruntime then runs both in NCHWc); a block with a Conv shortcut has none."""
    imported, rows, _, full_logits, plan = reference
    model = insert_exits(imported.model, plan.exits, "logits")
    for k, (exit_, branch) in enumerate(zip(plan.exits, _levels(model)[1:])):
        compressed = f"moco/exit{k}/rest/{exit_.cut.tensor}"
        readers = [n for n in branch.node if compressed in n.input]
        if exit_.cut.tensor == "relu_4":
            assert {n.op_type for n in readers} == {"Conv"}
            continue
        pool, = readers
        assert pool.op_type == "MaxPool" and [a.ints for a in pool.attribute] == [[1, 1]]
        assert {n.op_type for n in branch.node if pool.output[0] in n.input} == {"Conv", "Add"}
        declared = {v.name: v for v in branch.value_info}[pool.output[0]]
        assert [d.dim_param or d.dim_value for d in declared.type.tensor_type.shape.dim] == \
            [f"moco_rows_{k + 1}", *exit_.cut.shape[1:]]
    logits, exit_index = _run(model, rows)
    np.testing.assert_allclose(logits[exit_index == -1], full_logits[exit_index == -1], atol=1e-4)


def test_onnxruntime_fuses_every_residual_add_in_the_remainders_as_in_the_original(reference, tmp_path):
    """With onnxruntime's NCHWc layout on (x86 CPUs), the original graph keeps no plain Add: each is
    fused into a Conv, and so is each in the compiled graph's branches."""
    imported, _, _, _, plan = reference

    def optimized(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / name)
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(tmp_path / name))

    original = optimized(imported.model, "original.onnx")
    if not any(n.domain == "com.microsoft.nchwc" for n in original.graph.node):
        pytest.skip("onnxruntime runs no NCHWc layout on this CPU")
    assert "Add" not in {n.op_type for n in original.graph.node}
    compiled = optimized(insert_exits(imported.model, plan.exits, "logits"), "compiled.onnx")
    assert all("Add" not in {n.op_type for n in graph.node} for graph in all_graphs(compiled.graph))


@pytest.mark.parametrize("channels, before_add, wanted", [(16, "Conv", True), (32, "BatchNormalization", True),
                                                          (16, "Mul", False), (8, "Conv", False)])
def test_the_identity_pool_only_where_onnxruntime_can_fuse_the_residual(channels, before_add, wanted):
    """A residual Add onto a Conv (or BatchNormalization) output fuses in NCHWc; one after a layer
    scale (a Mul, as in ConvNeXt) does not, and 8 channels is not a 16-channel NCHWc block."""
    from onnx import helper, numpy_helper

    from moco_compile.passes.graph.index import GraphIndex
    from moco_compile.passes.graph.nchwc_entry import wants_nchwc_entry

    c = channels
    weights = [numpy_helper.from_array(np.ones((c, c, 3, 3), np.float32), "w"),
               numpy_helper.from_array(np.ones(c, np.float32), "s")]
    last = {"Conv": helper.make_node("Conv", ["h", "w"], ["y"], pads=[1, 1, 1, 1]),
            "BatchNormalization": helper.make_node("BatchNormalization", ["h", "s", "s", "s", "s"], ["y"]),
            "Mul": helper.make_node("Mul", ["h", "s"], ["y"])}[before_add]
    nodes = [helper.make_node("Relu", ["x"], ["cut"]), helper.make_node("Conv", ["cut", "w"], ["h"], pads=[1, 1, 1, 1]),
             last, helper.make_node("Add", ["y", "cut"], ["out"])]
    value = helper.make_tensor_value_info("cut", onnx.TensorProto.FLOAT, ["n", c, 8, 8])
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", c, 8, 8])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["n", c, 8, 8])], weights,
                              value_info=[value])
    assert wants_nchwc_entry(GraphIndex(helper.make_model(graph)), "cut", value) is wanted
