"""Bucketed exit layout: every stage runs on one of a few fixed batch sizes, so a GPU's kernels keep their plans.

onnxruntime's CUDA convolutions keep one cuDNN plan per node, for the last input shape only
(DESIGN.md "On CUDA"): in the nested and flat layouts the rows continuing past an exit change
count at every batch and every Conv after the first exit re-plans.  Here the rows entering each
stage are gathered into the smallest of the ``buckets`` that holds them (padding rows repeat real
rows, run, and are dropped on the way back), and each stage has one instance per bucket, chosen
at run time, so each Conv / MatMul / Gemm node instance sees one input shape.  For exits
0..m-1 and buckets B_1 < ... < B_n::

    main graph: N = Shape(inputs)[0]; the initializers, once (every instance reads them);
    If(N > 0), so that no op of the model ever runs on 0 rows, then:
      switch(N): If(N <= B_1) then [pos = Min(arange(B_1), N - 1); stage 0 on Gather(inputs, pos),
                 exit 0's rule, keep = not fired and pos < N] else If(N <= B_2) ... else [stage 0 on
                 the N rows as they are]                    -> cut_0, keep_0, exited values: b_0 rows
      rows = NonZero(keep_0): the one device-to-host read of exit 0 (its count becomes a shape)
      order = TopK(keep_0 first, K = b_0).indices: the continuing rows first, in row order
      If(count > 0)
        then: switch(count): If(count <= B_1) then [stage 1 on Gather(cut_0, order[:B_1]), exit 1's
              rule, ...] else ...                            -> b_1 rows
              exit 1's NonZero, TopK, If ... (the same, one level down)
              results cut to their first `count` rows
        else: 0 rows
      outputs = ScatterND(exit 0's values, rows, If results); cut to the first N rows

Every condition (``count <= B``, ``count > 0``) and every slice end is computed from a shape in the
graph where the count is read, so onnxruntime places them on the CPU and the count crosses to the
host once per exit reached (``If`` conditions, ``Slice`` ends and ``TopK``'s K are CPU inputs).
Instances grow as stages x (buckets + 1), never as a tree: a stage's instances sit in one chain of
``If`` nodes, and the next exit's routing sits beside that chain.  A count above the largest bucket
runs the stage on exactly its rows, as the nested layout would.  Tensor and
node names inside an instance carry its tag (``moco_s<stage>_b<bucket>``, ``_bN`` for the exact
fallback), so names are unique across the whole graph; the rules' constants are hoisted to the main
graph once, beside the model's weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moco_compile.constants import (ENTRY_ROWS, EXIT_OUTPUT, exit_count, instance_graph_name, instance_input,
                                    instance_output, instance_positions, instance_tag)
from moco_compile.passes.graph.exit_graph import ExitGraphBuilder
from moco_compile.passes.graph.index import subgraphs
from moco_compile.passes.planning.config import checked_buckets
from moco_compile.passes.planning.types import Exit





def insert_bucketed_exits(model: onnx.ModelProto, exits: Sequence[Exit], classifier_output: str,
                          buckets: Sequence[int]) -> onnx.ModelProto:
    """Return a new model with ``exits`` inserted in the bucketed layout (module docstring) and
    ``moco_exit`` added; ``ValueError`` for buckets that are empty, not positive, unsorted or repeated."""
    return _BucketedGraphBuilder(model, list(exits), classifier_output, checked_buckets(buckets)).build()


class _BucketedGraphBuilder(ExitGraphBuilder):
    def __init__(self, model: onnx.ModelProto, exits: list[Exit], classifier_output: str,
                 buckets: tuple[int, ...]) -> None:
        super().__init__(model, exits, classifier_output)
        self.buckets = buckets
        self.hoisted: dict[str, onnx.TensorProto] = {}  # constants every instance reads, kept once
        self.inputs = [i.name for i in model.graph.input if i.name not in self.initializers]
        carried = {exit_.cut.tensor for exit_ in exits} - set(self.value_infos)
        if carried:  # the stage runner reads the type of every tensor an instance gathers
            inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
            self.value_infos.update({value.name: value for value in inferred if value.name in carried})
            self.types.update({value.name: value.type.tensor_type.elem_type for value in inferred})

    def build(self) -> onnx.ModelProto:
        nodes, constants = self._trailing_shape_nodes()
        graph_nodes = self.model.graph.node
        nodes = nodes + [graph_nodes[i] for i in range(len(graph_nodes)) if self.index.is_constant_node(i)]
        rows, zero = ENTRY_ROWS, self._constant("moco/zero1", [0])
        nodes.extend([helper.make_node("Shape", [self.inputs[0]], [rows], start=0, end=1),
                      helper.make_node("Greater", [rows, zero], ["moco/entry/any_rows"])])
        # a batch of 0 rows runs no stage: no op of the model ever sees 0 rows
        batch: list = []
        fits = self._fits(0, rows, nodes)
        results = self._level(0, rows, fits, {name: name for name in self.inputs}, None, batch)
        names = [o.name for o in self.outputs] + [EXIT_OUTPUT]
        cut = [f"moco/entry/result/{name}" for name in names]
        batch.extend(helper.make_node("Slice", [src, zero, rows, zero], [dst]) for src, dst in zip(results, cut))
        rows_graph = helper.make_graph(batch, "moco_batch", [], [])
        rows_graph.output.extend(self._value_info(name, original) for name, original in zip(cut, names))
        nodes.append(helper.make_node("If", ["moco/entry/any_rows"], names, name="moco/entry/if_rows",
                                      then_branch=rows_graph,
                                      else_branch=self._empty_branch("moco/entry", "moco_batch_empty")))
        return self._compiled_model(nodes, list(self.model.graph.initializer) + constants + list(self.hoisted.values()))

    # -- one level: a stage's instances, then its exit's routing ------------------------------
    def _level(self, stage: int, rows: str, fits: list[str], sources: dict[str, str], order: str | None,
               nodes: list) -> list[str]:
        """Stage ``stage`` on the ``rows`` (int64 ``[1]``) rows that reach it, its exit and the levels
        after it, appended to ``nodes``: results (one per output, then the exit ids) on the bucket's
        rows.  ``sources``: original name -> tensor (at the previous level's rows) the stage reads;
        ``order``: the previous level's rows, continuing ones first (None at the entry)."""
        roles = self._roles(stage)
        switched = [f"moco/stage{stage}/{role}" for role in roles]
        nodes.append(self._switch(stage, rows, fits, sources, order, switched))
        if stage == len(self.exits):
            ids = f"moco/level{stage}/exit"
            nodes.extend([helper.make_node("Shape", [switched[0]], [f"{ids}/rows"], start=0, end=1),
                          helper.make_node("ConstantOfShape", [f"{ids}/rows"], [ids],
                                           value=numpy_helper.from_array(np.array([-1], np.int64)))])
            return switched + [ids]
        p = f"moco/exit{stage}"
        by_role = dict(zip(roles, switched))
        keep = by_role["keep"]
        count, order_next = exit_count(stage), f"{p}/order"
        nodes.extend(self._routing_nodes(p, keep, count, order_next))
        carried = [self.exits[stage].cut.tensor] + sorted(self._side_inputs(stage + 1))
        then_nodes: list = []
        fits = self._fits(stage + 1, count, nodes)  # beside the count: onnxruntime keeps them on the host
        inner = self._level(stage + 1, count, fits, {name: by_role[f"carry/{name}"] for name in carried},
                            order_next, then_nodes)
        zero = self._constant("moco/zero1", [0])
        kept = [f"{p}/continued/{o.name}" for o in self.outputs] + [f"{p}/continued/exit"]
        then_nodes.extend(helper.make_node("Slice", [src, zero, count, zero], [dst]) for src, dst in zip(inner, kept))
        then_graph = helper.make_graph(then_nodes, f"moco_level_{stage + 1}", [], [])
        then_graph.output.extend(self._value_info(name, original)
                                 for name, original in zip(kept, [o.name for o in self.outputs] + [EXIT_OUTPUT]))
        rest = [f"{p}/rest_out/{o.name}" for o in self.outputs] + [f"{p}/rest_out/exit"]
        skipped = self._empty_branch(p, f"moco_level_{stage + 1}_skipped")
        nodes.append(helper.make_node("If", [f"{p}/any_left"], rest, name=f"{p}/if_rows_left",
                                      then_branch=then_graph, else_branch=skipped))
        results = []
        for position, original in enumerate(self.outputs):
            merged = f"{p}/merged/{original.name}"
            nodes.append(helper.make_node("ScatterND", [by_role[f"exited/{original.name}"], f"{p}/rows",
                                                        rest[position]], [merged]))
            results.append(merged)
        nodes.extend([helper.make_node("ConstantOfShape", [f"{p}/width"], [f"{p}/exit_ids"],
                                       value=numpy_helper.from_array(np.array([stage], np.int64))),
                      helper.make_node("ScatterND", [f"{p}/exit_ids", f"{p}/rows", rest[-1]], [f"{p}/exit"])])
        return results + [f"{p}/exit"]

    def _routing_nodes(self, p: str, keep: str, count: str, order: str) -> list[onnx.NodeProto]:
        """An exit's routing from ``keep``: ``<p>/rows`` (``[count, 1]``, the continuing rows for the
        scatters), ``count`` (int64 ``[1]``, from a shape: on the host), ``<p>/any_left`` and ``order``
        (every row, the continuing ones first in row order: ``TopK`` of ``2 * width * keep - position``,
        its K a shape too)."""
        zero = self._constant("moco/zero1", [0])
        return [
            helper.make_node("NonZero", [keep], [f"{p}/rows_t"]),  # the exit's one device-to-host read
            helper.make_node("Transpose", [f"{p}/rows_t"], [f"{p}/rows"], perm=[1, 0]),
            helper.make_node("Shape", [f"{p}/rows_t"], [count], start=1, end=2),
            helper.make_node("Greater", [count, zero], [f"{p}/any_left"]),
            helper.make_node("Shape", [keep], [f"{p}/width"]),
            helper.make_node("Cast", [f"{p}/width"], [f"{p}/width_f"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Add", [f"{p}/width_f", f"{p}/width_f"], [f"{p}/lift"]),
            helper.make_node("Cast", [keep], [f"{p}/keep_f"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}/keep_f", f"{p}/lift"], [f"{p}/lifted"]),
            helper.make_node("Squeeze", [f"{p}/width_f", zero], [f"{p}/width_s"]),
            helper.make_node("Range", [self._constant("moco/zero_f", 0.0, np.float32), f"{p}/width_s",
                                       self._constant("moco/one_f", 1.0, np.float32)], [f"{p}/positions"]),
            helper.make_node("Sub", [f"{p}/lifted", f"{p}/positions"], [f"{p}/order_key"]),
            helper.make_node("TopK", [f"{p}/order_key", f"{p}/width"], [f"{p}/order_values", order], axis=0),
        ]

    def _roles(self, stage: int) -> list[str]:
        """What a stage's instances return, in order: the final outputs for the last stage; else the
        tensors the later stages read (``carry/<name>``), ``keep`` and each output's exited values."""
        if stage == len(self.exits):
            return [f"out/{o.name}" for o in self.outputs]
        carried = [self.exits[stage].cut.tensor] + sorted(self._side_inputs(stage + 1))
        return [f"carry/{name}" for name in carried] + ["keep"] + [f"exited/{o.name}" for o in self.outputs]

    def _fits(self, stage: int, rows: str, nodes: list) -> list[str]:
        """``rows <= B`` for each bucket ``B``, appended to ``nodes``: the graph where ``rows`` is read
        from a shape, so that onnxruntime runs them on the host (it places a node there only when its
        inputs are host tensors of its own graph or small constants; an outer-scope count would be
        copied to the device and each condition read back, one more sync per bucket tried)."""
        fits = [f"moco/stage{stage}/fits_b{bucket}" for bucket in self.buckets]
        nodes.extend(helper.make_node("LessOrEqual", [rows, self._constant(f"moco/bucket{bucket}", [bucket])], [fit])
                     for bucket, fit in zip(self.buckets, fits))
        return fits

    def _switch(self, stage: int, rows: str, fits: list[str], sources: dict[str, str], order: str | None,
                outputs: list[str]) -> onnx.NodeProto:
        """The chain of ``If`` nodes choosing stage ``stage``'s instance by the conditions ``fits``
        (:meth:`_fits`), which reach the nested branches from the outer scope."""
        chain = self._instance(stage, None, rows, sources, order)
        for position in reversed(range(1, len(self.buckets))):
            names = [f"{name}/from_b{self.buckets[position]}" for name in outputs]
            choice = helper.make_node("If", [fits[position]], names,
                                      name=f"moco/stage{stage}/switch_b{self.buckets[position]}",
                                      then_branch=self._instance(stage, self.buckets[position], rows, sources, order),
                                      else_branch=chain)
            chain = helper.make_graph([choice], f"moco_stage{stage}_above_b{self.buckets[position - 1]}", [], [])
            chain.output.extend(self._role_value(role, name, stage, None)
                                for role, name in zip(self._roles(stage), names))
        return helper.make_node("If", [fits[0]], outputs, name=f"moco/stage{stage}/switch_b{self.buckets[0]}",
                                then_branch=self._instance(stage, self.buckets[0], rows, sources, order),
                                else_branch=chain)

    # -- one instance: a stage (and its exit's rule) at one batch size ------------------------
    def _instance(self, stage: int, bucket: int | None, rows: str, sources: dict[str, str],
                  order: str | None) -> onnx.GraphProto:
        """Stage ``stage`` on ``bucket`` rows (None: exactly ``rows``) gathered from ``sources``, with its
        exit's rule: a subgraph whose outputs follow :meth:`_roles`."""
        tag = instance_tag(stage, bucket)
        nodes: list = []
        local: dict[str, str] = {}
        gathered: list[onnx.ValueInfoProto] = []
        if bucket is None and order is None:
            local.update(sources)
        else:
            positions = self._positions(bucket, rows, order, tag, nodes)
            for name, source in sources.items():
                local[name] = instance_input(tag, name)
                nodes.append(helper.make_node("Gather", [source, positions], [local[name]], name=local[name], axis=0))
                if name in self.value_infos:
                    gathered.append(self._renamed_value(self.value_infos[name], local[name], stage, bucket))
        stage_nodes = [self.model.graph.node[i] for i in self.stages[stage]]
        for node in stage_nodes:
            local.update({name: f"{name}/{tag}" for name in node.output if name})
        nodes.extend(_renamed(node, local, tag) for node in stage_nodes)
        initializers: list = []
        if stage == len(self.exits):
            results = [local[o.name] for o in self.outputs]
        else:
            results = self._exit_results(stage, bucket, rows, local, tag, nodes, initializers)
        roles = self._roles(stage)
        outputs = [instance_output(tag, role) for role in roles]  # named by role, for the stage runner
        gathered_names = {value for value in local.values() if value.startswith(instance_input(tag, ""))}
        produced = {name for node in nodes for name in node.output} - gathered_names  # the runner cuts gathers off
        renames = {name: output for name, output in zip(results, outputs) if name in produced}
        for node in nodes:  # no copy on the way out: the producing node writes the role's name
            node.input[:] = [renames.get(name, name) for name in node.input]
            node.output[:] = [renames.get(name, name) for name in node.output]
        nodes.extend(helper.make_node("Identity", [name], [output], name=output)  # outer tensors passed on
                     for name, output in zip(results, outputs) if name not in produced)
        graph = helper.make_graph(nodes, instance_graph_name(stage, bucket), [], [])
        graph.value_info.extend(value for value in gathered + self._declared(stage_nodes, local, stage, bucket)
                                if value.name not in renames)
        graph.output.extend(self._role_value(role, name, stage, bucket) for role, name in zip(roles, outputs))
        self._hoist(graph, initializers, tag)
        return graph

    def _positions(self, bucket: int | None, rows: str, order: str | None, tag: str, nodes: list) -> str:
        """Rows of the previous level to gather: the first ``bucket`` of ``order`` (the continuing
        ones, then rows that left, as padding), or, at the entry, ``0..N-1`` then the last row repeated."""
        positions = instance_positions(tag)
        zero = self._constant("moco/zero1", [0])
        if order is not None:
            end = rows if bucket is None else self._constant(f"moco/bucket{bucket}", [bucket])
            nodes.append(helper.make_node("Slice", [order, zero, end, zero], [positions]))
            return positions
        last = f"{positions}/last_row"
        nodes.extend([helper.make_node("Sub", [rows, self._constant("moco/one1", [1])], [last]),
                      helper.make_node("Min", [self._arange(bucket), last], [positions])])
        return positions

    def _exit_results(self, stage: int, bucket: int | None, rows: str, local: dict[str, str], tag: str,
                      nodes: list, initializers: list) -> list[str]:
        """Exit ``stage``'s rule on the instance's rows: the carried tensors, ``keep`` (padding rows
        never continue) and each output's exited values."""
        p = f"moco/exit{stage}/{tag}"
        margins, top, keep = self._exit_rule(stage, local, p, nodes, initializers)
        if bucket is not None:
            nodes.extend([helper.make_node("Less", [self._arange(bucket), rows], [f"{p}/real"]),
                          helper.make_node("And", [keep, f"{p}/real"], [f"{p}/keep_real"])])
            keep = f"{p}/keep_real"
        exited = [self._exited_value(original, self.exits[stage], margins, top, p, nodes, initializers)
                  for original in self.outputs]
        carried = [self.exits[stage].cut.tensor] + sorted(self._side_inputs(stage + 1))
        return [local[name] for name in carried] + [keep] + exited

    # -- names, shapes and constants --------------------------------------------------------
    def _declared(self, stage_nodes: Sequence[onnx.NodeProto], local: dict[str, str], stage: int,
                  bucket: int | None) -> list[onnx.ValueInfoProto]:
        """The model's declared shapes of the tensors the instance computes, renamed, the batch dim set
        to the bucket: onnxruntime's shape-checked fusions (SkipLayerNormalization, ...) need them."""
        return [self._renamed_value(self.value_infos[name], local[name], stage, bucket)
                for node in stage_nodes for name in node.output if name in self.value_infos]

    def _role_value(self, role: str, name: str, stage: int, bucket: int | None) -> onnx.ValueInfoProto:
        """The type and shape of an instance's output ``name`` playing ``role`` (see :meth:`_roles`)."""
        if role == "keep":
            return helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, [self._rows_dim(stage, bucket)])
        original = role.split("/", 1)[1]
        if original in self.value_infos:
            return self._renamed_value(self.value_infos[original], name, stage, bucket)
        return helper.make_tensor_value_info(name, self.types.get(original, onnx.TensorProto.FLOAT), None)

    def _renamed_value(self, value: onnx.ValueInfoProto, name: str, stage: int, bucket: int | None
                       ) -> onnx.ValueInfoProto:
        return self._declared_on_rows(value, name, self._rows_dim(stage, bucket))

    @staticmethod
    def _rows_dim(stage: int, bucket: int | None) -> int | str:
        """The batch dim of a stage's tensors: the bucket, or a name of the level's own (a name shared
        by tensors of unequal row counts would tell onnxruntime they are equal)."""
        return f"moco_rows_{stage}" if bucket is None else bucket

    def _hoist(self, graph: onnx.GraphProto, initializers: list[onnx.TensorProto], tag: str) -> None:
        """Move an instance's constants (its exit's weights, thresholds, ...) to the main graph under
        names without the instance's tag: one copy, which every bucket's instance reads."""
        renames = {}
        for tensor in initializers:
            shared = tensor.name.replace(f"/{tag}", "")
            renames[tensor.name] = shared
            if shared not in self.hoisted:
                tensor.name = shared
                self.hoisted[shared] = tensor
        for node in graph.node:
            for position, name in enumerate(node.input):
                node.input[position] = renames.get(name, name)

    def _constant(self, name: str, value: list[int] | float, dtype: type = np.int64) -> str:
        """A named constant in the main graph (kept once), returned by name."""
        if name not in self.hoisted:
            self.hoisted[name] = numpy_helper.from_array(np.array(value, dtype), name)
        return name

    def _arange(self, bucket: int) -> str:
        return self._constant(f"moco/arange{bucket}", list(range(bucket)))


def _renamed(node: onnx.NodeProto, names: dict[str, str], tag: str) -> onnx.NodeProto:
    """A copy of ``node`` reading and writing ``names``' renamed tensors, named with ``tag`` (in its
    own subgraphs too, whose reads of outer tensors follow the renames)."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = f"{node.name or node.output[0]}/{tag}"
    copy.input[:] = [names.get(name, name) for name in node.input]
    copy.output[:] = [names.get(name, name) for name in node.output]
    for graph in subgraphs(copy):
        inner = {name: renamed for name, renamed in names.items()
                 if name not in {o for n in graph.node for o in n.output}}
        for sub in graph.node:
            sub.CopyFrom(_renamed(sub, inner, tag))
    return copy
