"""Nodes that onnxruntime refuses to run on a batch of 0 rows.

In the flat exit layout (``passes/rewrite.py``) the stages after an exit run on
the rows left, 0 rows once every row of a batch has exited.  onnxruntime 1.32
runs Conv, MatMul, Gemm, pooling, normalisations, Softmax, Compress, ScatterND,
Flatten and the exits' own nodes on 0 rows, but not a Reshape that infers a
dim (``-1``) while another dim is 0 ("The input tensor cannot be reshaped to
the requested shape"): nothing tells it the inferred dim when there are no
elements.  Legacy exports of ``x.view(x.size(0), -1)`` are such Reshapes (the
TinyViT of ``models/zoo.py`` has one).  Rules, for a Reshape's shape input:

1. a constant: unsafe when it holds both ``-1`` and ``0`` (with ``allowzero`` a
   literal 0, without it a copy of the 0-row batch dim);
2. a ``Concat`` of pieces: unsafe when some constant piece holds ``-1`` and
   another piece holds ``0`` or is computed at run time (``Shape`` of a 0-row
   tensor gives 0);
3. anything else: unsafe (it may hold ``-1`` and a 0).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from moco_compile.passes.graph import GraphIndex


def unsafe_on_no_rows(index: GraphIndex, nodes: Iterable[int]) -> list[str]:
    """Names (or output names) of the Reshapes among node indices ``nodes`` that may fail on 0 rows."""
    graph = index.model.graph
    return [graph.node[i].name or graph.node[i].output[0] for i in nodes
            if graph.node[i].op_type == "Reshape" and _may_fail(index, graph.node[i].input[1])]


def _may_fail(index: GraphIndex, shape: str) -> bool:
    pieces = _concat_pieces(index, shape)
    values = [_constant_value(index, piece) for piece in pieces or [shape]]
    if pieces is None and values[0] is None:  # rule 3
        return True
    infers = any(v is not None and (v == -1).any() for v in values)
    return infers and any(v is None or (v == 0).any() for v in values)


def _concat_pieces(index: GraphIndex, name: str) -> list[str] | None:
    """The inputs of the Concat that makes ``name``; None when no Concat does."""
    producer = index.producer.get(name)
    node = index.model.graph.node[producer] if producer is not None else None
    return list(node.input) if node is not None and node.op_type == "Concat" else None


def _constant_value(index: GraphIndex, name: str) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output; None when computed at run time."""
    for init in index.model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    producer = index.producer.get(name)
    node = index.model.graph.node[producer] if producer is not None else None
    if node is None or node.op_type != "Constant":
        return None
    attribute = node.attribute[0]
    if attribute.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(attribute.t)
    return np.array(attribute.ints) if attribute.type == onnx.AttributeProto.INTS else None
