"""Read-only index over an ONNX graph: producers, consumers, constants and ancestry.

Every pass that reasons about data flow uses this one index instead of walking
``model.graph`` itself.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import onnx


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Names a node reads: its inputs plus outer-scope names its subgraphs read."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []) + list(attribute.graphs):
            local = {init.name for init in graph.initializer} | {i.name for i in graph.input}
            for inner in graph.node:
                local.update(inner.output)
            for inner in graph.node:
                names.extend(n for n in node_inputs(inner) if n not in local)
    return names


def exposing_every_tensor(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs include every top-level node output (to read them all in one run)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    return probe


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If branches, Loop/Scan bodies)."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it, outermost first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_graphs(sub)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of the graphs nested in it."""
    return (node for sub in all_graphs(graph) for node in sub.node)


def subgraph_nesting(graph: onnx.GraphProto) -> int:
    """How many subgraph levels (If branches, Loop/Scan bodies) nest inside ``graph``; 0 when none."""
    return max((1 + subgraph_nesting(sub) for node in graph.node for sub in subgraphs(node)), default=0)


def opset_of(model: onnx.ModelProto) -> int:
    """The model's opset of the default ONNX domain (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type (``onnx.TensorProto`` enum) of every graph input, output and value_info tensor."""
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in values}


@dataclass
class GraphIndex:
    """Data-flow facts about ``model.graph`` (nodes must be topologically sorted)."""

    model: onnx.ModelProto
    producer: dict[str, int] = field(init=False)
    consumers: dict[str, list[int]] = field(init=False)
    constants: set[str] = field(init=False)

    def __post_init__(self) -> None:
        graph = self.model.graph
        self.producer, self.consumers = {}, {}
        self.constants = {init.name for init in graph.initializer}
        for index, node in enumerate(graph.node):
            inputs = node_inputs(node)
            for name in inputs:
                self.consumers.setdefault(name, []).append(index)
            for name in node.output:
                self.producer[name] = index
            if all(name in self.constants for name in inputs):
                self.constants.update(name for name in node.output if name)

    @cached_property
    def graph_inputs(self) -> list[str]:
        initializers = {init.name for init in self.model.graph.initializer}
        return [i.name for i in self.model.graph.input if i.name not in initializers]

    @cached_property
    def graph_outputs(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def is_constant_node(self, index: int) -> bool:
        """True for nodes computed from constants only (folded or duplicated freely)."""
        return all(name in self.constants for name in self.model.graph.node[index].output if name)

    def ancestors(self, tensor: str) -> set[int]:
        """Indices of the non-constant nodes that ``tensor`` depends on, its producer included."""
        seen: set[int] = set()
        stack = [tensor]
        while stack:
            index = self.producer.get(stack.pop())
            if index is None or index in seen or self.is_constant_node(index):
                continue
            seen.add(index)
            stack.extend(node_inputs(self.model.graph.node[index]))
        return seen

    def probability_head(self, output: str) -> str | None:
        """``Softmax`` or ``LogSoftmax`` when ``output`` is one (through Identity/Cast), else None (logits)."""
        return self._final_head(output)[0]

    def classifier_logits(self, output: str) -> str:
        """The tensor holding ``output``'s logits: the input of its final Softmax/LogSoftmax when it has one,
        else the tensor that ``output`` copies or casts (through Identity/Cast), else ``output`` itself."""
        return self._final_head(output)[1]

    def _final_head(self, output: str) -> tuple[str | None, str]:
        """Walking back from ``output`` through Identity/Cast: the Softmax/LogSoftmax reached (or None) and the
        tensor it reads (else the first tensor no Identity/Cast makes)."""
        tensor = output
        while tensor in self.producer:
            node = self.model.graph.node[self.producer[tensor]]
            if node.op_type in ("Softmax", "LogSoftmax"):
                return node.op_type, node.input[0]
            if node.op_type not in ("Identity", "Cast"):
                break
            tensor = node.input[0]
        return None, tensor

    def derived_nodes(self, tensor: str, source: str) -> list[int] | None:
        """Indices, in graph order, of the nodes that compute ``tensor`` from ``source`` and initializers
        alone (``[]`` for ``source`` itself); None when ``tensor`` also reads a graph input or a node
        with subgraphs runs on the way."""
        initializers = {init.name for init in self.model.graph.initializer}
        found: set[int] = set()
        stack = [tensor]
        while stack:
            name = stack.pop()
            if name == source or name in initializers:
                continue
            index = self.producer.get(name)
            if index is None or subgraphs(self.model.graph.node[index]):
                return None
            if index not in found:
                found.add(index)
                stack.extend(node_inputs(self.model.graph.node[index]))
        return sorted(found)

    def crossing_tensors(self, before: set[int]) -> set[str]:
        """Non-constant tensors that nodes outside ``before`` read from inside it or from graph inputs."""
        produced_before = {name for i in before for name in self.model.graph.node[i].output}
        crossing = set()
        for index, node in enumerate(self.model.graph.node):
            if index in before or self.is_constant_node(index):
                continue
            for name in node_inputs(node):
                if name in produced_before or name in self.graph_inputs:
                    crossing.add(name)
        crossing.update(name for name in self.graph_outputs if name in produced_before or name in self.graph_inputs)
        return crossing
