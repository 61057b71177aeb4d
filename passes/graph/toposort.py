"""Put every graph's nodes, subgraphs included, back in topological order.

Converters (onnxruntime's float16 converter among them) append the casts they add at the end
of a node list, which onnxruntime tolerates but ``onnx.checker`` rejects.  A node is ready once
every name it reads (its inputs and the outer-scope names its subgraphs read) is a graph
input, an initializer, an outer-scope name or the output of a node placed before it; ties keep
the original order.
"""
from __future__ import annotations

import heapq

import onnx

from moco_compile.errors import ModelError
from moco_compile.passes.graph.index import node_inputs, subgraphs


def topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose graph and subgraphs list nodes in topological order."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    _sort(result.graph, outer=set())
    return result


def _sort(graph: onnx.GraphProto, outer: set[str]) -> None:
    available = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    produced_here = {name for node in graph.node for name in node.output if name}
    waiting_on: dict[str, list[int]] = {}
    missing = []
    nodes = list(graph.node)
    for index, node in enumerate(nodes):
        needs = {name for name in node_inputs(node) if name in produced_here and name not in available}
        missing.append(len(needs))
        for name in needs:
            waiting_on.setdefault(name, []).append(index)
    ready = [index for index, count in enumerate(missing) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for name in nodes[index].output:
            for waiter in waiting_on.pop(name, []):
                missing[waiter] -= 1
                if missing[waiter] == 0:
                    heapq.heappush(ready, waiter)
    if len(order) != len(nodes):
        raise ModelError(f"graph {graph.name!r} has a cycle: {len(nodes) - len(order)} nodes can never run. "
                         "Re-export the model")
    scope = available | produced_here
    sorted_nodes = [_copy(nodes[index]) for index in order]
    for node in sorted_nodes:
        for sub in subgraphs(node):
            _sort(sub, scope)
    graph.ClearField("node")
    graph.node.extend(sorted_nodes)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy
