"""Static memory analysis: weights' bytes and peak activation memory from tensor liveness.

Rules, in the order the walk applies them:

1. Weights are the initializers of the graph and of every subgraph, each name counted once;
   they are reported apart from activations.
2. A tensor is allocated when its node runs and freed after the last node that reads it
   (subgraphs' reads of outer-scope names count as reads by the node that owns the
   subgraph).  Graph outputs stay live to the end; graph inputs belong to the caller and are
   not counted.
3. View ops (Reshape, Flatten, Squeeze, Unsqueeze, Identity) share their input's buffer, as
   onnxruntime's allocation planner does: no new bytes, and the buffer lives as long as its
   last view is read.
4. Kernels that allocate temporaries the graph does not show add them while they run:
   onnxruntime's CPU ``Where`` holds two more buffers the size of its output (measured).
5. A node with subgraphs (If, Loop, Scan) costs, while it runs, the live outer tensors plus
   the peak of its costliest branch; the timeline follows that branch.
6. Sizes come from ONNX shape inference on the model with its inputs made concrete; a tensor
   it leaves unsized takes its shape from ``known_shapes`` (one measured run), and a
   remaining symbolic dimension inside a subgraph is taken as the batch size (every row
   continuing: an upper bound for moco's exit branches).  Tensors still unsized are listed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import shape_inference

from moco_compile.passes.graph.index import all_graphs, node_inputs, subgraphs

VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
WORKSPACE_OUTPUTS = {"Where": 2}


@dataclass(frozen=True)
class LiveTensor:
    """One activation live at the peak."""

    name: str
    bytes: int
    producer: str


@dataclass
class LivenessProfile:
    """Peak activation memory of one model at one input size, and how live memory evolves."""

    weight_bytes: int
    peak_bytes: int
    peak_node: str
    live_at_peak: list[LiveTensor]
    timeline: list[tuple[str, int]] = field(repr=False)
    unsized: list[str]

    def top_tensors(self, count: int = 10) -> list[LiveTensor]:
        """The largest tensors live at the peak."""
        return sorted(self.live_at_peak, key=lambda t: -t.bytes)[:count]


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer in the model and its subgraphs (rule 1)."""
    seen: dict[str, int] = {}
    for graph in all_graphs(model.graph):
        for init in graph.initializer:
            seen.setdefault(init.name, _tensor_bytes(init))
    return sum(seen.values())


def liveness(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]],
             known_shapes: Mapping[str, tuple[int, ...]] | None = None) -> LivenessProfile:
    """Peak activation memory of ``model`` run on inputs of ``input_shapes`` (rules 2-6)."""
    inferred = _inferred(_with_input_shapes(model, input_shapes))
    batch = next(iter(input_shapes.values()))[0] if input_shapes else 1
    sizes = _SizeTable(inferred, dict(known_shapes or {}), batch)
    walk = _Walk(sizes)
    walk.graph(inferred.graph, base=0, outer=frozenset())
    return LivenessProfile(weight_bytes=weight_bytes(model), peak_bytes=walk.peak_bytes, peak_node=walk.peak_node,
                           live_at_peak=walk.live_at_peak, timeline=walk.timeline, unsized=sorted(sizes.unsized))


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(tensor.dims) * itemsize


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference with value propagation, else without it, else none (sizes then come from
    the measured shapes alone)."""
    for data_prop in (True, False):
        try:
            return shape_inference.infer_shapes(model, data_prop=data_prop)
        except shape_inference.InferenceError:
            continue
    return model


def _with_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    for graph in all_graphs(concrete.graph):
        del graph.value_info[:]
    for value in concrete.graph.input:
        if value.name in input_shapes:
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for size in input_shapes[value.name]:
                shape.dim.add().dim_value = int(size)
    return concrete


class _SizeTable:
    """Bytes of each tensor name (rule 6)."""

    def __init__(self, model: onnx.ModelProto, known_shapes: dict[str, tuple[int, ...]], batch: int) -> None:
        self.types: dict[str, onnx.TypeProto] = {}
        self.top_level = {name for node in model.graph.node for name in node.output}
        for graph in all_graphs(model.graph):
            for value in list(graph.value_info) + list(graph.output) + list(graph.input):
                self.types.setdefault(value.name, value.type)
        self.known_shapes = known_shapes
        self.batch = batch
        self.unsized: set[str] = set()

    def bytes_of(self, name: str) -> int:
        value_type = self.types.get(name)
        if value_type is None or not value_type.HasField("tensor_type"):
            self.unsized.add(name)
            return 0
        tensor = value_type.tensor_type
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize if tensor.elem_type else 4
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if tensor.HasField("shape") and all(d is not None for d in dims):
            return math.prod(dims) * itemsize
        if name in self.known_shapes:
            return math.prod(self.known_shapes[name]) * itemsize
        if tensor.HasField("shape") and name not in self.top_level:
            return math.prod(self.batch if d is None else d for d in dims) * itemsize
        self.unsized.add(name)
        return 0


class _Walk:
    """Walks nodes in order, tracking live buffers; records the timeline and the peak."""

    def __init__(self, sizes: _SizeTable) -> None:
        self.sizes = sizes
        self.timeline: list[tuple[str, int]] = []
        self.peak_bytes = 0
        self.peak_node = ""
        self.live_at_peak: list[LiveTensor] = []

    def graph(self, graph: onnx.GraphProto, base: int, outer: frozenset[LiveTensor]) -> None:
        """Walk ``graph`` while ``base`` bytes (the tensors ``outer``) are held outside it."""
        last_read = _last_reads(graph)
        kept = {o.name for o in graph.output}
        live: dict[str, LiveTensor] = {}
        buffer_of: dict[str, str] = {}
        buffer_end: dict[str, float] = {}
        for step, node in enumerate(graph.node):
            label = f"{node.name or node.output[0]} ({node.op_type})"
            branches = [self._branch(sub, base + _total(live), outer | frozenset(live.values()))
                        for sub in subgraphs(node)]
            for name in filter(None, node.output):
                is_view = node.op_type in VIEW_OPS and node.input and node.input[0] in buffer_of
                buffer = buffer_of[node.input[0]] if is_view else name
                if not is_view:
                    live[name] = LiveTensor(name, self.sizes.bytes_of(name), label)
                buffer_of[name] = buffer
                end = math.inf if name in kept else last_read.get(name, step)
                buffer_end[buffer] = max(buffer_end.get(buffer, step), end)
            if branches:
                self._absorb(max(branches, key=lambda walk: walk.peak_bytes))
            workspace = WORKSPACE_OUTPUTS.get(node.op_type, 0) * sum(live[n].bytes for n in node.output if n in live)
            self._record(label, base + _total(live) + workspace, outer | frozenset(live.values()))
            for buffer in [b for b in live if buffer_end[b] <= step]:
                del live[buffer]

    def _branch(self, graph: onnx.GraphProto, base: int, outer: frozenset[LiveTensor]) -> _Walk:
        walk = _Walk(self.sizes)
        walk.graph(graph, base, outer)
        return walk

    def _absorb(self, branch: _Walk) -> None:
        self.timeline.extend(branch.timeline)
        if branch.peak_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_node, self.live_at_peak = \
                branch.peak_bytes, branch.peak_node, branch.live_at_peak

    def _record(self, label: str, total: int, live: frozenset[LiveTensor]) -> None:
        self.timeline.append((label, total))
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_node, self.live_at_peak = total, label, list(live)


def _total(live: Mapping[str, LiveTensor]) -> int:
    return sum(tensor.bytes for tensor in live.values())


def _last_reads(graph: onnx.GraphProto) -> dict[str, int]:
    last: dict[str, int] = {}
    for step, node in enumerate(graph.node):
        for name in node_inputs(node):
            last[name] = step
    return last


def feed_shapes(feed: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shapes of an input feed, the form :func:`liveness` takes."""
    return {name: tuple(values.shape) for name, values in feed.items()}
