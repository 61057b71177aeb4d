"""Rewrite pass: insert the plan's exits into the graph, producing one ONNX model.

Three layouts (``PlannerConfig.exit_layout``), the same inputs, outputs and exits;
one builder writes them (``_body``: a stage, its exit and what follows).  A fourth,
``"bucketed"`` (stages at fixed batch sizes, for GPUs), is written by
:mod:`~moco_compile.passes.graph.buckets`; :func:`insert_exits` dispatches to it.

Nested, for exits 0..m-1 at cut tensors T_0..T_{m-1}::

    level 0 (main graph): stage 0 nodes -> T_0
        exit 0: pooled = pool(T_0); margins = pooled @ W + (b - t)
                fired = ReduceMax(margins) > 0;  keep = Not(fired)
                [guarded: keep = Or(keep, distance(pooled) > tau)]
                rows = NonZero(keep)^T
                If(Size(rows) > 0)
                    then: level 1 graph: rest = Compress(T_0 [and side inputs], keep)
                          [-> an identity MaxPool where a residual block reads it: passes/graph/nchwc_entry.py],
                          stage 1 nodes on `rest` -> T_1, exit 1, If ...
                    else: empty outputs (the batch-1 fast path: nothing else runs)
                outputs = ScatterND(exit values, rows, If outputs)
                moco_exit = ScatterND(Where(keep, 0, 0), rows, If's exit ids)
    level m: stage m nodes -> the original outputs, moco_exit = -1

Flat: the same nodes, every stage in the main graph, no ``If``::

    stage 0 -> T_0; exit 0 -> keep_0, rows_0; rest_0 = Compress(T_0 [and side inputs], keep_0)
    stage 1 on rest_0 -> T_1; exit 1 -> keep_1, rows_1; rest_1 = Compress(...) ... stage m -> outputs
    outputs = ScatterND(exited_0, rows_0, ScatterND(exited_1, rows_1, ... stage m's outputs))

Each exit's rows index the rows that reached it, so the scatters, innermost
first, compose them back to batch rows.  Once every row has exited, the later
stages run on 0 rows (onnxruntime runs Conv, MatMul, pooling, normalisations
and the exits' own nodes on 0 rows; a Reshape inferring a dim beside a 0 dim
it refuses, and a model with one after the first exit is laid out nested:
``passes/graph/empty_rows.py``).  Nothing nests, so any number of exits fits, the
weights live once in the main graph, and onnxruntime optimises the whole chain
as one graph (no If boundary for its CPU layout pass to stop at).

Whole-batch: nested, but no row is split off; the batch leaves when every row has decided::

    level 0 (main graph): stage 0 nodes -> T_0
        exit 0: the rule as above -> margins, keep
                If(some row goes on: ReduceMin(top) <= 0; guarded: any keep)
                    then: level 1 graph on T_0 (every row) -> results;
                          outputs = Where(keep, results, exit values), moco_exit = Where(keep, ids, 0)
                    else: outputs = exit values, moco_exit = 0

No NonZero, Compress or ScatterND: a batch of one row runs fewer nodes per exit (the layout for
batch-1 serving), but in a larger batch one undecided row takes all its rows on.

Nested and whole-batch, every level keeps the initializers its own nodes read inside its own graph
(copies, renamed, where an outer level uses them too): onnxruntime cannot
pre-pack weights that a subgraph reads from the outer scope, and such a
remainder runs 2-3x slower.

An exit with an out-of-distribution guard (``passes/calibration/guard.py``) also keeps the
rows whose guard distance exceeds its threshold: one more ``[D, D]`` MatMul, a
``[D, C]`` MatMul and two reductions on the pooled features.

A plan routed with agreement (the ``"patience"`` family, ``insert_exits(..., agreement=True)``) also
keeps, past the first exit, the rows whose class (the ArgMax of the margins) is not the one they had at
the exit before: each exit's class goes on with the rows that go on, Compressed beside the cut tensor
(nested, flat) or read from the outer scope (whole-batch), then ``Equal``, ``Not`` and ``Or`` into ``keep``.

Exited rows carry, in place of the classifier output, the exit's calibrated
log-probabilities ``scale * log p_rule`` with the exit's class swapped into the
top place (``passes/calibration/exit_confidence.py``; the scale is fitted so that their top
probability matches the full model's confidence), or, for exits without a scale
(plans from before scales, hand-written rules), the margins ``score -
threshold``; through Softmax/LogSoftmax when the model ends in one, cast to the
output's dtype and clipped to its range.  Either way their argmax is the exit's
class.  For a model whose output is raw logits, exited rows carry those scaled
log-probabilities as logits: logits on the full model's scale in the sense that
their softmax matches the full model's confidence (logits are defined up to a
per-row constant, which is not matched).  Outputs the model computes from its classifier's logits alone
(its class by ArgMax, its top-k) get, for exited rows, copies of those nodes run on the exit's logits
(:func:`~moco_compile.passes.graph.exit_graph.derived_outputs`); other outputs carry zeros for exited rows, and
where an output's non-batch dims are dynamic (e.g. ``[N, h*w, 4]`` for images of any size) those
zeros, and the else branch's empty outputs, take dims computed at run time from
the inputs' shapes (``passes/graph/trailing_dims.py``).  Where the graph lets a cut's
spatial dims vary, the exit's pooling is sized at run time too.
``moco_exit`` holds the exit index per row, -1 for the full network.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moco_compile.constants import EXIT_OUTPUT, FLOPS_ORIGINAL_KEY, STAGE_FLOPS_KEY
from moco_compile.passes.calibration.pooling import reduce_nodes
from moco_compile.passes.graph.buckets import insert_bucketed_exits
from moco_compile.passes.graph.empty_rows import unsafe_on_no_rows
from moco_compile.passes.graph.exit_graph import ExitGraphBuilder
from moco_compile.passes.graph.index import node_inputs, subgraph_nesting
from moco_compile.passes.graph.nchwc_entry import nchwc_entry_node, wants_nchwc_entry
from moco_compile.passes.planning.config import (DEFAULT_BATCH_BUCKETS, DEFAULT_EXIT_LAYOUT, EXIT_LAYOUTS,
                                                 LAYOUTS_WITH_AGREEMENT, MAX_NESTED_GRAPHS)
from moco_compile.passes.planning.types import Exit, ExitPlan

log = logging.getLogger("moco")

def insert_exits(model: onnx.ModelProto, exits: Sequence[Exit], classifier_output: str,
                 layout: str = DEFAULT_EXIT_LAYOUT, batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
                 agreement: bool = False) -> onnx.ModelProto:
    """Return a new model with ``exits`` inserted (in graph order) and ``moco_exit`` added.

    ``layout`` is one of :data:`EXIT_LAYOUTS` (see the module docstring; ``"flat"`` falls back to
    ``"nested"``, with a warning, for a model with nodes after the first exit that onnxruntime
    cannot run on 0 rows; ``"bucketed"`` pads the rows entering each stage to ``batch_buckets``:
    :mod:`~moco_compile.passes.graph.buckets`).  Raises ``ValueError`` for another, and when exits
    would nest deeper than an ONNX file can hold
    (:data:`~moco_compile.passes.planning.config.MAX_NESTED_GRAPHS`; the planner never plans that many).
    ``agreement``: past the first exit a row leaves only with the class it had at the exit before
    (:func:`~moco_compile.passes.planning.routing.route`'s condition, the ``"patience"`` family's): each
    exit's class goes on with the rows that go on, as the cut tensor does; the bucketed layout, whose
    stages Triton serves as separate models, does not carry it (``ValueError``).
    """
    if layout not in EXIT_LAYOUTS:
        raise ValueError(f"unknown exit layout {layout!r}: use one of {EXIT_LAYOUTS}")
    levels = len(exits) + subgraph_nesting(model.graph) + (len(batch_buckets) + 1 if layout == "bucketed" else 0)
    if layout != "flat" and levels > MAX_NESTED_GRAPHS:
        raise ValueError(f"{len(exits)} exits would nest subgraphs {levels} levels deep, more than the "
                         f"{MAX_NESTED_GRAPHS} an ONNX file can hold: plan with PlannerConfig(max_exits=...)")
    if layout == "bucketed":
        if agreement:
            raise ValueError(f"the bucketed layout does not carry a row's class between exits, which this plan's "
                             f"routing with agreement (the 'patience' family) needs: use one of "
                             f"{tuple(LAYOUTS_WITH_AGREEMENT)}, or plan without 'patience'")
        return insert_bucketed_exits(model, exits, classifier_output, batch_buckets)
    return _ExitGraphBuilder(model, list(exits), classifier_output, layout, agreement).build()


def apply_plan(model: onnx.ModelProto, plan: ExitPlan, classifier_output: str, layout: str,
               batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS) -> onnx.ModelProto:
    """The one way a plan becomes a graph: a new model with ``plan``'s exits inserted in ``layout``
    (:func:`insert_exits`; ``batch_buckets`` for the bucketed layout) and the cost of leaving at each
    recorded (:func:`annotate_costs`).  ``compile`` calls it on the model it planned; ``optimize-memory``
    on an optimised original with the layout its build records.  ``layout`` has no default, so no
    caller loses a build's layout."""
    return annotate_costs(insert_exits(model, plan.exits, classifier_output, layout, batch_buckets, plan.agreement),
                          plan.stage_flops(), plan.total_flops)


def annotate_costs(model: onnx.ModelProto, stage_flops: Sequence[float], original_flops: float) -> onnx.ModelProto:
    """Record in ``model``'s metadata what a row costs when it leaves at each exit (last entry: the
    full network, every rule on the way included) and the original model's cost; returns ``model``.
    Runtimes read them to report FLOPs saved on live traffic."""
    for key, value in ((STAGE_FLOPS_KEY, json.dumps([float(f) for f in stage_flops])),
                       (FLOPS_ORIGINAL_KEY, repr(float(original_flops)))):
        for entry in [p for p in model.metadata_props if p.key == key]:
            model.metadata_props.remove(entry)
        model.metadata_props.add(key=key, value=value)
    return model


@dataclass
class _Body:
    """What one stage and its exit add to a graph; ``results``: one tensor per output, then the exit ids."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    value_info: list[onnx.ValueInfoProto]
    results: list[str] = field(default_factory=list)


class _ExitGraphBuilder(ExitGraphBuilder):
    def __init__(self, model: onnx.ModelProto, exits: list[Exit], classifier_output: str, layout: str,
                 agreement: bool) -> None:
        super().__init__(model, exits, classifier_output, agreement)
        self.layout = self._usable_layout(layout)
        self.defined_outside: set[str] = set()

    def _usable_layout(self, layout: str) -> str:
        """``layout``, or ``"nested"`` (where no stage runs once no row is left) when a flat chain would
        run a node after an exit that onnxruntime refuses on 0 rows (:mod:`~moco_compile.passes.graph.empty_rows`)."""
        unsafe = unsafe_on_no_rows(self.index, [i for stage in self.stages[1:] for i in stage]) \
            if layout == "flat" else []
        if unsafe:
            log.warning("exits laid out nested, not flat: after the first exit, %s would fail on the 0 rows "
                        "left when every row has exited (a Reshape inferring a dim beside a 0 dim)",
                        ", ".join(unsafe))
            return "nested"
        return layout

    def build(self) -> onnx.ModelProto:
        prologue, constants = self._trailing_shape_nodes()
        body = self._body(0, renames={})
        names = [o.name for o in self.outputs] + [EXIT_OUTPUT]
        nodes = prologue + body.nodes + [helper.make_node("Identity", [src], [dst], name=f"moco/out/{dst}")
                                         for src, dst in zip(body.results, names) if src != dst]
        return self._compiled_model(nodes, constants + body.initializers, body.value_info)

    # -- one stage and its exit -----------------------------------------------------------
    def _body(self, level: int, renames: dict[str, str], entry: Sequence[onnx.NodeProto] = ()) -> _Body:
        """``entry`` nodes, stage ``level`` and exit ``level`` (with the stages after it), or the final outputs."""
        nodes, initializers = self._stage_nodes(level, renames)
        body = _Body([*entry, *nodes], initializers,
                     [self._rows_value_info(node.output[0], node.input[0], level) for node in entry]
                     + self._stage_value_info(nodes, level))
        body.results = self._final_outputs(level, body.nodes) if level == len(self.exits) \
            else self._exit(level, renames, body)
        return body

    def _stage_nodes(self, level: int, renames: dict[str, str]) -> tuple[list, list]:
        """Copies of the stage's nodes with inputs renamed, and the constants they read: private copies
        in a nested level (where an outer level defines them too), the first stage's in a flat graph."""
        nodes, initializers, local = [], [], {}
        graph_nodes = self.model.graph.node
        in_scope = self.defined_outside if self.layout == "flat" else set()
        needed = {name for i in self.stages[level] for name in node_inputs(graph_nodes[i])}
        constant_nodes = [i for i in self._constant_closure(needed)
                          if not in_scope.issuperset(name for name in graph_nodes[i].output if name)]
        for i in constant_nodes + self.stages[level]:
            node = onnx.NodeProto()
            node.CopyFrom(graph_nodes[i])
            for name in list(node_inputs(node)) + list(node.output):
                if (name in self.initializers or i in constant_nodes) and name not in local:
                    local[name] = f"{name}/moco_level{level}" \
                        if name in self.defined_outside and name not in in_scope else name
            if i in constant_nodes:
                for position, name in enumerate(node.output):
                    node.output[position] = local.get(name, name)
            for position, name in enumerate(node.input):
                node.input[position] = local.get(name, renames.get(name, self.full_names.get(name, name)))
            for position, name in enumerate(node.output):
                node.output[position] = self.full_names.get(name, name)
            nodes.append(node)
        for name, private in local.items():
            if name in self.initializers and name not in in_scope:
                copy = onnx.TensorProto()
                copy.CopyFrom(self.initializers[name])
                copy.name = private
                initializers.append(copy)
        self.defined_outside |= set(local)
        return nodes, initializers

    def _final_outputs(self, level: int, nodes: list) -> list[str]:
        outputs = [self.full_names[o.name] for o in self.outputs]
        shape = f"moco/level{level}/batch"
        exit_ids = f"moco/level{level}/exit"
        nodes.append(helper.make_node("Shape", [outputs[0]], [shape], start=0, end=1))
        nodes.append(helper.make_node("ConstantOfShape", [shape], [exit_ids],
                                      value=numpy_helper.from_array(np.array([-1], np.int64))))
        return outputs + [exit_ids]

    def _exit(self, level: int, renames: dict[str, str], body: _Body) -> list[str]:
        if self.layout == "whole-batch":
            return self._whole_batch_exit(level, renames, body)
        exit_ = self.exits[level]
        nodes, initializers = body.nodes, body.initializers
        p = f"moco/exit{level}"
        cut = exit_.cut.tensor
        margins, top, keep = self._exit_rule(level, renames, p, nodes, initializers)
        rows = f"{p}/rows"
        nodes.extend([
            helper.make_node("NonZero", [keep], [f"{p}/rows_t"]),
            helper.make_node("Transpose", [f"{p}/rows_t"], [rows], perm=[1, 0]),
        ])
        carried = [cut] + sorted(self._side_inputs(level + 1)) + self._carried_class(level)
        inner, compress = dict(renames), []
        for name in carried:  # the remainder's entry: nested, inside its branch (local tensors keep fusions)
            rest = f"{p}/rest/{name}"
            self.rest_sources[renames.get(name, name)] = name
            compress.append(helper.make_node("Compress", [renames.get(name, name), keep], [rest], axis=0))
            if wants_nchwc_entry(self.index, name, self.value_infos.get(name)):
                self.rest_sources[rest] = name
                compress.append(nchwc_entry_node(rest, f"{rest}/nchwc"))
                rest = f"{rest}/nchwc"
            inner[name] = rest
        rest_results = self._remainder(level, inner, compress, body)
        results = []
        for position, original in enumerate(self.outputs):
            base = self._exited_value(original, exit_, margins, top, p, nodes, initializers)
            merged = f"{p}/merged/{original.name}"
            nodes.append(helper.make_node("ScatterND", [base, rows, rest_results[position]], [merged]))
            results.append(merged)
        # ``level`` on every row (one node, not Shape + ConstantOfShape): the scatter overwrites the kept rows
        initializers.append(numpy_helper.from_array(np.array(level, np.int64), f"{p}/level"))
        nodes.append(helper.make_node("Where", [keep, f"{p}/level", f"{p}/level"], [f"{p}/exit_ids"]))
        nodes.append(helper.make_node("ScatterND", [f"{p}/exit_ids", rows, rest_results[-1]], [f"{p}/exit"]))
        return results + [f"{p}/exit"]

    def _whole_batch_exit(self, level: int, renames: dict[str, str], body: _Body) -> list[str]:
        """Exit ``level`` laid out whole-batch: ``If`` some row goes on, every row runs the stages after it
        (rows that decided here take this exit's values, by ``Where``), else the batch leaves with them."""
        exit_ = self.exits[level]
        p = f"moco/exit{level}"
        margins, top, keep = self._exit_rule(level, renames, p, body.nodes, body.initializers)
        any_left = self._any_left(level, top, keep, p, body.nodes, body.initializers)
        body.initializers.append(numpy_helper.from_array(np.array(level, np.int64), f"{p}/level"))
        inner, entry = dict(renames), []
        for name in [exit_.cut.tensor] + sorted(self._side_inputs(level + 1)):  # an exit's class: in scope
            if wants_nchwc_entry(self.index, name, self.value_infos.get(name)):
                self.rest_sources[f"{p}/rest/{name}"] = name
                entry.append(nchwc_entry_node(renames.get(name, name), f"{p}/rest/{name}"))
                inner[name] = f"{p}/rest/{name}"
        go_on = self._body(level + 1, inner, entry)
        merged = []
        for position, original in enumerate(self.outputs):
            base = self._exited_value(original, exit_, margins, top, p, go_on.nodes, go_on.initializers, f"{p}/on")
            shape, row_keep = f"{p}/on/keep_shape/{original.name}", f"{p}/on/keep/{original.name}"
            rank = len(original.type.tensor_type.shape.dim)
            go_on.initializers.append(numpy_helper.from_array(np.array([-1] + [1] * (rank - 1), np.int64), shape))
            go_on.nodes.extend([
                helper.make_node("Reshape", [keep, shape], [row_keep]),
                helper.make_node("Where", [row_keep, go_on.results[position], base], [f"{p}/on/{original.name}"])])
            merged.append(f"{p}/on/{original.name}")
        go_on.nodes.append(helper.make_node("Where", [keep, go_on.results[-1], f"{p}/level"], [f"{p}/on/exit"]))
        leave_nodes, leave_initializers = [], []
        leave_results = [self._exited_value(o, exit_, margins, top, p, leave_nodes, leave_initializers, f"{p}/off")
                         for o in self.outputs]
        leave_nodes.append(helper.make_node("Where", [keep, f"{p}/level", f"{p}/level"], [f"{p}/off/exit"]))
        results = [f"{p}/result/{name}" for name in [o.name for o in self.outputs] + [EXIT_OUTPUT]]
        body.nodes.append(helper.make_node(
            "If", [any_left], results, name=f"{p}/if_rows_left",
            then_branch=self._subgraph(go_on.nodes, go_on.initializers, go_on.value_info, [*merged, f"{p}/on/exit"],
                                       f"moco_level_{level + 1}"),
            else_branch=self._subgraph(leave_nodes, leave_initializers, [], [*leave_results, f"{p}/off/exit"],
                                       f"moco_level_{level + 1}_skipped")))
        return results

    def _any_left(self, level: int, top: str, keep: str, p: str, nodes: list, initializers: list) -> str:
        """A bool scalar: some row goes on at exit ``level`` (none on 0 rows).  Where only the margins
        decide, the lowest top margin is <= 0 (ReduceMin of no rows is +inf); else some ``keep`` is set."""
        if self._fires_on_margins_alone(level):
            nodes.extend(reduce_nodes("ReduceMin", top, [0], f"{p}/lowest", f"{p}/lowest", self.opset))
            nodes.append(helper.make_node("LessOrEqual", [f"{p}/lowest", f"{p}/zero"], [f"{p}/any_left"]))
            return f"{p}/any_left"
        initializers.append(numpy_helper.from_array(np.array(0.5, np.float32), f"{p}/half"))
        nodes.append(helper.make_node("Cast", [keep], [f"{p}/keep_f"], to=onnx.TensorProto.FLOAT))
        nodes.extend(reduce_nodes("ReduceMax", f"{p}/keep_f", [0], f"{p}/kept", f"{p}/kept", self.opset))
        nodes.append(helper.make_node("Greater", [f"{p}/kept", f"{p}/half"], [f"{p}/any_left"]))
        return f"{p}/any_left"

    def _remainder(self, level: int, renames: dict[str, str], compress: list[onnx.NodeProto], body: _Body
                   ) -> list[str]:
        """The stages after exit ``level`` run on the rows left (``compress`` makes them): results, one per
        output then the exit ids.  Flat: in ``body``'s graph, on as few as 0 rows.  Nested: in an ``If``
        whose else branch (no row left) returns empty results."""
        if self.layout == "flat":
            rest = self._body(level + 1, renames, compress)
            body.nodes.extend(rest.nodes)
            body.initializers.extend(rest.initializers)
            body.value_info.extend(rest.value_info)
            return rest.results
        p = f"moco/exit{level}"
        body.initializers.append(numpy_helper.from_array(np.array(0, np.int64), f"{p}/no_rows"))
        body.nodes.extend([helper.make_node("Size", [f"{p}/rows"], [f"{p}/rest_count"]),
                           helper.make_node("Greater", [f"{p}/rest_count", f"{p}/no_rows"], [f"{p}/any_left"])])
        rest_results = [f"{p}/rest_out/{o.name}" for o in self.outputs] + [f"{p}/rest_out/exit"]
        body.nodes.append(helper.make_node("If", [f"{p}/any_left"], rest_results, name=f"{p}/if_rows_left",
                                           then_branch=self._branch(level + 1, renames, compress),
                                           else_branch=self._empty_branch(p, f"moco_level_{level + 1}_skipped")))
        return rest_results

    def _branch(self, level: int, renames: dict[str, str], entry: Sequence[onnx.NodeProto]) -> onnx.GraphProto:
        """An If's then branch: stage ``level`` onwards as a subgraph of its own."""
        body = self._body(level, renames, entry)
        return self._subgraph(body.nodes, body.initializers, body.value_info, body.results, f"moco_level_{level}")

    def _subgraph(self, nodes: list, initializers: list, value_info: list, results: Sequence[str], name: str
                  ) -> onnx.GraphProto:
        """An If branch of ``nodes`` whose outputs are ``results``: one per model output, then the exit ids
        (a result from the outer scope, e.g. an exit's margins, through an Identity: a branch's outputs
        must be its own)."""
        own = {output for node in nodes for output in node.output} | {init.name for init in initializers}
        nodes = nodes + [helper.make_node("Identity", [result], [f"{result}/{name}"]) for result in results
                         if result not in own]
        results = [result if result in own else f"{result}/{name}" for result in results]
        graph = helper.make_graph(nodes, name, [], [], initializers)
        graph.value_info.extend(value_info)
        graph.output.extend(self._value_info(result, original)
                            for result, original in zip(results, [o.name for o in self.outputs] + [EXIT_OUTPUT]))
        return graph

    def _rows_value_info(self, name: str, original: str, level: int) -> onnx.ValueInfoProto:
        """Declare a compressed tensor's shape with a named row dimension.

        Without it the row count is an anonymous unknown, onnxruntime cannot prove
        that a block's residual Add sees equal shapes, and it stops fusing the Add
        and the ReLU into the convolution inside the remainder.
        """
        value = self.value_infos.get(self.rest_sources.get(original, original))
        if value is None or not all(d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim[1:]):
            return onnx.ValueInfoProto(name=name)
        return self._declared_on_rows(value, name, self._rows_dim(level), batch_first=True)

    def _rows_dim(self, level: int) -> str | int:
        """The named row dim of stage ``level``'s tensors: the batch's where every row runs it."""
        return self._batch_dim() if level == 0 or self.layout == "whole-batch" else f"moco_rows_{level}"

    def _stage_value_info(self, nodes: Sequence[onnx.NodeProto], level: int) -> list[onnx.ValueInfoProto]:
        """The model's declared shapes of the tensors ``nodes`` compute, the batch dim renamed to the
        level's rows (``moco_rows_<level>``; dims derived from the batch dim left anonymous).

        Without them onnxruntime re-infers shapes from the inputs alone, which an exporter's computed
        Reshapes leave anonymous, and skips the fusions that check shapes: every BERT block's residual
        Add + LayerNormalization stays two ops (SkipLayerNormalization in the original graph), in the
        main graph too; slower, and in a statically quantized model other numbers than the model's.
        """
        return [self._declared_on_rows(self.value_infos[name], name, self._rows_dim(level))
                for name in (name for node in nodes for name in node.output if name in self.value_infos)]

