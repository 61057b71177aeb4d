"""Keep onnxruntime's CPU NCHWc layout at the entry of a remainder that starts with a residual block.

A remainder receives its cut tensor compressed to the rows left, in plain NCHW (no NCHWc tensor
crosses an ``If`` boundary or a ``Compress``).  onnxruntime's NCHWc transformer reorders it for the
block's first Conv (``ReorderInput``), but its residual ``Add`` takes only tensors that NCHWc nodes
produced (``TransformBinary``): with one plain input the Add stays a plain Add, so the block's last
Conv is reordered back (``ReorderOutput``), added, Relu'd and reordered again for the next block,
where the original graph runs one Conv with the sum and the Relu fused in.  An identity ``MaxPool``
(1x1 kernel) on the compressed tensor is a pool the transformer converts whatever its input's
layout (``TransformPool`` reorders a plain input): its NCHWc output feeds the Conv and the Add alike,
and the fusion is back (reference CNN: two reorders, an Add and a Relu fewer per exit the rows
pass; the 1x1 pool is one pass over the tensor).

Only where it pays: a float32 ``[N, C, H, W]`` tensor whose ``C`` is a multiple of 16 (the NCHWc
block is 8 or 16 channels by CPU; the transformer leaves other pools in NCHW, where this one would
be a plain copy) that a Conv reads and an Add or Sum adds to a Conv's output.
"""
from __future__ import annotations

import onnx
from onnx import helper

from moco_compile.passes.graph.index import GraphIndex

_BLOCK = 16  # the largest NCHWc block onnxruntime's MLAS uses (AVX-512); 8 on AVX2 divides it


def wants_nchwc_entry(index: GraphIndex, tensor: str, value: onnx.ValueInfoProto | None) -> bool:
    """True when ``tensor`` (declared as ``value``) enters a residual block that onnxruntime's NCHWc
    layout would run unfused from a plain NCHW tensor (module docstring)."""
    if value is None or value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        return False
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].HasField("dim_value") or dims[1].dim_value % _BLOCK:
        return False
    nodes = index.model.graph.node
    readers = [nodes[i] for i in index.consumers.get(tensor, [])]
    return any(n.op_type == "Conv" for n in readers) and any(_residual_of_a_conv(index, n, tensor) for n in readers)


def _residual_of_a_conv(index: GraphIndex, node: onnx.NodeProto, tensor: str) -> bool:
    """``node`` adds ``tensor`` to a Conv's (or BatchNormalization's) output: onnxruntime fuses such an
    Add into the NCHWc Conv only when both are NCHWc (an Add after other ops, e.g. a ConvNeXt block's
    layer scale, stays in NCHW and would reorder the pool's output back)."""
    others = [name for name in node.input if name != tensor]
    return node.op_type in ("Add", "Sum") and bool(others) and all(
        name in index.producer and index.model.graph.node[index.producer[name]].op_type in ("Conv", "BatchNormalization")
        for name in others)


def nchwc_entry_node(compressed: str, output: str) -> onnx.NodeProto:
    """The identity pool writing ``compressed`` to ``output``: onnxruntime runs it in NCHWc layout."""
    return helper.make_node("MaxPool", [compressed], [output], kernel_shape=[1, 1])
