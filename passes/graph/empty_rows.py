"""Nodes that onnxruntime refuses to run on a batch of 0 rows.

In the flat exit layout (``passes/graph/rewrite.py``) the stages after an exit run on
the rows left, 0 rows once every row of a batch has exited.  onnxruntime 1.32
runs Conv, MatMul, Gemm, pooling, normalisations, Softmax, Compress, ScatterND,
Flatten and the exits' own nodes on 0 rows, but not a Reshape that infers a
dim (``-1``) while another dim is 0 ("The input tensor cannot be reshaped to
the requested shape"): nothing tells it the inferred dim when there are no
elements.  Legacy exports of ``x.view(x.size(0), -1)`` are such Reshapes (the
TinyViT of ``models/zoo.py`` has one).  With ``allowzero=1`` (torch.export's
views) onnxruntime infers the dim from the other non-zero dims and runs.
Rules, for a Reshape without ``allowzero``, by its shape input:

1. a constant: unsafe when it holds both ``-1`` and ``0`` (a copy of the 0-row
   batch dim);
2. a ``Concat`` of pieces: unsafe when some constant piece holds ``-1`` and
   another piece holds ``0`` or is computed at run time from the batch dim
   (``Shape`` of a 0-row tensor gives 0).  A piece is known to hold no batch
   dim when it is a ``Shape`` from axis 1 on, or a ``Gather``/``Slice`` at
   constant positions past axis 0 of a whole ``Shape`` (negative positions
   resolved by the tensor's declared rank), through Unsqueeze/Squeeze/Cast;
3. anything else: unsafe (it may hold ``-1`` and a 0).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from moco_compile.passes.graph.index import GraphIndex


def unsafe_on_no_rows(index: GraphIndex, nodes: Iterable[int]) -> list[str]:
    """Names (or output names) of the Reshapes among node indices ``nodes`` that may fail on 0 rows."""
    graph = index.model.graph
    return [graph.node[i].name or graph.node[i].output[0] for i in nodes
            if graph.node[i].op_type == "Reshape" and not _allows_zero(graph.node[i])
            and _may_fail(index, graph.node[i].input[1])]


def _allows_zero(node: onnx.NodeProto) -> bool:
    return any(a.name == "allowzero" and a.i == 1 for a in node.attribute)


def _may_fail(index: GraphIndex, shape: str) -> bool:
    concat = _concat_pieces(index, shape)
    pieces = concat or [shape]
    values = [_constant_value(index, piece) for piece in pieces]
    if concat is None and values[0] is None:  # rule 3
        return True
    infers = any(v is not None and (v == -1).any() for v in values)
    return infers and any((v == 0).any() if v is not None else not _batch_free(index, piece)
                          for piece, v in zip(pieces, values))


def _concat_pieces(index: GraphIndex, name: str) -> list[str] | None:
    """The inputs of the Concat that makes ``name``; None when no Concat does."""
    node = _producer(index, name)
    return list(node.input) if node is not None and node.op_type == "Concat" else None


def _batch_free(index: GraphIndex, name: str) -> bool:
    """True when the run-time shape piece ``name`` holds only dims past axis 0 of some tensor (rule 2)."""
    node = _producer(index, name)
    if node is None:
        return False
    if node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return _batch_free(index, node.input[0])
    if node.op_type == "Shape":
        start = next((a.i for a in node.attribute if a.name == "start"), 0)
        return _axis(index, node.input[0], start) >= 1
    source = _producer(index, node.input[0]) if node.op_type in ("Gather", "Slice") else None
    positions = _constant_value(index, node.input[1]) if source is not None else None
    if source is None or source.op_type != "Shape" or positions is None \
            or any(a.name == "start" and a.i != 0 for a in source.attribute):
        return False
    return all(_axis(index, source.input[0], int(p)) >= 1 for p in positions.ravel())


def _axis(index: GraphIndex, tensor: str, position: int) -> int:
    """``position`` as an axis of ``tensor``: negative positions count from its declared rank (-1: unknown)."""
    if position >= 0:
        return position
    graph = index.model.graph
    value = next((v for v in [*graph.value_info, *graph.input, *graph.output] if v.name == tensor), None)
    if value is None or not value.type.tensor_type.HasField("shape"):
        return -1
    return len(value.type.tensor_type.shape.dim) + position


def _producer(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    producer = index.producer.get(name)
    return index.model.graph.node[producer] if producer is not None else None


def _constant_value(index: GraphIndex, name: str) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output; None when computed at run time."""
    for init in index.model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = _producer(index, name)
    if node is None or node.op_type != "Constant":
        return None
    attribute = node.attribute[0]
    if attribute.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(attribute.t)
    return np.array(attribute.ints) if attribute.type == onnx.AttributeProto.INTS else None
