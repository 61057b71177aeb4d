"""Tiny nets for rewrite tests: a hand-built residual MLP with hand-made exits at every block."""
from __future__ import annotations

import numpy as np
import onnx


def deep_mlp(layers: int, width: int = 8, classes: int = 3) -> onnx.ModelProto:
    """``layers`` residual blocks ``x + relu(x @ w)`` then a classifier: one cut per block."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        weights.append(numpy_helper.from_array(rng.normal(size=(width, width)).astype(np.float32) * 0.1, f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
                  helper.make_node("Add", [x, f"r{i}"], [f"a{i}"])]
        x = f"a{i}"
    weights.append(numpy_helper.from_array(rng.normal(size=(width, classes)).astype(np.float32), "head"))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"]))
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", classes])],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def exits_at(count: int, width: int = 8, classes: int = 3) -> list:
    from moco_compile.passes.graph.cut_points import CutPoint
    from moco_compile.passes.planning.types import Exit
    from moco_compile.passes.calibration.rules import LinearScores

    rng = np.random.default_rng(1)
    return [Exit(CutPoint(f"a{i}", f"block{i}", (1, width), float(i), 1.0), f"a{i}", "flat",
                 LinearScores(rng.normal(size=(width, classes)).astype(np.float32), np.zeros(classes, np.float32)),
                 np.full(classes, 4.0, np.float32), 1.0) for i in range(count)]


def calibrate_routes(model: onnx.ModelProto, exits: list, x: np.ndarray, inserted: int) -> np.ndarray:
    """Set the thresholds of ``exits`` (on :func:`deep_mlp` ``model``'s blocks) so that each takes a
    twentieth of the rows of ``x`` still there; the exit each row takes in a graph holding the first
    ``inserted`` exits (-1: none), computed in numpy."""
    hidden, expected = x, np.full(len(x), -1)
    for i, exit_ in enumerate(exits):
        hidden = hidden + np.maximum(hidden @ onnx.numpy_helper.to_array(model.graph.initializer[i]), 0)
        top = exit_.scores(hidden).max(axis=1)
        exit_.thresholds[:] = np.quantile(top[expected == -1], 0.95)
        expected[(top > exit_.thresholds[0]) & (expected == -1) & (i < inserted)] = i
    return expected
