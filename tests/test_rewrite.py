"""The compiled graph's structure: contract of inputs/outputs, nesting, and where weights live."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.plan_settings import CHEAPEST_PLAN
from tests.tiny_nets import calibrate_routes, deep_mlp, exits_at



def _if_chain(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """The then-branches of the exit Ifs, outermost first."""
    chain = []
    while True:
        ifs = [n for n in graph.node if n.op_type == "If"]
        if not ifs:
            return chain
        assert len(ifs) == 1
        graph = next(a.g for a in ifs[0].attribute if a.name == "then_branch")
        chain.append(graph)


def test_inputs_and_outputs_keep_the_contract(compiled, reference_model):
    result, _ = compiled
    model = result.model
    assert [i.SerializeToString() for i in model.graph.input] == \
        [i.SerializeToString() for i in reference_model.graph.input]
    original = {o.name: o for o in reference_model.graph.output}
    names = [o.name for o in model.graph.output]
    assert names == list(original) + ["moco_exit"]
    assert model.graph.output[0].type == original["logits"].type
    exit_type = model.graph.output[1].type.tensor_type
    assert exit_type.elem_type == onnx.TensorProto.INT64 and len(exit_type.shape.dim) == 1
    opset = next(o.version for o in model.opset_import if o.domain == "")
    assert opset >= 17
    onnx.checker.check_model(model, full_check=True)


def test_exits_nest_one_if_per_exit(compiled):
    result, _ = compiled
    chain = _if_chain(result.model.graph)
    assert len(chain) == len(result.plan.exits) >= 1
    for level, exit_ in enumerate(result.plan.exits):
        graph = result.model.graph if level == 0 else chain[level - 1]
        ops = [n.op_type for n in graph.node]
        assert {"MatMul", "NonZero", "ScatterND", "If"} <= set(ops)
        # the remainder's first act is to compress the continuing rows of the cut tensor
        assert chain[level].node[0].op_type == "Compress" and chain[level].node[0].input[0] == exit_.cut.tensor
        # the exit reads this exit's cut tensor
        assert any(exit_.cut.tensor in n.input for n in graph.node
                   if n.op_type in ("GlobalAveragePool", "GlobalMaxPool", "AveragePool"))


def test_remainder_weights_live_inside_their_subgraph(compiled):
    """Initializers a subgraph needs are its own: onnxruntime cannot pre-pack outer-scope weights."""
    result, _ = compiled
    for graph in _if_chain(result.model.graph):
        own = {init.name for init in graph.initializer}
        produced = {name for n in graph.node for name in n.output}
        for node in graph.node:
            if node.op_type in ("Conv", "Gemm", "MatMul"):
                for name in node.input[1:]:
                    assert name in own, f"{node.op_type} in a subgraph reads {name} from outside"
                    assert name not in produced


def test_no_row_exits_runs_the_full_graph_unchanged(compiled, reference_model, calibration):
    """With every threshold at +inf the compiled graph equals the original on all rows."""
    from moco_compile.passes.graph.rewrite import insert_exits
    from moco_compile.importer import import_model

    result, _ = compiled
    imported = import_model(reference_model)
    closed = [replace(e, thresholds=np.full_like(e.thresholds, np.inf)) for e in result.plan.exits]
    model = insert_exits(imported.model, closed, "logits")
    images = calibration["images"][:128]
    logits, exits = ort.InferenceSession(model.SerializeToString()).run(None, {"images": images})
    expected, = ort.InferenceSession(reference_model.SerializeToString()).run(None, {"images": images})
    assert (exits == -1).all()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


@pytest.mark.slow
def test_model_with_probabilities_and_logits_outputs(reference_model, calibration, tmp_path):
    """Two outputs: the named classifier output (Softmax) carries exit probabilities, and the logits it is
    computed from the exit's logits (tests/test_derived_outputs.py has outputs of other kinds)."""
    from moco_compile import compile

    model = onnx.ModelProto()
    model.CopyFrom(reference_model)
    model.graph.node.append(onnx.helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    model.graph.output.append(onnx.helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["batch", 10]))
    result = compile(model, calibration, output="probs", measure_latency=False, show_progress=False,
                     planner_config=CHEAPEST_PLAN)
    assert [o.name for o in result.model.graph.output] == ["logits", "probs", "moco_exit"]
    images = calibration["images"][:256]
    logits, probs, exits = ort.InferenceSession(result.model.SerializeToString()).run(None, {"images": images})
    full_logits, full_probs = ort.InferenceSession(model.SerializeToString()).run(None, {"images": images})
    exited = exits >= 0
    assert exited.any() and (~exited).any()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs[~exited], full_probs[~exited], atol=1e-5)
    np.testing.assert_allclose(logits[~exited], full_logits[~exited], atol=1e-4)
    exited_probs = np.exp(logits[exited] - logits[exited].max(axis=1, keepdims=True))
    np.testing.assert_allclose(exited_probs / exited_probs.sum(axis=1, keepdims=True), probs[exited], atol=1e-5)
    assert (probs.argmax(1) == full_probs.argmax(1)).mean() > 0.97


def test_the_deepest_plan_allowed_loads_and_one_more_exit_is_refused():
    """Each exit nests the rest one If deeper and protobuf parsers stop at 100 message levels:
    MAX_NESTED_GRAPHS exits load in onnx and onnxruntime and route rows like numpy; one more is a
    clear error, not a DecodeError from the parser."""
    from moco_compile.passes.planning.config import MAX_NESTED_GRAPHS
    from moco_compile.passes.graph.index import subgraph_nesting
    from moco_compile.passes.graph.rewrite import insert_exits

    model, exits = deep_mlp(MAX_NESTED_GRAPHS + 2), exits_at(MAX_NESTED_GRAPHS + 1)
    x = np.random.default_rng(2).normal(size=(512, 8)).astype(np.float32)
    expected = calibrate_routes(model, exits, x, MAX_NESTED_GRAPHS)
    deepest = insert_exits(model, exits[:-1], "logits")
    assert subgraph_nesting(deepest.graph) == MAX_NESTED_GRAPHS
    loaded = onnx.load_from_string(deepest.SerializeToString())
    exit_index = ort.InferenceSession(loaded.SerializeToString()).run(["moco_exit"], {"x": x})[0]
    assert (exit_index == expected).all() and (expected == MAX_NESTED_GRAPHS - 1).any()
    try:
        insert_exits(model, exits, "logits")
    except ValueError as error:
        assert "max_exits" in str(error) and str(MAX_NESTED_GRAPHS) in str(error)
    else:
        raise AssertionError("a plan nesting deeper than an ONNX file can hold was built")
