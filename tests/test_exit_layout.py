"""The flat and whole-batch exit layouts: the same rows leave with the same outputs as in the nested layout.

Flat: no subgraph.  Whole-batch: no row split off (no NonZero, Compress, ScatterND); a batch leaves an
exit only when every row in it has decided there."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from moco_compile.passes.graph.empty_rows import unsafe_on_no_rows
from moco_compile.passes.graph.index import GraphIndex, all_nodes, subgraph_nesting
from moco_compile.passes.graph.rewrite import insert_exits
from moco_compile.passes.planning.config import MAX_NESTED_GRAPHS, PlannerConfig
from tests.tiny_nets import calibrate_routes, deep_mlp, exits_at

BLOCKS = 6


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _both(model: onnx.ModelProto, exits: list, feeds: dict[str, np.ndarray]) -> tuple[list, list]:
    """Outputs of the nested and the flat graph of ``exits`` (the flat one checked to hold no subgraph)."""
    flat = insert_exits(model, exits, "logits", "flat")
    onnx.checker.check_model(flat, full_check=True)
    assert subgraph_nesting(flat.graph) == 0 and "If" not in {n.op_type for n in all_nodes(flat.graph)}
    return _run(insert_exits(model, exits, "logits", "nested"), feeds), _run(flat, feeds)


def _with_side_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (a :func:`deep_mlp`) with a second input ``seq`` ``[N, L]`` (L dynamic) that the last
    block reads, and a second output ``per_position`` ``[N, L]`` = ``seq`` + the row's feature sum."""
    side = onnx.ModelProto()
    side.CopyFrom(model)
    last = side.graph.node[-1].input[0]
    side.graph.input.append(helper.make_tensor_value_info("seq", onnx.TensorProto.FLOAT, ["N", "L"]))
    side.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    side.graph.node.extend([helper.make_node("ReduceSum", [last, "axis1"], ["row_sum"]),
                            helper.make_node("Add", ["seq", "row_sum"], ["per_position"])])
    side.graph.output.append(helper.make_tensor_value_info("per_position", onnx.TensorProto.FLOAT, ["N", "L"]))
    return side


@pytest.fixture(scope="module")
def mlp() -> tuple[onnx.ModelProto, list, np.ndarray, np.ndarray]:
    """A residual MLP with an exit after every block but the last, each taking 5% of the rows left."""
    model, exits = deep_mlp(BLOCKS), exits_at(BLOCKS - 1)
    x = np.random.default_rng(2).normal(size=(512, 8)).astype(np.float32)
    return model, exits, x, calibrate_routes(model, exits, x, len(exits))


def test_flat_chain_routes_like_numpy_and_matches_nested(mlp):
    model, exits, x, expected = mlp
    (nested_logits, nested_exits), (flat_logits, flat_exits) = _both(model, exits, {"x": x})
    original, = _run(model, {"x": x})
    assert (flat_exits == expected).all() and (nested_exits == expected).all() and (expected == -1).any()
    np.testing.assert_allclose(flat_logits, nested_logits, atol=1e-6)
    np.testing.assert_allclose(flat_logits[expected == -1], original[expected == -1], atol=1e-5)


def test_flat_weights_live_once_in_the_main_graph(mlp):
    model, exits, _, _ = mlp
    flat = insert_exits(model, exits, "logits", "flat")
    names = [init.name for init in flat.graph.initializer]
    assert len(names) == len(set(names)) and {init.name for init in model.graph.initializer} <= set(names)
    assert not any("moco_level" in name for name in names)


@pytest.mark.parametrize("rows", [0, 1, 64])
@pytest.mark.parametrize("case", ["all leave at the first exit", "none leaves"])
def test_flat_chain_when_all_rows_leave_first_or_none_leaves(mlp, rows, case):
    """All rows leaving at exit 0 sends 0 rows through every later stage; none leaving runs the full
    network on every row; a batch of 0 rows runs every stage on 0 rows."""
    model, exits, x, _ = mlp
    threshold = -1e30 if case == "all leave at the first exit" else np.inf
    exits = [replace(e, thresholds=np.full_like(e.thresholds, threshold if i == 0 else np.inf))
             for i, e in enumerate(exits)]
    (nested_logits, nested_exits), (flat_logits, flat_exits) = _both(model, exits, {"x": x[:rows]})
    assert flat_logits.shape == (rows, 3) and flat_exits.shape == (rows,)
    assert (flat_exits == (0 if threshold < 0 else -1)).all() and (flat_exits == nested_exits).all()
    np.testing.assert_allclose(flat_logits, nested_logits, atol=1e-6)
    if threshold > 0:
        np.testing.assert_allclose(flat_logits, _run(model, {"x": x[:rows]})[0], atol=1e-5)


def test_flat_chain_compresses_side_inputs_and_sizes_dynamic_outputs(mlp):
    """A second input that the last stage reads travels with the rows left; the second output, of a
    dynamic width L, holds zeros of width L for exited rows and the original's values for the others."""
    model, exits, x, expected = mlp
    side = _with_side_input(model)
    seq = np.random.default_rng(3).normal(size=(len(x), 5)).astype(np.float32)
    nested, flat = _both(side, exits, {"x": x, "seq": seq})
    original = _run(side, {"x": x, "seq": seq})
    full = expected == -1
    assert (flat[2] == expected).all() and flat[1].shape == seq.shape
    assert (flat[1][~full] == 0).all()
    np.testing.assert_allclose(flat[1][full], original[1][full], atol=1e-5)
    for flat_out, nested_out in zip(flat, nested):
        np.testing.assert_allclose(flat_out, nested_out, atol=1e-6)
    compiled = insert_exits(side, exits, "logits", "flat")
    compressed = [n.input[0] for n in compiled.graph.node if n.op_type == "Compress"]
    assert "seq" in compressed and sum(name.endswith("/seq") for name in compressed) == len(exits) - 1
    empty = _run(compiled, {"x": x[:0], "seq": seq[:0]})
    assert [a.shape for a in empty] == [(0, 3), (0, 5), (0,)]


def test_flat_chain_holds_more_exits_than_a_file_can_nest():
    """Nested, MAX_NESTED_GRAPHS + 10 exits are refused; flat, they load and route like numpy, and the
    planner may plan that many."""
    count = MAX_NESTED_GRAPHS + 10
    model, exits = deep_mlp(count + 1), exits_at(count)
    x = np.random.default_rng(2).normal(size=(1024, 8)).astype(np.float32)
    expected = calibrate_routes(model, exits, x, count)
    flat = onnx.load_from_string(insert_exits(model, exits, "logits", "flat").SerializeToString())
    assert (_run(flat, {"x": x})[1] == expected).all() and (expected == count - 1).any()
    with pytest.raises(ValueError, match="max_exits"):
        insert_exits(model, exits, "logits", "nested")
    assert PlannerConfig(max_exits=count, exit_layout="flat").for_model_nesting(3).max_exits == count
    with pytest.raises(ValueError, match="exit_layout='flat'"):
        PlannerConfig(max_exits=count, exit_layout="nested")


def _reshape_model(shape: list[int], allowzero: int = 0) -> onnx.ModelProto:
    """``Reshape(x, shape)`` for ``x`` of ``[N, 4, 16]``; ``shape``'s first entry ``None`` is ``x``'s batch
    dim, computed at run time (``Shape`` then ``Concat``, as exporters write ``x.view(x.size(0), ...)``)."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape", allowzero=allowzero)]
    constants = [numpy_helper.from_array(np.array([d for d in shape if d is not None], np.int64), "given")]
    if shape[0] is None:
        nodes[:0] = [helper.make_node("Shape", ["x"], ["batch"], start=0, end=1),
                     helper.make_node("Concat", ["batch", "given"], ["shape"], axis=0)]
    else:
        constants[0].name = "shape"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("shape, allowzero", [([0, -1], 0), ([0, 4, -1], 0), ([-1, 64], 0), ([0, 64], 0),
                                              ([-1, 4, 16], 0), ([None, -1], 0), ([None, 4, -1], 0),
                                              ([None, 64], 0), ([None, -1], 1), ([None, 4, -1], 1)])
def test_unsafe_reshapes_are_exactly_those_onnxruntime_refuses_on_0_rows(shape, allowzero):
    """With allowzero the batch dim Shape gives is a literal 0, from which onnxruntime still infers -1."""
    session = ort.InferenceSession(_reshape_model(shape, allowzero).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((2, 4, 16), np.float32)})[0].size == 128
    try:
        session.run(None, {"x": np.zeros((0, 4, 16), np.float32)})
        fails = False
    except Exception:  # onnxruntime raises its own exception types
        fails = True
    model = _reshape_model(shape, allowzero)
    assert fails == bool(unsafe_on_no_rows(GraphIndex(model), [len(model.graph.node) - 1]))


def test_the_empty_batch_probe_prints_no_onnxruntime_errors(capfd):
    """Verification runs both graphs on 0 rows; a model whose Reshape fails there (every legacy-exported
    text model) is told apart as before, but onnxruntime's own "[E:onnxruntime:...] Non-zero status code"
    line no longer reaches stderr (it logs from C++: capfd reads file descriptor 2)."""
    from moco_compile.constants import EXIT_OUTPUT
    from moco_compile.passes.graph.verify import VerificationError, _check_empty_batch, _session

    fails, runs = _reshape_model([None, -1]), _reshape_model([None, 64])  # [N, -1] cannot take 0 rows
    assert unsafe_on_no_rows(GraphIndex(fails), [len(fails.graph.node) - 1]) == ["reshape"]
    fails_with_exits = onnx.ModelProto()
    fails_with_exits.CopyFrom(fails)
    fails_with_exits.graph.node.append(helper.make_node("Shape", ["x"], [EXIT_OUTPUT], start=0, end=1))
    fails_with_exits.graph.output.append(helper.make_tensor_value_info(EXIT_OUTPUT, onnx.TensorProto.INT64, [1]))
    rows = {"x": np.zeros((3, 4, 16), np.float32)}
    capfd.readouterr()
    assert _check_empty_batch(_session(runs), _session(fails), rows, "y", (64,)) is False  # original fails: unchecked
    with pytest.raises(VerificationError, match=r"fails on a batch of 0 rows: .*Non-zero status code.*'reshape'"):
        _check_empty_batch(_session(fails_with_exits), _session(runs), rows, "y", (64,))
    assert "Non-zero status code" not in capfd.readouterr().err


def test_a_reshape_unsafe_on_0_rows_after_an_exit_keeps_the_nested_layout(mlp, caplog):
    """A Reshape to [0, -1] in the last stage would fail once every row has left: the graph is nested."""
    model, exits, x, _ = mlp
    unsafe = onnx.ModelProto()
    unsafe.CopyFrom(model)
    head = unsafe.graph.node[-1]
    unsafe.graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"))
    unsafe.graph.node.insert(len(unsafe.graph.node) - 1,
                             helper.make_node("Reshape", [head.input[0], "flat_shape"], ["flattened"], name="flatten"))
    head.input[0] = "flattened"
    with caplog.at_level("WARNING", logger="moco"):
        compiled = insert_exits(unsafe, exits, "logits", "flat")
    assert subgraph_nesting(compiled.graph) == len(exits) and "flatten" in caplog.text
    everyone_leaves = [replace(e, thresholds=np.full_like(e.thresholds, -1e30)) for e in exits]
    assert (_run(insert_exits(unsafe, everyone_leaves, "logits", "flat"), {"x": x})[1] == 0).all()


@pytest.mark.parametrize("layout", ["flat", "whole-batch"])
def test_the_reference_plan_laid_out_flat_or_whole_batch_verifies_and_matches_nested(compiled, reference_model,
                                                                                    calibration, layout):
    """The reference CNN's certified plan (the shared compile, nested) written flat or whole-batch passes
    verification (parity, the certified routes, batch 1, an empty batch) and gives the nested graph's exits
    and outputs, in batches of 512 rows and of one."""
    from moco_compile.importer import import_model
    from moco_compile.passes.calibration.calibrate import variant_features
    from moco_compile.passes.graph.verify import verify_compiled

    result, _ = compiled
    imported = import_model(reference_model)
    other = insert_exits(imported.model, result.plan.exits, imported.output, layout)
    rows = 512
    frame = result.frame.take(np.arange(rows))  # the frame's first rows are the first calibration rows
    expected = result.plan.routing([variant_features(frame, e.column, e.pooling) for e in result.plan.exits], rows,
                                   PlannerConfig().rounding)
    images = {"images": calibration["images"][:rows]}
    verification = verify_compiled(other, imported.model, imported.output, images, expected)
    assert verification.empty_batch_checked and verification.exit_agreement > 0.99
    assert subgraph_nesting(other.graph) == (0 if layout == "flat" else len(result.plan.exits))
    (other_logits, other_exits), (nested_logits, nested_exits) = _run(other, images), _run(result.model, images)
    assert (other_exits == nested_exits).all() and len(set(other_exits)) == len(result.plan.exits) + 1
    np.testing.assert_allclose(other_logits, nested_logits, atol=1e-5)
    if layout == "whole-batch":
        session = ort.InferenceSession(other.SerializeToString(), providers=["CPUExecutionProvider"])
        one_by_one = [session.run(None, {"images": images["images"][i:i + 1]}) for i in range(0, rows, 8)]
        assert [exit_ for _, (exit_,) in one_by_one] == list(nested_exits[::8])
        np.testing.assert_allclose(np.concatenate([logits for logits, _ in one_by_one]), nested_logits[::8], atol=1e-5)


@pytest.mark.parametrize("layout", ["flat", "whole-batch"])
def test_compile_writes_the_layout_the_planner_config_names(calibration, layout):
    """``PlannerConfig(exit_layout=...)`` reaches the rewrite: the zoo's two-input net (random weights,
    legacy export) compiled flat has no If, its second input compressed with the rows; whole-batch, an If
    per exit and nothing compressed; both verify."""
    pytest.importorskip("torch")
    import torch

    from models.zoo_export import ARCHITECTURES, export, input_names, model_inputs
    from moco_compile import compile
    from tests.plan_settings import UNPRICED_LAUNCHES

    torch.manual_seed(0)
    module = ARCHITECTURES["two-input"]().eval()
    model, names = export(module, "legacy"), input_names(module)
    result = compile(model, model_inputs(names, calibration["images"][:1200]), max_disagreement=0.05,
                     measure_latency=False, show_progress=False,
                     planner_config=replace(UNPRICED_LAUNCHES, exit_layout=layout))
    compressed = [n.input[0] for n in all_nodes(result.model.graph) if n.op_type == "Compress"]
    assert result.plan.exits and result.exit_layout == layout
    if layout == "flat":
        assert subgraph_nesting(result.model.graph) == 0 and "extra" in compressed
    else:
        assert subgraph_nesting(result.model.graph) == len(result.plan.exits) and not compressed
    assert result.report["verification"]["empty_batch_checked"]


def _whole_batch(model: onnx.ModelProto, exits: list) -> onnx.ModelProto:
    compiled = insert_exits(model, exits, "logits", "whole-batch")
    onnx.checker.check_model(compiled, full_check=True)
    assert not {"NonZero", "Compress", "ScatterND"} & {n.op_type for n in all_nodes(compiled.graph)}
    return compiled


@pytest.mark.parametrize("rows", [0, 1, 7, 512])
def test_whole_batch_routes_like_numpy_and_matches_nested(mlp, rows):
    """Any batch: each row takes the exit numpy computes and the nested graph's outputs; a second input
    read by the last stage and a second output of a dynamic width L come through as in the nested graph."""
    model, exits, x, expected = mlp
    side = _with_side_input(model)
    feeds = {"x": x[:rows], "seq": np.random.default_rng(3).normal(size=(rows, 5)).astype(np.float32)}
    nested = _run(insert_exits(side, exits, "logits", "nested"), feeds)
    whole = _run(_whole_batch(side, exits), feeds)
    assert (whole[2] == expected[:rows]).all() and [a.shape for a in whole] == [(rows, 3), (rows, 5), (rows,)]
    for whole_out, nested_out in zip(whole, nested):
        np.testing.assert_allclose(whole_out, nested_out, atol=1e-6)


def test_whole_batch_runs_the_rest_only_while_a_row_is_undecided(mlp):
    """Graph: each exit's If runs the next stage (its MatMul) in the branch taken while rows go on, and
    the branch taken when all have decided holds no node of the model.  Runs: a batch whose rows all
    leave at exit 0 stops there; one undecided row takes the batch on, and the rows that decided at
    exit 0 still carry exit 0's values."""
    model, exits, x, expected = mlp
    graph, level = _whole_batch(model, exits).graph, 0
    while any(n.op_type == "If" for n in graph.node):
        branch = next(n for n in graph.node if n.op_type == "If").attribute
        then, otherwise = (next(a.g for a in branch if a.name == name) for name in ("then_branch", "else_branch"))
        assert f"h{level + 1}" in {o for n in then.node for o in n.output}
        assert all(n.output[0].startswith("moco/") for n in otherwise.node)
        graph, level = then, level + 1
    assert level == len(exits)
    everyone_leaves = [replace(e, thresholds=np.full_like(e.thresholds, -1e30) if i == 0 else e.thresholds)
                       for i, e in enumerate(exits)]
    assert (_run(_whole_batch(model, everyone_leaves), {"x": x})[1] == 0).all()
    first, late = np.flatnonzero(expected == 0)[0], np.flatnonzero(expected == -1)[0]
    pair = {"x": x[[first, late]]}
    logits, exit_ids = _run(_whole_batch(model, exits), pair)
    nested_logits, _ = _run(insert_exits(model, exits, "logits", "nested"), pair)
    assert list(exit_ids) == [0, -1]
    np.testing.assert_allclose(logits, nested_logits, atol=1e-6)
