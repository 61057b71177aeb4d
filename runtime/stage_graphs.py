"""Cut a bucketed compiled graph back into one standalone graph per (stage, bucket).

A bucketed graph (``passes/graph/buckets.py``) holds each stage's instance for each batch bucket as
a subgraph named ``moco_stage<k>_bucket<B>`` that gathers its rows, runs the stage and its exit's
rule, and names its outputs by role.  The stage runner (:mod:`~moco_compile.runtime.staged`) runs
those instances one by one, gathering the rows itself, so each becomes a model of its own here:
the gather dropped (its outputs become the model's inputs), the weights and constants it reads
from the main graph copied in, and the count of real rows (padding rows follow them) an input.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import onnx
from onnx import helper

from moco_compile.constants import (ENTRY_ROWS, exit_count, instance_graph_name, instance_input, instance_output,
                                    instance_positions, instance_tag)
from moco_compile.errors import MocoError

BUCKETED = "bucketed"


class PlanMismatchError(MocoError):
    """plan.json does not describe the compiled graph it was given with."""


@dataclass
class StageGraph:
    """One (stage, bucket) instance as a model: ``gathers`` maps each input to the tensor whose rows
    it takes (a model input at stage 0, the previous stage's carried tensor after); ``count`` is the
    int64 ``[1]`` input holding how many leading rows are real (None when the stage reads none);
    ``roles`` maps each output to its role (``carry/<tensor>``, ``keep``, ``exited/<output>``, ``out/<output>``)."""

    stage: int
    bucket: int | None
    model: onnx.ModelProto
    gathers: dict[str, str]
    count: str | None
    roles: dict[str, str]


def plan_buckets(plan: Mapping, model_name: str) -> tuple[int, tuple[int, ...]]:
    """The number of exits and the batch buckets ``plan`` (plan.json's content) records, or
    :class:`PlanMismatchError` when it is not a bucketed build's plan."""
    layout = plan.get("exit_layout")
    config = plan.get("planner_config") or {}
    if layout != BUCKETED or not isinstance(plan.get("exits"), list) or not config.get("batch_buckets"):
        raise PlanMismatchError(f"plan.json is not a bucketed build's plan (exit_layout {layout!r}): the stage "
                                f"runner needs one compiled with --target cuda or --exit-layout bucketed; "
                                f"{model_name} was given with it")
    return len(plan["exits"]), tuple(int(b) for b in config["batch_buckets"])


def stage_graphs(model: onnx.ModelProto, plan: Mapping, model_name: str = "the model"
                 ) -> dict[tuple[int, int | None], StageGraph]:
    """Every (stage, bucket) instance of the bucketed ``model`` that ``plan`` describes, as a model,
    keyed by (stage, bucket); bucket None: the instance for counts beyond the largest bucket.
    :class:`PlanMismatchError` when the graph lacks an instance the plan implies or has more stages."""
    exits, buckets = plan_buckets(plan, model_name)
    graphs = {graph.name: graph for graph in _all_graphs(model.graph)}
    beyond = instance_graph_name(exits + 1, None)
    missing = [instance_graph_name(stage, bucket) for stage in range(exits + 1) for bucket in (*buckets, None)
               if instance_graph_name(stage, bucket) not in graphs]
    if missing or beyond in graphs:
        found = sorted(name for name in graphs if name.startswith("moco_stage"))
        raise PlanMismatchError(
            f"plan.json does not match {model_name}: the plan has {exits} exits and buckets {list(buckets)}, so "
            f"the graph should hold {(exits + 1) * (len(buckets) + 1)} stage instances, but "
            + (f"{missing[0]} is missing" if missing else f"it has {beyond} too")
            + f" (found {len(found)}); pass the plan.json written with this model.onnx")
    return {(stage, bucket): _standalone(model, graphs[instance_graph_name(stage, bucket)], stage, bucket)
            for stage in range(exits + 1) for bucket in (*buckets, None)}


def _standalone(model: onnx.ModelProto, instance: onnx.GraphProto, stage: int, bucket: int | None) -> StageGraph:
    tag = instance_tag(stage, bucket)
    gathered_prefix, positions = instance_input(tag, ""), instance_positions(tag)
    nodes = [node for node in instance.node  # the runner gathers the rows itself
             if not any(name.startswith((gathered_prefix, positions)) for name in node.output)]
    produced = {name for node in nodes for name in node.output}
    reads = [name for node in nodes for name in _node_reads(node) if name not in produced]
    declared = {value.name: value for value in list(instance.value_info) + list(model.graph.input)}
    main = _MainGraph(model)
    inputs, gathers, count, initializers, constants = [], {}, None, [], []
    for name in dict.fromkeys(reads):
        if name.startswith(gathered_prefix) or name in main.inputs:
            original = name[len(gathered_prefix):] if name.startswith(gathered_prefix) else name
            gathers[name] = original
            inputs.append(_typed(declared.get(name) or declared.get(original), name))
        elif name in main.initializers:
            initializers.append(main.initializers[name])
        elif name in main.constant_producers:
            constants.extend(main.constant_closure(name, initializers))
        elif name == (ENTRY_ROWS if stage == 0 else exit_count(stage - 1)):
            count = name
            inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, [1]))
        else:
            raise PlanMismatchError(f"stage {stage}'s instance for bucket {bucket} reads {name!r} from the main "
                                    "graph, which the stage runner cannot supply: the graph is not one moco wrote")
    graph = helper.make_graph(list({node.output[0]: node for node in constants}.values()) + nodes, instance.name, inputs,
                              list(instance.output), _unique(initializers))
    graph.value_info.extend(value for value in instance.value_info if value.name in produced)
    standalone = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    prefix = instance_output(tag, "")
    return StageGraph(stage, bucket, standalone, gathers, count,
                      {output.name: output.name[len(prefix):] for output in instance.output})


class _MainGraph:
    """The main graph's initializers, inputs and the nodes computed from constants alone."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.inputs = {value.name for value in model.graph.input} - set(self.initializers)
        self.producers = {name: node for node in model.graph.node for name in node.output}
        constant = set(self.initializers)
        self.constant_producers: dict[str, onnx.NodeProto] = {}
        for node in model.graph.node:
            if node.op_type != "If" and all(name in constant for name in node.input if name):
                constant.update(node.output)
                self.constant_producers.update({name: node for name in node.output})

    def constant_closure(self, name: str, initializers: list) -> list[onnx.NodeProto]:
        """The constant nodes computing ``name``, producers first; their initializers go to ``initializers``."""
        node = self.constant_producers[name]
        nodes = []
        for read in node.input:
            if read in self.constant_producers:
                nodes.extend(self.constant_closure(read, initializers))
            elif read in self.initializers:
                initializers.append(self.initializers[read])
        return nodes + [node]


def _typed(value: onnx.ValueInfoProto | None, name: str) -> onnx.ValueInfoProto:
    if value is None or not value.type.HasField("tensor_type"):
        raise PlanMismatchError(f"the compiled graph does not declare the type of {name!r}: rebuild it with this "
                                "moco version")
    typed = onnx.ValueInfoProto()
    typed.CopyFrom(value)
    typed.name = name
    return typed


def _unique(tensors: list[onnx.TensorProto]) -> list[onnx.TensorProto]:
    return list({tensor.name: tensor for tensor in tensors}.values())


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []) + list(attribute.graphs):
                yield from _all_graphs(sub)


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """Names a node reads: its inputs and what its own subgraphs read from outside them."""
    reads = [name for name in node.input if name]
    for attribute in node.attribute:
        for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []) + list(attribute.graphs):
            local = {init.name for init in sub.initializer} | {value.name for value in sub.input}
            local.update(name for inner in sub.node for name in inner.output)
            reads.extend(name for inner in sub.node for name in _node_reads(inner) if name not in local)
    return reads
