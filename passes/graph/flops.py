"""Per-node cost model: FLOPs per input row, from tensor shapes.

Shapes come from one onnxruntime run on a single example row with every
intermediate tensor exposed, so dynamic reshapes and attention patterns are
measured rather than guessed.  A multiply-add counts as 2 FLOPs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from moco_compile.errors import ModelError
from moco_compile.passes.graph.index import GraphIndex, exposing_every_tensor

# Elementwise-ish ops: FLOPs per output element.
_PER_OUTPUT_ELEMENT = {
    "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Relu": 1, "LeakyRelu": 2, "PRelu": 2, "Clip": 2,
    "Sigmoid": 4, "Tanh": 4, "HardSigmoid": 3, "HardSwish": 4, "Gelu": 8, "Erf": 4, "Exp": 1,
    "Log": 1, "Sqrt": 1, "Pow": 1, "Neg": 1, "Abs": 1, "Max": 1, "Min": 1, "Where": 1,
    "Softmax": 5, "LogSoftmax": 5, "BatchNormalization": 2, "InstanceNormalization": 5,
    "LayerNormalization": 5, "Greater": 1, "Less": 1, "Equal": 1, "Not": 1, "Mish": 6,
    "Softplus": 3, "Elu": 3, "Selu": 3, "Celu": 3,
}
_WEIGHT_INPUT = {"QLinearConv": 3}  # the convolutions' weight input (else 1) and bias input (ConvInteger: none)
_BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "QLinearConv": 8}
_REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "GlobalAveragePool",
               "GlobalMaxPool", "ReduceL2", "ReduceSumSquare", "ArgMax", "ArgMin"}


def measure_shapes(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Run ``model`` once on ``feed`` and return the shape of every top-level tensor."""
    probe = exposing_every_tensor(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, dict(feed))
    except Exception as error:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot run the model on the first calibration row to measure its shapes: "
                         f"{error}. Check that the model runs in onnxruntime on these inputs") from error
    shapes = {name: tuple(value.shape) for name, value in zip(names, values)}
    shapes.update({name: tuple(value.shape) for name, value in feed.items()})
    shapes.update({init.name: tuple(init.dims) for init in model.graph.initializer})
    return shapes


def node_flops(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> float:
    """FLOPs of one node given the shapes of its inputs and outputs."""
    op = node.op_type
    out = shapes.get(node.output[0]) if node.output else None
    if out is None:
        return 0.0
    out_size = math.prod(out)
    if op in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv"):  # the int8 ones: as many multiply-adds
        weight = shapes[node.input[_WEIGHT_INPUT.get(op, 1)]]
        per_output = math.prod(weight[2:]) * weight[0] / max(out[1], 1) if op == "ConvTranspose" \
            else math.prod(weight[1:])
        bias = _BIAS_INPUT.get(op)
        return 2.0 * out_size * per_output + (out_size if bias and len(node.input) > bias and node.input[bias] else 0)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        return 2.0 * out_size * shapes[node.input[0]][-1]
    if op == "Gemm":
        a = shapes[node.input[0]]
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return 2.0 * out_size * (a[0] if trans_a else a[1]) + out_size
    if op == "Einsum":
        return 2.0 * max(math.prod(shapes[name]) for name in node.input) * max(out[-1], 1)
    if op in _REDUCTIONS:
        return float(math.prod(shapes[node.input[0]]))
    if op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = next(attr.ints for attr in node.attribute if attr.name == "kernel_shape")
        return float(out_size * math.prod(kernel))
    return float(out_size * _PER_OUTPUT_ELEMENT.get(op, 0))


def flops_per_row(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], batch: int = 1) -> list[float]:
    """FLOPs of each node of ``model.graph`` per input row (constant nodes cost nothing)."""
    index = GraphIndex(model)
    return [0.0 if index.is_constant_node(i) else node_flops(node, shapes) / batch
            for i, node in enumerate(model.graph.node)]
