"""Candidate cut points: tensors that separate a graph into a prefix and a remainder.

A tensor T is a cut when every non-constant value that the remainder (all
nodes that are not ancestors of T) reads from the prefix is T itself, apart
from declared side inputs (graph inputs such as ``attention_mask`` that the
remainder still reads).  Inside residual and multi-branch blocks the skip
tensor is live across the block, so only block boundaries qualify.

Tensors computed from side inputs alone (a transformer's extended attention
mask, shapes read off ``token_type_ids``, position embeddings) are *side
tensors*: they may cross a cut too, because the remainder can recompute them
from the compressed side inputs.  :func:`localize_side_tensors` makes it do so,
by giving every consumer its own copy of the (cheap) nodes that compute them;
the rewrite then compresses the side graph inputs with the cut tensor.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import onnx
import onnx.numpy_helper

from moco_compile.passes.graph.index import GraphIndex

HEAVY_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "MatMulInteger", "QLinearConv",
             "QLinearMatMul", "ConvInteger"}
RECURRENT_OPS = {"GRU", "LSTM", "RNN"}  # their tensors carry the batch on axis 1 (or 2): no cut (yet)
# A statically quantized graph rounds a block's output through QuantizeLinear -> DequantizeLinear
# before the next block's MatMuls; onnxruntime fuses that pair with its consumers into integer kernels.
# A cut at the DequantizeLinear output would put the exit's Compress between them (no fusion in the
# branch, other numbers than the model's): the float tensor before the QuantizeLinear separates too.
_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
_INTEGER_OUTPUT_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"}  # and QLinear*


@dataclass(frozen=True)
class CutPoint:
    """A place where the graph can be split, with the cost on each side (FLOPs per row)."""

    tensor: str
    module: str
    shape: tuple[int, ...]
    flops_before: float
    flops_after: float
    side_inputs: tuple[str, ...] = ()
    sequence_mask: str = ""  # text models: the [N, S] mask input that sequence pooling reads
    summary_token: str = "first_token"  # text models: the token that sums a sequence up (pooling.SUMMARY_TOKENS)
    tokens: bool = False  # a rank-3 [N, S, D] tensor of token states, pooled over its tokens (reads_tokens)

    @property
    def fraction_before(self) -> float:
        return self.flops_before / (self.flops_before + self.flops_after)


def find_cut_points(model: onnx.ModelProto, node_flops: Sequence[float],
                    shapes: Mapping[str, tuple[int, ...]],
                    scopes: Mapping[str, tuple[str, ...]] | None = None,
                    side_inputs: Iterable[str] = (), min_fraction: float = 0.02,
                    merge_fraction: float = 0.005, sequence_mask: str = "", summary_token: str = "first_token",
                    min_fraction_before: float | None = None) -> list[CutPoint]:
    """Return the useful cut points of ``model`` in execution order.

    ``node_flops`` is the per-row cost of each node, ``shapes`` the tensor shapes
    at batch 1.  Cuts with less than ``min_fraction`` of the FLOPs on either
    side are dropped (``min_fraction_before``, when given, replaces it for the
    prefix: a text model's embeddings cost almost nothing yet are a useful cut),
    and of cuts closer than ``merge_fraction`` of the FLOPs (e.g. a block's Add
    and the ReLU after it) only the last is kept.

    ``side_inputs`` are graph inputs the remainder may read (e.g.
    ``attention_mask``); tensors computed from them alone may cross a cut too
    (see :func:`side_tensors`).  ``sequence_mask`` names the ``[N, S]`` mask of a
    text model; it is recorded on rank-3 cuts so pooling can be mask-aware, with
    ``summary_token`` (``last_token`` for a causal decoder).
    An embedding lookup (``Gather`` from a weight matrix) starts the network
    like a heavy op does, so the embeddings' output is a candidate.
    """
    index = GraphIndex(model)
    side = set(side_inputs)
    derived = side_tensors(model, side) if side else set()
    allowed_crossing = side | derived
    graph_inputs = set(index.graph_inputs)
    side_nodes = {index.producer[name] for name in derived}  # e.g. Shape(input_ids): the remainder
    # may read an input through side nodes only, and the rewrite then carries that input too
    initializer_ranks = {init.name: len(init.dims) for init in model.graph.initializer}
    total = float(sum(node_flops))
    heavy_seen = False
    separating: list[CutPoint] = []
    for position, node in enumerate(model.graph.node):
        heavy_seen = heavy_seen or node.op_type in HEAVY_OPS or (
            bool(side) and node.op_type == "Gather" and initializer_ranks.get(node.input[0], 0) >= 2)
        if not heavy_seen or index.is_constant_node(position):
            continue
        for tensor in node.output:
            if not tensor or tensor in index.graph_outputs or tensor in derived or node.op_type in _QDQ_OPS \
                    or not _is_batched_float(model, tensor, shapes, node.op_type):
                continue
            before = index.ancestors(tensor)
            crossing = index.crossing_tensors(before)
            carried = {name for name in crossing if name in graph_inputs and (name in side or all(
                consumer in before or consumer in side_nodes for consumer in index.consumers.get(name, [])))}
            if crossing - allowed_crossing - carried != {tensor}:
                continue
            flops_before = sum(node_flops[i] for i in before)
            shape = shapes[tensor]
            sequence = len(shape) == 3 and bool(sequence_mask)
            separating.append(CutPoint(tensor, _module_name(model, index, tensor, scopes or {}),
                                       shape, flops_before, total - flops_before,
                                       tuple(sorted(carried)), sequence_mask if sequence else "", summary_token,
                                       sequence or (len(shape) == 3 and reads_tokens(index, tensor))))
    low = min_fraction if min_fraction_before is None else min_fraction_before
    useful = [cut for cut in separating
              if low <= cut.fraction_before <= 1 - min_fraction]
    return unique_names([cut for cut, following in zip(useful, useful[1:] + [None])
                         if following is None or following.flops_before - cut.flops_before > merge_fraction * total])


def reads_tokens(index: GraphIndex, tensor: str) -> bool:
    """Whether the rank-3 ``tensor`` holds token states ``[N, S, D]`` rather than channels ``[N, C, L]``: a
    consumer normalises it over its last axis (``LayerNormalization``, or the ``ReduceMean`` a decomposed
    one starts with) or multiplies its last axis by a weight matrix (a ``Linear`` on every token), as the
    blocks of a vision transformer (ViT, DeiT, Swin) or a text model without a mask input read theirs."""
    graph = index.model.graph
    initializers = {init.name: init for init in graph.initializer}
    for position in index.consumers.get(tensor, []):
        node = graph.node[position]
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "LayerNormalization" and attributes.get("axis", -1) in (-1, 2):
            return True
        if node.op_type == "ReduceMean":  # axes: an attribute before opset 18, an input from it on
            axes = node.input[1] if len(node.input) > 1 else ""
            axes = attributes.get("axes", []) if not axes else \
                onnx.numpy_helper.to_array(initializers[axes]).tolist() if axes in initializers else []
            if list(axes) in ([-1], [2]):
                return True
        if node.op_type == "MatMul" and node.input[0] == tensor and node.input[1] in initializers \
                and len(initializers[node.input[1]].dims) == 2:
            return True
    return False


def unique_names(cuts: Sequence[CutPoint]) -> list[CutPoint]:
    """``cuts`` with every module name that several share numbered in execution order
    (``blocks.0[0]``, ``blocks.0[1]``): a residual Add written inline in a block's forward, or a
    module called twice, gives cuts inside the same module."""
    return [replace(cut, module=name) for cut, name in zip(cuts, numbered_repeats([cut.module for cut in cuts]))]


def numbered_repeats(names: Sequence[str]) -> list[str]:
    """``names`` with each non-empty name that several share numbered in order (``a[0]``, ``a[1]``)."""
    counts = Counter(name for name in names if name)
    seen: Counter = Counter()
    numbered = []
    for name in names:
        if counts[name] > 1:
            numbered.append(f"{name}[{seen[name]}]")
            seen[name] += 1
        else:
            numbered.append(name)
    return numbered


def _is_batched_float(model: onnx.ModelProto, tensor: str, shapes: Mapping[str, tuple[int, ...]],
                      producer: str) -> bool:
    """Whether ``tensor`` (an output of a ``producer`` node) holds one float row per input row."""
    shape = shapes.get(tensor)
    if shape is None or len(shape) < 2 or shape[0] != 1:
        return False
    for value in model.graph.value_info:
        if value.name == tensor:
            return value.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    # untyped by shape inference (contrib ops such as QLinearAdd): the quantized ops' outputs are integers
    return not (producer.startswith("QLinear") or producer in _INTEGER_OUTPUT_OPS)


def _module_name(model: onnx.ModelProto, index: GraphIndex, tensor: str,
                 scopes: Mapping[str, tuple[str, ...]]) -> str:
    """The outermost module whose last node produces ``tensor`` (i.e. the module's output)."""
    position = index.producer[tensor]
    later = {scope for node in model.graph.node[position + 1:] for name in node.output[:1]
             for scope in scopes.get(name, ())}
    return outermost_unused_scope(scopes.get(tensor, ()), later)


def outermost_unused_scope(own: Sequence[str], later: Collection[str]) -> str:
    """The first of ``own`` (module scopes, outermost first) that no later node runs in; the innermost
    when every one runs again (a module called twice, e.g. ALBERT's shared layers); "" for no scope."""
    return next((scope for scope in own if scope not in later), own[-1] if own else "")


def side_inputs_of(model: onnx.ModelProto, node_flops: Sequence[float], max_fraction: float = 0.05) -> tuple[str, ...]:
    """Graph inputs besides the main one: those whose own computation (the nodes that read only
    them and constants, :func:`side_tensors`) costs under ``max_fraction`` of the model's FLOPs,
    such as a feature vector joined before the head.  The main input (an image) feeds the whole
    network.  Empty when no input stands out as main (one input, or all cheap on their own)."""
    index = GraphIndex(model)
    total = float(sum(node_flops))
    side = []
    for name in index.graph_inputs:
        producers = {index.producer[tensor] for tensor in side_tensors(model, [name])}
        if sum(node_flops[i] for i in producers) < max_fraction * total:
            side.append(name)
    return tuple(side) if len(side) < len(index.graph_inputs) else ()


def side_tensors(model: onnx.ModelProto, side_inputs: Iterable[str]) -> set[str]:
    """Tensors computed from ``side_inputs`` and constants only (a text model's extended mask, a
    side feature vector's own layers).  Hidden states never are: they read the main input.

    Also the output of ``Shape`` (and of nodes over it) on any graph input: a shape is re-read
    from the compressed input just as well.
    """
    index = GraphIndex(model)
    side = set(side_inputs)
    graph_inputs = set(index.graph_inputs)
    derived: set[str] = set()
    for position, node in enumerate(model.graph.node):
        if index.is_constant_node(position) or node.attribute and any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        inputs = [name for name in node.input if name and name not in index.constants]
        if node.op_type == "Shape" and inputs and inputs[0] in graph_inputs:
            derived.update(name for name in node.output if name)
        elif inputs and all(name in side or name in derived for name in inputs):
            derived.update(name for name in node.output if name)
    return derived


def localize_side_tensors(model: onnx.ModelProto, side_inputs: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which every node reading side tensors computes its own.

    After this, a cut's remainder never reads a side tensor from the prefix: it
    reads the side *graph inputs*, which the rewrite compresses to the rows left.
    The copies are cheap (masks, shapes, a side vector's small layers) and onnxruntime's
    common-subexpression elimination merges them again where they share a graph.  Outputs
    are unchanged.
    """
    derived = side_tensors(model, side_inputs)
    if not derived:
        return model
    index = GraphIndex(model)
    graph = model.graph
    outputs = set(index.graph_outputs)
    new_nodes: list[onnx.NodeProto] = []
    for position, node in enumerate(graph.node):
        if any(name in derived for name in node.output) and not any(name in outputs for name in node.output):
            continue  # recomputed by each consumer below (unless the model outputs it)
        reads = [name for name in node.input if name in derived]
        if reads:
            suffix = f"/moco_side{position}"
            copies = _closure(model, index, reads, derived)
            renamed = {name: f"{name}{suffix}" for i in copies for name in graph.node[i].output if name}
            for i in copies:
                copy = onnx.NodeProto()
                copy.CopyFrom(graph.node[i])
                copy.name = f"{copy.name or copy.op_type}{suffix}"
                copy.input[:] = [renamed.get(name, name) for name in copy.input]
                copy.output[:] = [renamed.get(name, name) for name in copy.output]
                new_nodes.append(copy)
            node = _copy_with_inputs(node, renamed)
        new_nodes.append(node)
    localized = onnx.ModelProto()
    localized.CopyFrom(model)
    del localized.graph.node[:]
    localized.graph.node.extend(new_nodes)
    return localized


def _closure(model: onnx.ModelProto, index: GraphIndex, names: Sequence[str], derived: set[str]) -> list[int]:
    """Positions (sorted) of the side nodes that compute ``names``."""
    found: set[int] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in derived:
            continue
        producer = index.producer[name]
        if producer in found:
            continue
        found.add(producer)
        stack.extend(n for n in model.graph.node[producer].input if n)
    return sorted(found)


def _copy_with_inputs(node: onnx.NodeProto, renamed: Mapping[str, str]) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [renamed.get(name, name) for name in copy.input]
    return copy
