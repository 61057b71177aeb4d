"""Binary classifiers with one output column: two-class logits for the passes, the column when shipped.

A classifier trained with a sigmoid (``BCEWithLogitsLoss``) ends in one column: its logit ``z``, or
``Sigmoid(z)``.  moco's passes read ``[N, C]`` outputs with ``C >= 2``, so at import the column
becomes two-class logits ``[0, z]`` (:func:`to_two_class`): their softmax is
``[1 - sigmoid(z), sigmoid(z)]``, the same class and probabilities.  After the rewrite,
:func:`from_two_class` turns the compiled graph's two-class output back into the user's column:
``l1 - l0`` (exactly ``z`` on rows that ran the whole network, the exit's log-odds on rows that left
early), through ``Sigmoid`` where the model ended in one, under the user's name and shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moco_compile.passes.graph.index import GraphIndex


@dataclass(frozen=True)
class BinaryOutput:
    """The user's one-column output ``name`` (a probability when ``sigmoid``, else a logit) and the
    two-class output ``two_class`` the passes read in its place."""

    name: str
    sigmoid: bool
    two_class: str

    def classes(self, values: np.ndarray) -> np.ndarray:
        """Class (0 or 1) of each row of the user's ``[N, 1]`` output values."""
        return (values[:, 0] > (0.5 if self.sigmoid else 0.0)).astype(np.int64)


def to_two_class(model: onnx.ModelProto, output: str) -> tuple[onnx.ModelProto, BinaryOutput]:
    """A copy of ``model`` whose one-column output ``output`` is replaced by two-class logits (module
    docstring), and what :func:`from_two_class` needs to restore it."""
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    tail = _sigmoid_tail(GraphIndex(converted), output)
    sigmoid = bool(tail)
    if sigmoid:
        logit = tail[-1].input[0]
        for node in tail:
            graph.node.remove(node)
    else:  # the logit keeps flowing under a name of its own: the user's name is the restored output's
        logit = f"{output}/logit"
        for node in graph.node:
            node.input[:] = [logit if name == output else name for name in node.input]
            node.output[:] = [logit if name == output else name for name in node.output]
    two_class = f"{output}/two_class"
    declared = next(value for value in graph.output if value.name == output)
    elem = declared.type.tensor_type.elem_type
    graph.node.extend([
        helper.make_node("Shape", [logit], [f"{two_class}/shape"]),
        helper.make_node("ConstantOfShape", [f"{two_class}/shape"], [f"{two_class}/zero"],
                         value=helper.make_tensor("zero", elem, [1], [0])),
        helper.make_node("Concat", [f"{two_class}/zero", logit], [two_class], axis=1)])
    batch = declared.type.tensor_type.shape.dim[0]
    replacement = helper.make_tensor_value_info(two_class, elem, [batch.dim_value or batch.dim_param or None, 2])
    position = list(graph.output).index(declared)
    graph.output.remove(declared)
    graph.output.insert(position, replacement)
    return converted, BinaryOutput(output, sigmoid, two_class)


def _sigmoid_tail(index: GraphIndex, output: str) -> list[onnx.NodeProto]:
    """The nodes from ``output`` back to the Sigmoid that makes it, through Identity nodes that nothing
    else reads, the Sigmoid last; empty when no such Sigmoid makes it."""
    tail, tensor = [], output
    while tensor in index.producer and len(index.consumers.get(tensor, [])) == (tensor != output):
        node = index.model.graph.node[index.producer[tensor]]
        tail.append(node)
        if node.op_type == "Sigmoid":
            return tail
        if node.op_type != "Identity":
            return []
        tensor = node.input[0]
    return []


def from_two_class(compiled: onnx.ModelProto, binary: BinaryOutput) -> onnx.ModelProto:
    """``compiled`` with its two-class output turned back into the user's column (module docstring)."""
    restored = onnx.ModelProto()
    restored.CopyFrom(compiled)
    graph = restored.graph
    two_class = binary.two_class
    declared = next(value for value in graph.output if value.name == two_class)
    difference = f"{two_class}/difference" if binary.sigmoid else binary.name
    at = {value: f"{two_class}/slice_at_{value}" for value in (0, 1, 2)}
    graph.initializer.extend(numpy_helper.from_array(np.array([value], np.int64), name) for value, name in at.items())
    graph.node.extend([
        helper.make_node("Slice", [two_class, at[1], at[2], at[1]], [f"{two_class}/positive"]),
        helper.make_node("Slice", [two_class, at[0], at[1], at[1]], [f"{two_class}/negative"]),
        helper.make_node("Sub", [f"{two_class}/positive", f"{two_class}/negative"], [difference])])
    if binary.sigmoid:
        graph.node.append(helper.make_node("Sigmoid", [difference], [binary.name]))
    batch = declared.type.tensor_type.shape.dim[0]
    replacement = helper.make_tensor_value_info(binary.name, declared.type.tensor_type.elem_type,
                                                [batch.dim_value or batch.dim_param or None, 1])
    position = list(graph.output).index(declared)
    graph.output.remove(declared)
    graph.output.insert(position, replacement)
    return restored
