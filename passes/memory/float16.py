"""Convert a model's float32 weights and arithmetic to float16 (one pass, one job).

onnxruntime's float16 converter (the maintained copy of onnxconverter-common's) does the
conversion, subgraphs included; this pass adds what a build step needs around it:

1. The model's inputs and outputs keep their float32 types unless the caller asks otherwise
   (casts at the boundary), so a converted model is a drop-in.
2. Nodes named in ``keep_float32`` (e.g. the ones validation found overflowing) and the ops
   the converter blocks by default (``DEFAULT_OP_BLOCK_LIST``: Range, TopK, Min/Max, ...) stay
   in float32 behind casts.
3. Between two nodes kept in float32 the converter leaves a float32 -> float16 -> float32 cast
   pair, which would round (and overflow) the very value kept wide: such pairs are removed.
4. The converter appends its casts at the end of node lists; the result is put back in
   topological order so ``onnx.checker``'s full check passes.
"""
from __future__ import annotations

from collections.abc import Iterable

import onnx

from moco_compile.errors import ModelError
from moco_compile.passes.graph.index import node_inputs, subgraphs
from moco_compile.passes.graph.toposort import topologically_sorted


def is_float16(model: onnx.ModelProto) -> bool:
    """True when the model already stores float16 weights."""
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def to_float16(model: onnx.ModelProto, *, keep_io_types: bool = True,
               keep_float32: Iterable[str] = ()) -> onnx.ModelProto:
    """A float16 copy of ``model`` (rules 1-4); nodes named in ``keep_float32`` stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if is_float16(model):
        raise ModelError("the model already stores float16 weights: convert the float32 original instead")
    source = onnx.ModelProto()
    source.CopyFrom(model)
    try:
        converted = convert_float_to_float16(
            source, keep_io_types=keep_io_types, node_block_list=list(keep_float32))
    except Exception as error:  # the converter raises plain exceptions from deep inside onnx
        raise ModelError(f"the float16 conversion failed: {error}. Convert the float32 original model") from error
    _drop_round_trip_casts(converted.graph)
    return topologically_sorted(converted)


def _drop_round_trip_casts(graph: onnx.GraphProto) -> None:
    """Rule 3: rewire readers of Cast(float16) -> Cast(float32) to the float32 value and drop both."""
    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    outputs.update(name for node in graph.node if subgraphs(node)  # read inside a subgraph: keep
                   for name in node_inputs(node) if name not in node.input)
    dropped = set()
    for narrow in graph.node:
        after = readers.get(narrow.output[0], []) if narrow.output else []
        if cast_to(narrow) != onnx.TensorProto.FLOAT16 or narrow.output[0] in outputs or not after \
                or any(cast_to(r) != onnx.TensorProto.FLOAT for r in after):
            continue
        for widen in after:
            for reader in readers.get(widen.output[0], []):
                reader.input[:] = [narrow.input[0] if n == widen.output[0] else n for n in reader.input]
            dropped.add(id(widen))
        dropped.add(id(narrow))
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    for node in graph.node:
        for subgraph in subgraphs(node):
            _drop_round_trip_casts(subgraph)
