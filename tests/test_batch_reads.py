"""The batch size read where it is used (``passes/graph/batch_reads.py``): torch.export's one read of
``Shape(x, start=0, end=1)`` at the input, used by the head's index arithmetic, no longer crosses every cut."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moco_compile import compile
from moco_compile.constants import EXIT_OUTPUT
from moco_compile.passes.graph.batch_reads import batch_leading, batch_size_roots, localize_batch_reads
from moco_compile.passes.graph.cut_points import find_cut_points
from moco_compile.passes.graph.flops import flops_per_row, measure_shapes
from moco_compile.passes.graph.index import all_nodes, exposing_every_tensor
from moco_compile.passes.graph.rewrite import insert_exits
from tests.plan_settings import UNPRICED_LAUNCHES
from tests.tiny_nets import exits_at

WIDTH, LAYERS, CLASSES = 16, 4, 3


def _exported_like_torch_export() -> onnx.ModelProto:
    """Residual blocks over ``[N, 16]`` rows, then the rows flattened and gathered back by index arithmetic
    over the batch size read once at the input (``Range(0, N) * 16 + arange(16)``), as torch.export
    writes torchvision ConvNeXt's and Swin's final ``flatten``; then a linear head."""
    rng = np.random.default_rng(0)
    constants = {"w_in": rng.normal(size=(8, WIDTH)) * 0.5, "head": rng.normal(size=(WIDTH, CLASSES)),
                 **{f"w{i}": rng.normal(size=(WIDTH, WIDTH)) * 0.6 for i in range(LAYERS)}}
    initializers = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in constants.items()]
    initializers += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
                     {"zero": 0, "one": 1, "width": WIDTH, "axis1": [1], "columns": np.arange(WIDTH)[None],
                      "flat": [-1]}.items()]
    nodes = [helper.make_node("Shape", ["x"], ["batch_1d"], start=0, end=1),
             helper.make_node("Squeeze", ["batch_1d"], ["batch"]),
             helper.make_node("MatMul", ["x", "w_in"], ["h_in"]), helper.make_node("Relu", ["h_in"], ["h"])]
    hidden = "h"
    for i in range(LAYERS):
        nodes += [helper.make_node("MatMul", [hidden, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
                  helper.make_node("Add", [hidden, f"r{i}"], [f"a{i}"])]
        hidden = f"a{i}"
    nodes += [helper.make_node("Range", ["zero", "batch", "one"], ["rows"]),
              helper.make_node("Mul", ["rows", "width"], ["starts"]),
              helper.make_node("Unsqueeze", ["starts", "axis1"], ["starts_2d"]),
              helper.make_node("Add", ["starts_2d", "columns"], ["positions"]),
              helper.make_node("Reshape", [hidden, "flat"], ["flattened"]),
              helper.make_node("Gather", ["flattened", "positions"], ["gathered"]),
              helper.make_node("MatMul", ["gathered", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "export", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _rows(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(count, 8)).astype(np.float32)}


def _cuts(model: onnx.ModelProto) -> list[str]:
    shapes = measure_shapes(model, _rows(1))
    return [cut.tensor for cut in find_cut_points(model, flops_per_row(model, shapes), shapes, min_fraction=0.01)]


def _localized(model: onnx.ModelProto) -> onnx.ModelProto:
    leading = batch_leading(measure_shapes(model, _rows(1)), measure_shapes(model, _rows(2)))
    return localize_batch_reads(model, leading)


def test_the_head_reads_the_batch_size_off_the_last_block_and_every_block_boundary_becomes_a_cut():
    model = _exported_like_torch_export()
    assert [model.graph.node[i].op_type for i in batch_size_roots(model)] == ["Shape"]
    assert _cuts(model) == ["gathered"]  # the batch size, read at the input, crosses every block boundary
    localized = _localized(model)
    nodes = {node.output[0]: node for node in localized.graph.node}
    root = next(node for node in localized.graph.node if node.op_type == "Shape")
    assert root.input[0] == f"a{LAYERS - 1}"  # the latest batch-leading tensor the Gather depends on
    assert "batch_1d" not in nodes and "batch" not in nodes  # the read at the input is gone
    assert _cuts(localized) == ["h_in", "h", *[f"a{i}" for i in range(LAYERS)], "gathered"]
    for count in (1, 5, 64):
        rows = _rows(count, seed=count)
        expected = ort.InferenceSession(model.SerializeToString()).run(None, rows)[0]
        got = ort.InferenceSession(localized.SerializeToString()).run(None, rows)[0]
        np.testing.assert_array_equal(got, expected)


def test_a_model_without_such_a_read_is_returned_as_it_is(reference_model):
    assert batch_size_roots(reference_model) == []
    assert localize_batch_reads(reference_model, leading=set()) is reference_model
    model = _exported_like_torch_export()
    assert batch_size_roots(model, excluded=["x"]) == []  # a side input's shape may be read anywhere


def test_such_an_export_compiles():
    result = compile(_exported_like_torch_export(), _rows(1200), max_disagreement=0.05, measure_latency=False,
                     show_progress=False, planner_config=UNPRICED_LAUNCHES)
    blocks = {"h_in", "h", *[f"a{i}" for i in range(LAYERS)]}
    assert result.plan.exits and {e.cut.tensor for e in result.plan.exits} <= blocks
    assert result.report["verification"]["rows"] > 0


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_rows_left_after_an_exit_are_counted_anew(layout):
    """Rows that go on past an exit are fewer than the batch: the head's arithmetic counts them off the
    last block, so the exits compress their cut tensors only (not the input too, which the rewrite would
    have carried to every remainder for the head to count); those rows get the model's own logits."""
    model = _localized(_exported_like_torch_export())
    rows = _rows(300, seed=7)
    names = [f"a{i}" for i in range(LAYERS - 1)]
    states = ort.InferenceSession(exposing_every_tensor(model).SerializeToString()).run(names, rows)
    exits = exits_at(len(names), width=WIDTH, classes=CLASSES)
    for exit_, state in zip(exits, states):  # each exit takes about a fifth of all rows
        exit_.thresholds[:] = np.quantile(exit_.scores(state).max(axis=1), 0.8)
    compiled = insert_exits(model, exits, "logits", layout)
    full = ort.InferenceSession(model.SerializeToString()).run(None, rows)[0]
    logits, taken = ort.InferenceSession(compiled.SerializeToString()).run(["logits", EXIT_OUTPUT], rows)
    assert {node.input[0] for node in all_nodes(compiled.graph) if node.op_type == "Compress"} == set(names)
    assert 0.3 < (taken >= 0).mean() < 0.7
    np.testing.assert_array_equal(logits[taken < 0], full[taken < 0])


def test_a_subgraph_reading_the_batch_size_keeps_the_arithmetic_it_reads():
    """An If branch reads the batch size from the outer scope (an implicit input): the original arithmetic
    stays for it, and the graph still runs and counts the rows."""
    model = _exported_like_torch_export()
    branch = helper.make_graph([helper.make_node("Identity", ["batch"], ["rows_seen"])], "branch", [],
                              [helper.make_tensor_value_info("rows_seen", TensorProto.INT64, [])])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "always"))
    model.graph.node.append(helper.make_node("If", ["always"], ["counted"], then_branch=branch, else_branch=branch))
    model.graph.output.append(helper.make_tensor_value_info("counted", TensorProto.INT64, []))
    localized = _localized(model)
    assert [node.input[0] for node in localized.graph.node if node.op_type == "Shape"] == ["x", f"a{LAYERS - 1}"]
    assert ort.InferenceSession(localized.SerializeToString()).run(["counted"], _rows(5))[0] == 5
