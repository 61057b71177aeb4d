"""Read the batch size where it is used, not from the graph input.

``torch.export`` (``torch.onnx.export(dynamo=True)``, torch's default exporter) reads a dynamic batch
size once, as ``Shape(x, start=0, end=1)`` of a graph input, and every later use computes from that
value: torchvision's ConvNeXt and Swin end in a ``flatten`` exported as index arithmetic over it
(``Range(0, batch)``, a ``Gather``) just before the head.  Computed before every layer and read after
all of them, it crosses every tensor that would separate the graph ("the model has no cut point"), and
after an exit it would count the rows of the whole batch, not the rows left.

:func:`localize_batch_reads` gives each node that reads such a value (beyond the shape arithmetic
itself) its own copy of that arithmetic, rooted at ``Shape(t, start=0, end=1)`` of the latest tensor
``t`` the node already depends on whose dimension 0 is the batch.  A cut before the node then finds
the arithmetic in its remainder, reading the rows left.  Outputs are unchanged: ``t`` has the
batch's size on axis 0 (measured, as :func:`batch_leading` says).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

import onnx

from moco_compile.passes.graph.index import GraphIndex, node_inputs


def batch_axis(one_row: tuple[int, ...], two_rows: tuple[int, ...]) -> int | None:
    """The batch's axis of a tensor shaped ``one_row`` on one row and ``two_rows`` on two: the first
    axis of size 1 then 2; None where there is none."""
    if len(one_row) != len(two_rows):
        return None
    return next((axis for axis, sizes in enumerate(zip(one_row, two_rows)) if sizes == (1, 2)), None)


def batch_leading(one_row: Mapping[str, tuple[int, ...]], two_rows: Mapping[str, tuple[int, ...]]) -> set[str]:
    """Tensors whose dimension 0 is the batch (shapes as measured on one row and on two)."""
    return {name for name, shape in two_rows.items() if batch_axis(one_row.get(name, ()), shape) == 0}


def batch_size_roots(model: onnx.ModelProto, excluded: Collection[str] = ()) -> list[int]:
    """Positions of the nodes reading the batch size off a graph input (``Shape(x, start=0, end=1)``);
    ``excluded``: inputs whose shape may be read anywhere (side inputs, compressed with the rows)."""
    index = GraphIndex(model)
    inputs = set(index.graph_inputs) - set(excluded)
    roots = []
    for position, node in enumerate(model.graph.node):
        attributes = {a.name: a.i for a in node.attribute}
        if node.op_type == "Shape" and node.input[0] in inputs and attributes.get("start", 0) == 0 \
                and attributes.get("end") == 1:
            roots.append(position)
    return roots


def localize_batch_reads(model: onnx.ModelProto, leading: Collection[str], excluded: Collection[str] = ()
                         ) -> onnx.ModelProto:
    """A copy of ``model`` in which every node reading a value computed from the batch size (and
    constants only) computes its own from the latest batch-leading tensor among its ancestors
    (``leading``: :func:`batch_leading`); ``model`` itself where no node reads the batch size so."""
    roots = batch_size_roots(model, excluded)
    if not roots:
        return model
    index = GraphIndex(model)
    graph = model.graph
    arithmetic = _arithmetic(model, index, roots)
    values = {name for i in arithmetic for name in graph.node[i].output if name}
    new_nodes: list[onnx.NodeProto] = []
    for position, node in enumerate(graph.node):
        reads = [name for name in node.input if name in values]
        if reads and position not in arithmetic:
            source = _latest_leading(index, node, values, leading)
            if source is not None:
                suffix = f"/moco_batch{position}"
                copies = sorted(_needed(index, reads, arithmetic))
                renamed = {name: f"{name}{suffix}" for i in copies for name in graph.node[i].output if name}
                for i in copies:
                    copy = onnx.NodeProto()
                    copy.CopyFrom(graph.node[i])
                    copy.name = f"{copy.name or copy.op_type}{suffix}"
                    copy.input[:] = [source] if i in roots else [renamed.get(name, name) for name in copy.input]
                    copy.output[:] = [renamed[name] if name else name for name in copy.output]
                    new_nodes.append(copy)
                node = onnx.NodeProto()
                node.CopyFrom(graph.node[position])
                node.input[:] = [renamed.get(name, name) for name in node.input]
        new_nodes.append(node)
    localized = onnx.ModelProto()
    localized.CopyFrom(model)
    del localized.graph.node[:]
    localized.graph.node.extend(_without_dead(new_nodes, values, set(index.graph_outputs)))
    return localized


def _arithmetic(model: onnx.ModelProto, index: GraphIndex, roots: list[int]) -> set[int]:
    """The roots and every node computing from their values and constants only."""
    members, values = set(roots), {name for i in roots for name in model.graph.node[i].output}
    for position, node in enumerate(model.graph.node):
        inputs = [name for name in node.input if name and name not in index.constants]
        if position not in members and inputs and all(name in values for name in inputs) \
                and not index.is_constant_node(position):
            members.add(position)
            values.update(name for name in node.output if name)
    return members


def _needed(index: GraphIndex, reads: list[str], arithmetic: set[int]) -> set[int]:
    """The arithmetic nodes that ``reads`` are computed by, down to the roots."""
    needed, stack = set(), [index.producer[name] for name in reads]
    while stack:
        position = stack.pop()
        if position in needed or position not in arithmetic:
            continue
        needed.add(position)
        stack.extend(index.producer[name] for name in index.model.graph.node[position].input
                     if name in index.producer)
    return needed


def _latest_leading(index: GraphIndex, node: onnx.NodeProto, values: set[str], leading: Collection[str]
                    ) -> str | None:
    """The batch-leading tensor latest in graph order among ``node``'s ancestors outside the arithmetic
    (a graph input counts as first), or None."""
    candidates = set()
    for name in node.input:
        if name and name not in values and name not in index.constants:
            candidates.add(name)
            candidates.update(output for i in index.ancestors(name) for output in index.model.graph.node[i].output)
    found = [name for name in candidates if name in leading and name not in values]
    return max(found, key=lambda name: index.producer.get(name, -1), default=None)


def _without_dead(nodes: list[onnx.NodeProto], values: set[str], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` less the original arithmetic nodes nothing reads any more."""
    while True:
        read = {name for node in nodes for name in node_inputs(node)} | outputs  # a subgraph's reads too
        kept = [node for node in nodes if not (set(node.output) <= values and not set(node.output) & read)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept
