"""Memory optimisation: the liveness analysis on graphs built inline, measured peaks, float16 /
int8 / fusion passes validated on untouched rows, rejection, composition with exits, bad input."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from moco_compile.cli import app
from moco_compile.errors import CalibrationDataError, ModelError
from moco_compile.memory.optimize import optimize_memory
from moco_compile.memory.profile import profile_memory
from moco_compile.passes.graph.toposort import topologically_sorted
from moco_compile.passes.memory.float16 import to_float16
from moco_compile.passes.memory.liveness import liveness, weight_bytes
from moco_compile.passes.memory.quantize import MIN_STATIC_ROWS, quantize_dynamic_int8, quantize_static_int8
from tests.plan_settings import CHEAPEST_PLAN

pytestmark = pytest.mark.slow  # the fast tier (`pytest -m "not slow"`) leaves this file out

ROW = 4 * 1000  # bytes of one float32 row of 1000 values
ROWS = 2000  # calibration rows the optimisation tests use: 512 tune, 1,488 validate


@pytest.fixture(scope="module")
def rows(calibration) -> dict[str, np.ndarray]:
    return {name: values[:ROWS] for name, values in calibration.items()}


@pytest.fixture(scope="module")
def rows_npz(rows, tmp_path_factory):
    """The same rows as a file, with labels and without."""
    folder = tmp_path_factory.mktemp("rows")
    np.savez(folder / "labelled.npz", **rows)
    np.savez(folder / "unlabelled.npz", images=rows["images"])
    return folder


def _model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _float(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# ---------------------------------------------------------------- liveness, on graphs built inline

def test_liveness_frees_tensors_after_their_last_reader():
    """x -> a=Relu(x) -> b=Relu(a) -> c=Add(a, b) -> d=Relu(c): a and b live together with c at the Add."""
    model = _model([helper.make_node("Relu", ["x"], ["a"], name="ra"), helper.make_node("Relu", ["a"], ["b"], name="rb"),
                    helper.make_node("Add", ["a", "b"], ["c"], name="add"), helper.make_node("Relu", ["c"], ["d"])],
                   [_float("x", ["batch", 1000])], [_float("d", ["batch", 1000])])
    profile = liveness(model, {"x": (8, 1000)})
    assert profile.peak_bytes == 3 * 8 * ROW
    assert profile.peak_node == "add (Add)"
    assert {t.name for t in profile.live_at_peak} == {"a", "b", "c"}
    assert [bytes_ for _, bytes_ in profile.timeline] == [8 * ROW, 2 * 8 * ROW, 3 * 8 * ROW, 2 * 8 * ROW]


def test_views_share_their_input_buffer_and_weights_are_counted_apart():
    weight = numpy_helper.from_array(np.ones((1000, 1000), np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 1000], np.int64), "shape")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["r"]),
                    helper.make_node("Relu", ["r"], ["y"])],
                   [_float("x", ["batch", 1000])], [_float("y", ["batch", 1000])], [weight, shape])
    profile = liveness(model, {"x": (4, 1000)})
    assert profile.peak_bytes == 2 * 4 * ROW  # m/r one buffer, then y
    assert weight_bytes(model) == 1000 * ROW + 16


def test_an_if_node_costs_its_costliest_branch_on_top_of_the_live_outer_tensors():
    big = helper.make_graph([helper.make_node("Relu", ["x"], ["t1"]), helper.make_node("Relu", ["t1"], ["t2"]),
                             helper.make_node("Add", ["t1", "t2"], ["out_big"])], "big", [],
                            [_float("out_big", [8, 1000])])
    small = helper.make_graph([helper.make_node("Identity", ["x"], ["out_small"])], "small", [],
                              [_float("out_small", [8, 1000])])
    model = _model([helper.make_node("Relu", ["x"], ["kept"]),
                    helper.make_node("If", ["flag"], ["chosen"], then_branch=big, else_branch=small),
                    helper.make_node("Add", ["kept", "chosen"], ["y"])],
                   [_float("x", [8, 1000]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                   [_float("y", [8, 1000])])
    profile = liveness(model, {"x": (8, 1000), "flag": ()})
    assert profile.peak_bytes == 4 * 8 * ROW  # kept + t1 + t2 + out_big
    assert {t.name for t in profile.live_at_peak} == {"kept", "t1", "t2", "out_big"}


def test_topological_sort_repairs_nodes_listed_before_their_inputs_in_subgraphs_too():
    branch = helper.make_graph([helper.make_node("Relu", ["inner"], ["out"]), helper.make_node("Neg", ["a"], ["inner"])],
                               "branch", [], [_float("out", [2])])
    model = _model([helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=branch),
                    helper.make_node("Relu", ["x"], ["a"])],
                   [_float("x", [2]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])], [_float("y", [2])])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    repaired = topologically_sorted(model)
    onnx.checker.check_model(repaired, full_check=True)
    assert [n.op_type for n in repaired.graph.node] == ["Relu", "If"]
    assert [n.op_type for n in repaired.graph.node[1].attribute[0].g.node] == ["Neg", "Relu"]


# ---------------------------------------------------------------- profile on the reference CNN

def test_profile_memory_cli_estimate_is_close_to_the_measured_peak(reference_onnx, tmp_path):
    run = CliRunner().invoke(app, ["profile-memory", str(reference_onnx), "--out", str(tmp_path / "p"),
                                   "--batch-sizes", "8,64"])
    assert run.exit_code == 0, run.output
    record = json.loads((tmp_path / "p" / "memory.json").read_text())
    batches = {b["batch_size"]: b for b in record["batches"]}
    for batch in (8, 64):
        entry = batches[batch]
        assert entry["weight_bytes"] == weight_bytes(onnx.load(str(reference_onnx)))
        assert 0.75 <= entry["estimated_peak_bytes"] / entry["measured_peak_bytes"] <= 1.25
        assert not entry["unsized_tensors"]
    assert batches[64]["estimated_peak_bytes"] > 6 * batches[8]["estimated_peak_bytes"]
    assert batches[64]["top_tensors"][0]["bytes"] == 64 * 16 * 28 * 28 * 4  # a stem-width feature map
    page = (tmp_path / "p" / "memory.html").read_text()
    assert 'id="plot-live-memory"' in page and 'id="profile"' in page


def test_profile_needs_rows_when_a_dimension_besides_the_batch_is_free(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_float("x", ["batch", "sequence"])],
                   [_float("y", ["batch", "sequence"])])
    with pytest.raises(CalibrationDataError, match="give --calib rows"):
        profile_memory(model, (1,))
    profile = profile_memory(model, (2,), rows={"x": np.ones((5, 7), np.float32)}, measure=False)
    assert profile["batches"][0]["estimated_peak_bytes"] == 2 * 7 * 4


# ---------------------------------------------------------------- passes and validation

def test_float16_keeps_io_types_converts_every_weight_and_passes_the_full_check(reference_model, calibration):
    converted = to_float16(reference_model)
    onnx.checker.check_model(converted, full_check=True)
    assert {i.data_type for i in converted.graph.initializer if len(i.dims) > 1} == {TensorProto.FLOAT16}
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert weight_bytes(converted) < 0.51 * weight_bytes(reference_model)
    images = calibration["images"][:256]
    original = ort.InferenceSession(reference_model.SerializeToString()).run(None, {"images": images})[0]
    half = ort.InferenceSession(converted.SerializeToString()).run(None, {"images": images})[0]
    assert half.dtype == np.float32
    assert (half.argmax(1) == original.argmax(1)).mean() >= 0.99


def test_float16_overflow_is_found_and_the_node_kept_in_float32():
    """x * 1e5 leaves float16's range (65504) for x > 0.65: that node stays float32, named in a note."""
    scale, unscale = (numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("up", 1e5), ("down", 1e-5)))
    weight = numpy_helper.from_array(np.eye(4, 3, dtype=np.float32), "w")
    model = _model([helper.make_node("Mul", ["x", "up"], ["big"], name="scale_up"),
                    helper.make_node("Relu", ["big"], ["positive"], name="relu"),
                    helper.make_node("Mul", ["positive", "down"], ["small"], name="scale_down"),
                    helper.make_node("MatMul", ["small", "w"], ["logits"], name="head")],
                   [_float("x", ["batch", 4])], [_float("logits", ["batch", 3])], [scale, unscale, weight])
    rows = np.random.default_rng(0).uniform(0, 2, (400, 4)).astype(np.float32)
    result = optimize_memory(model, {"x": rows}, float16=True, measure_latency=False)
    assert [note for note in result.notes if "'big'" in note and "scale_up" in note]
    kept = {i.name: i.data_type for i in result.model.graph.initializer}
    assert kept["up"] == TensorProto.FLOAT and kept["w"] == TensorProto.FLOAT16
    assert result.steps[-1]["non_finite_outputs"] == 0 and result.steps[-1]["disagreement"] == 0
    in_range = optimize_memory(model, {"x": rows / 10}, float16=True, measure_latency=False)
    assert not in_range.notes


def test_int8_dynamic_is_four_times_smaller_and_keeps_accuracy(reference_model, rows):
    result = optimize_memory(reference_model, rows, int8="dynamic", measure_latency=False)
    original, quantized = result.steps
    assert original["weight_bytes"] / quantized["weight_bytes"] >= 3.5
    assert quantized["accuracy_original"] - quantized["accuracy"] <= 0.005
    assert quantized["rows"] == ROWS - 512  # validation rows: none of the tuning rows
    assert any("Gemm" in note for note in result.notes)  # the classifier head has no dynamic int8 kernel


def test_a_step_that_breaks_the_accuracy_budget_is_rejected_and_nothing_is_written(reference_onnx, rows_npz,
                                                                                   tmp_path):
    """Without labels the accuracy drop is the disagreement with the original: int8 changes a few rows."""
    out = tmp_path / "o"
    run = CliRunner().invoke(app, ["optimize-memory", str(reference_onnx), "--calib", str(rows_npz / "unlabelled.npz"),
                                   "--out", str(out), "--int8", "dynamic", "--max-accuracy-drop", "0"])
    assert run.exit_code != 0
    assert "int8 dynamic is rejected" in run.output and "disagreement with the original (no labels)" in run.output
    assert f"on {ROWS - 512} validation rows" in run.output
    weights = int(re.search(r"weights ([\d,]+) bytes", run.output).group(1).replace(",", ""))
    assert weights < weight_bytes(onnx.load(str(reference_onnx))) / 3  # the measured figures come with it
    assert not out.exists()


def test_optimize_memory_cli_writes_the_model_and_the_validation_table(reference_onnx, rows_npz, tmp_path):
    out = tmp_path / "o"
    run = CliRunner().invoke(app, ["optimize-memory", str(reference_onnx), "--calib", str(rows_npz / "labelled.npz"),
                                   "--out", str(out), "--fp16", "--fuse"])
    assert run.exit_code == 0, run.output
    record = json.loads((out / "memory.json").read_text())
    assert [s["step"] for s in record["steps"]] == ["original", "float16", "+ fusions"]
    assert set(record["steps"][1]["latency_ratio"]) == {"1", "64"}
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
    assert 'id="steps"' in (out / "memory.html").read_text()
    again = CliRunner().invoke(app, ["optimize-memory", str(reference_onnx), "--calib",
                                     str(rows_npz / "labelled.npz"), "--out", str(out), "--fp16"])
    assert again.exit_code != 0 and "--force" in again.output


# ---------------------------------------------------------------- bad input

def test_an_already_quantized_model_is_refused(reference_model):
    quantized = quantize_dynamic_int8(reference_model).model
    with pytest.raises(ModelError, match="already quantized"):
        quantize_dynamic_int8(quantized)
    with pytest.raises(ModelError, match="already stores float16"):
        to_float16(to_float16(reference_model))


def test_static_int8_refuses_too_few_calibration_rows(reference_model, calibration):
    with pytest.raises(CalibrationDataError, match=f"at least {MIN_STATIC_ROWS}"):
        quantize_static_int8(reference_model, {"images": calibration["images"][:MIN_STATIC_ROWS - 1]})


def test_optimize_memory_refuses_too_few_validation_rows_and_two_precisions(reference_model, calibration):
    with pytest.raises(CalibrationDataError, match="validating an optimisation needs at least 100 rows"):
        optimize_memory(reference_model, {"images": calibration["images"][:150]}, int8="dynamic")
    with pytest.raises(ValueError, match="float16 or int8"):
        optimize_memory(reference_model, calibration, float16=True, int8="static")


# ---------------------------------------------------------------- composition with exits

def _initializers(graph: onnx.GraphProto, depth: int = 0):
    for init in graph.initializer:
        yield depth, init
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attribute.g, depth + 1)


def test_exits_then_float16_every_branch_converted_and_the_checker_passes(compiled, rows, reference_onnx):
    """Order 2: the build's certified exits on the float16 original; routing stays float32."""
    from moco_compile.memory.optimize import optimize_build

    result, out = compiled
    optimized = optimize_build(out, rows, float16=True, measure_latency=False)
    assert [s["step"] for s in optimized.steps] == ["original", "float16", "+ exits"]
    onnx.checker.check_model(optimized.model, full_check=True)
    nested = [(depth, init) for depth, init in _initializers(optimized.model.graph) if len(init.dims) > 1]
    assert max(depth for depth, _ in nested) == len(result.plan.exits)  # weights live in every nested branch
    body = {init.data_type for _, init in nested if not init.name.startswith("moco/")}
    rules = {init.data_type for _, init in nested if init.name.startswith("moco/")}
    assert body == {TensorProto.FLOAT16} and rules == {TensorProto.FLOAT}
    exits = optimized.steps[-1]
    assert exits["compute_reduction"] > 0.4 and exits["exit_rate"] > 0.7
    assert exits["disagreement"] <= 0.02


def test_compiling_an_int8_model_certifies_exits_on_its_own_activations(reference_model, rows):
    """Order 1: quantize first, then compile on the quantized model's activations."""
    from moco_compile import compile

    quantized = optimize_memory(reference_model, rows, int8="static", measure_latency=False).model
    result = compile(quantized, rows, max_disagreement=0.02, measure_latency=False, show_progress=False,
                     planner_config=CHEAPEST_PLAN)
    assert result.plan.exits and result.report["bound"]["certified"]
    session = ort.InferenceSession(result.model.SerializeToString())
    outputs = session.run(None, {"images": rows["images"][:256]})
    assert (outputs[-1] >= 0).mean() > 0.5  # most rows leave early through the int8 network's exits


def test_a_compiled_graph_is_refused_with_the_way_to_compose(compiled, rows):
    result, _ = compiled
    with pytest.raises(ModelError, match="give its build directory"):
        optimize_memory(result.model, rows, float16=True)


@pytest.fixture(scope="module")
def flat_build(rows, tmp_path_factory, reference_onnx):
    """The reference CNN compiled with ``--exit-layout flat``, written to disk."""
    from moco_compile import compile

    out = tmp_path_factory.mktemp("flat") / "build"
    result = compile(reference_onnx, rows, out_dir=out, measure_latency=False, show_progress=False,
                     planner_config=dataclasses.replace(CHEAPEST_PLAN, exit_layout="flat"))
    return result, out


def test_a_flat_build_keeps_its_layout_through_optimize_memory(flat_build, rows):
    """The build's plan re-inserted on the optimised original in the layout the build records: no If, and
    the rows take the build graph's exits (fusions move no row across a threshold here)."""
    from moco_compile.build import Build
    from moco_compile.constants import EXIT_OUTPUT
    from moco_compile.memory.optimize import optimize_build
    from moco_compile.passes.graph.index import all_nodes

    result, out = flat_build
    build = Build.load(out)
    assert build.exit_layout == "flat" and build.planner_config.exit_layout == "flat" and len(build.plan.exits) > 1
    optimized = optimize_build(out, rows, fuse=True, measure_latency=False)
    assert [s["step"] for s in optimized.steps] == ["original", "+ exits", "+ fusions"]
    assert "If" not in {node.op_type for node in all_nodes(optimized.model.graph)}
    assert "If" not in {node.op_type for node in all_nodes(result.model.graph)}
    images = {"images": rows["images"][:1024]}
    built, = ort.InferenceSession(str(out / "model.onnx")).run([EXIT_OUTPUT], images)
    again, = ort.InferenceSession(optimized.model.SerializeToString()).run([EXIT_OUTPUT], images)
    assert set(np.unique(built)) == set(range(-1, len(build.plan.exits)))
    np.testing.assert_array_equal(again, built)
