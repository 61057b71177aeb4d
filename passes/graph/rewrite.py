"""Rewrite pass: insert the plan's exits into the graph, producing one ONNX model.

Two layouts (``PlannerConfig.exit_layout``), the same inputs, outputs and exits;
one builder writes both (``_body``: a stage, its exit and what follows).

Nested, for exits 0..m-1 at cut tensors T_0..T_{m-1}::

    level 0 (main graph): stage 0 nodes -> T_0
        exit 0: pooled = pool(T_0); margins = pooled @ W + (b - t)
                fired = ReduceMax(margins) > 0;  keep = Not(fired)
                [guarded: keep = Or(keep, distance(pooled) > tau)]
                rows = NonZero(keep)^T
                If(Size(rows) > 0)
                    then: level 1 graph: rest = Compress(T_0 [and side inputs], keep),
                          stage 1 nodes on `rest` -> T_1, exit 1, If ...
                    else: empty outputs (the batch-1 fast path: nothing else runs)
                outputs = ScatterND(exit values, rows, If outputs)
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

Nested, every level keeps the initializers its own nodes read inside its own graph
(copies, renamed, where an outer level uses them too): onnxruntime cannot
pre-pack weights that a subgraph reads from the outer scope, and such a
remainder runs 2-3x slower.

An exit with an out-of-distribution guard (``passes/calibration/guard.py``) also keeps the
rows whose guard distance exceeds its threshold: one more ``[D, D]`` MatMul, a
``[D, C]`` MatMul and two reductions on the pooled features.

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
per-row constant, which is not matched); other outputs carry zeros for exited rows, and where an output's
non-batch dims are dynamic (e.g. ``[N, h*w, 4]`` for images of any size) those
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

from moco_compile.constants import ADDED_NODE_PREFIX, EXIT_OUTPUT, FLOPS_ORIGINAL_KEY, STAGE_FLOPS_KEY
from moco_compile.passes.calibration.exit_confidence import exited_logits_nodes
from moco_compile.passes.calibration.guard import guard_nodes
from moco_compile.passes.calibration.pooling import pooling_inputs, reduce_nodes, variant_nodes
from moco_compile.passes.graph.empty_rows import unsafe_on_no_rows
from moco_compile.passes.graph.index import GraphIndex, all_nodes, elem_types, node_inputs, subgraph_nesting
from moco_compile.passes.graph.trailing_dims import has_dynamic_trailing_dims, trailing_shape_nodes
from moco_compile.passes.planning.config import DEFAULT_EXIT_LAYOUT, EXIT_LAYOUTS, MAX_NESTED_GRAPHS
from moco_compile.passes.planning.types import Exit, ExitPlan

log = logging.getLogger("moco")
_NEVER = float(np.finfo(np.float32).max)
# largest finite value of float types narrower than float32 (exited classifier outputs are clipped to it)
_NARROW_FLOAT_MAX = {onnx.TensorProto.FLOAT16: float(np.finfo(np.float16).max),
                     onnx.TensorProto.BFLOAT16: (2 - 2 ** -7) * 2.0 ** 127}


def insert_exits(model: onnx.ModelProto, exits: Sequence[Exit], classifier_output: str,
                 layout: str = DEFAULT_EXIT_LAYOUT) -> onnx.ModelProto:
    """Return a new model with ``exits`` inserted (in graph order) and ``moco_exit`` added.

    ``layout`` is one of :data:`EXIT_LAYOUTS` (see the module docstring; ``"flat"`` falls back to
    ``"nested"``, with a warning, for a model with nodes after the first exit that onnxruntime
    cannot run on 0 rows).  Raises ``ValueError`` for another, and when nested exits would nest
    deeper than an ONNX file can hold
    (:data:`~moco_compile.passes.planning.config.MAX_NESTED_GRAPHS`; the planner never plans that many).
    """
    if layout not in EXIT_LAYOUTS:
        raise ValueError(f"unknown exit layout {layout!r}: use one of {EXIT_LAYOUTS}")
    builder = _ExitGraphBuilder(model, list(exits), classifier_output, layout)
    levels = len(exits) + subgraph_nesting(model.graph)
    if builder.layout == "nested" and levels > MAX_NESTED_GRAPHS:
        raise ValueError(f"{len(exits)} exits would nest subgraphs {levels} levels deep, more than the "
                         f"{MAX_NESTED_GRAPHS} an ONNX file can hold: plan with PlannerConfig(max_exits=...)")
    return builder.build()


def apply_plan(model: onnx.ModelProto, plan: ExitPlan, classifier_output: str, layout: str) -> onnx.ModelProto:
    """The one way a plan becomes a graph: a new model with ``plan``'s exits inserted in ``layout``
    (:func:`insert_exits`) and the cost of leaving at each recorded (:func:`annotate_costs`).
    ``compile`` calls it on the model it planned; ``optimize-memory`` on an optimised original with
    the layout its build records.  ``layout`` has no default, so no caller loses a build's layout."""
    return annotate_costs(insert_exits(model, plan.exits, classifier_output, layout), plan.stage_flops(),
                          plan.total_flops)


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


class _ExitGraphBuilder:
    def __init__(self, model: onnx.ModelProto, exits: list[Exit], classifier_output: str, layout: str) -> None:
        self.model = model
        self.exits = exits
        self.output = classifier_output
        self.index = GraphIndex(model)
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.outputs = [o for o in model.graph.output]
        self.value_infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + self.outputs}
        self.types = elem_types(model)
        self.full_names = {o.name: f"moco/full/{o.name}" for o in self.outputs}
        self.rest_sources: dict[str, str] = {}  # compressed tensor -> original tensor
        # outputs besides the classifier whose non-batch dims are dynamic: exited rows get zeros
        # shaped by int64 tensors computed once in the main graph (see passes/graph/trailing_dims.py)
        self.dynamic_outputs = [o.name for o in self.outputs
                                if o.name != self.output and has_dynamic_trailing_dims(o)]
        self.trailing_shapes: dict[str, str] = {}
        self.stages = self._partition()
        self.layout = self._usable_layout(layout)
        self.defined_outside: set[str] = set()

    def _partition(self) -> list[list[int]]:
        """Node indices of each stage: stage k ends at exit k's cut; the last stage is the rest."""
        assigned: set[int] = set()
        stages = []
        for exit_ in self.exits:
            ancestors = self.index.ancestors(exit_.cut.tensor)
            stages.append(sorted(ancestors - assigned))
            assigned |= ancestors
        stages.append([i for i in range(len(self.model.graph.node))
                       if i not in assigned and not self.index.is_constant_node(i)])
        return stages

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
        graph = helper.make_graph(nodes, self.model.graph.name or "moco_compiled", [], [],
                                  constants + body.initializers)
        graph.value_info.extend(body.value_info)
        graph.input.extend(i for i in self.model.graph.input if i.name not in self.initializers)
        graph.output.extend(self.outputs)
        graph.output.append(helper.make_tensor_value_info(EXIT_OUTPUT, onnx.TensorProto.INT64, [self._batch_dim()]))
        graph.output[-1].doc_string = "index of the exit each row took; -1 = full network"
        compiled = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                     producer_name="moco", ir_version=self.model.ir_version)
        compiled.metadata_props.extend(self.model.metadata_props)
        _name_added_nodes(compiled.graph)
        return compiled

    def _batch_dim(self) -> str | int:
        dims = next(o for o in self.outputs if o.name == self.output).type.tensor_type.shape.dim
        return dims[0].dim_param or "batch" if dims and not dims[0].HasField("dim_value") else "batch"

    def _trailing_shape_nodes(self) -> tuple[list, list]:
        """Nodes (and their constants) computing, once at the top level, the non-batch dims of the
        outputs whose dims are dynamic (``self.trailing_shapes``; see passes/graph/trailing_dims.py)."""
        if not (self.exits and self.dynamic_outputs):
            return [], []
        nodes, constants, self.trailing_shapes = trailing_shape_nodes(self.model, self.dynamic_outputs,
                                                                      "moco/trailing_dims")
        return nodes, constants

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

    def _constant_closure(self, needed: set[str]) -> list[int]:
        """Constant nodes (computed from initializers only) whose outputs ``needed`` reaches."""
        found: set[int] = set()
        stack = [n for n in needed if n in self.index.constants and n in self.index.producer]
        while stack:
            producer = self.index.producer[stack.pop()]
            if producer in found:
                continue
            found.add(producer)
            stack.extend(n for n in node_inputs(self.model.graph.node[producer]) if n in self.index.producer)
        return sorted(found)

    def _final_outputs(self, level: int, nodes: list) -> list[str]:
        outputs = [self.full_names[o.name] for o in self.outputs]
        shape = f"moco/level{level}/batch"
        exit_ids = f"moco/level{level}/exit"
        nodes.append(helper.make_node("Shape", [outputs[0]], [shape], start=0, end=1))
        nodes.append(helper.make_node("ConstantOfShape", [shape], [exit_ids],
                                      value=numpy_helper.from_array(np.array([-1], np.int64))))
        return outputs + [exit_ids]

    def _exit(self, level: int, renames: dict[str, str], body: _Body) -> list[str]:
        exit_ = self.exits[level]
        nodes, initializers = body.nodes, body.initializers
        p = f"moco/exit{level}"
        cut = exit_.cut.tensor
        pooled = f"{p}/pooled"
        nodes.extend(variant_nodes(cut, exit_.pooling, exit_.cut.shape, pooled, p, inputs=renames,
                                   fixed_size=self._fixed_size(cut), opset=self.opset))
        if self.types.get(cut, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [pooled], [f"{pooled}_f32"], to=onnx.TensorProto.FLOAT))
            pooled = f"{pooled}_f32"
        margins = f"{p}/margins"
        nodes.extend(self._margin_nodes(exit_, pooled, margins, p, initializers))
        initializers.append(numpy_helper.from_array(np.array(0.0, np.float32), f"{p}/zero"))
        top, keep, rows = f"{p}/top", f"{p}/keep", f"{p}/rows"
        nodes.extend(reduce_nodes("ReduceMax", margins, [1], top, f"{p}/top", self.opset))
        if exit_.guard is None:
            nodes.append(helper.make_node("LessOrEqual", [top, f"{p}/zero"], [keep]))
        else:
            nodes.extend(guard_nodes(exit_.guard, pooled, f"{p}/unfamiliar", f"{p}/guard", self.opset, initializers))
            nodes.extend([helper.make_node("LessOrEqual", [top, f"{p}/zero"], [f"{p}/not_fired"]),
                          helper.make_node("Or", [f"{p}/not_fired", f"{p}/unfamiliar"], [keep])])
        nodes.extend([
            helper.make_node("NonZero", [keep], [f"{p}/rows_t"]),
            helper.make_node("Transpose", [f"{p}/rows_t"], [rows], perm=[1, 0]),
        ])
        carried = [cut] + sorted(self._side_inputs(level + 1))
        inner, compress = dict(renames), []
        for name in carried:  # the remainder's entry: nested, inside its branch (local tensors keep fusions)
            rest = f"{p}/rest/{name}"
            self.rest_sources[renames.get(name, name)] = name
            compress.append(helper.make_node("Compress", [renames.get(name, name), keep], [rest], axis=0))
            inner[name] = rest
        rest_results = self._remainder(level, inner, compress, body)
        results = []
        for position, original in enumerate(self.outputs):
            base = self._exited_value(original, exit_, margins, top, p, nodes, initializers)
            merged = f"{p}/merged/{original.name}"
            nodes.append(helper.make_node("ScatterND", [base, rows, rest_results[position]], [merged]))
            results.append(merged)
        nodes.append(helper.make_node("Shape", [top], [f"{p}/batch"]))
        nodes.append(helper.make_node("ConstantOfShape", [f"{p}/batch"], [f"{p}/exit_ids"],
                                      value=numpy_helper.from_array(np.array([level], np.int64))))
        nodes.append(helper.make_node("ScatterND", [f"{p}/exit_ids", rows, rest_results[-1]], [f"{p}/exit"]))
        return results + [f"{p}/exit"]

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
                                           else_branch=self._empty_branch(level)))
        return rest_results

    def _branch(self, level: int, renames: dict[str, str], entry: Sequence[onnx.NodeProto]) -> onnx.GraphProto:
        """An If's then branch: stage ``level`` onwards as a subgraph of its own."""
        body = self._body(level, renames, entry)
        graph = helper.make_graph(body.nodes, f"moco_level_{level}", [], [], body.initializers)
        graph.value_info.extend(body.value_info)
        graph.output.extend(self._value_info(name, original)
                            for name, original in zip(body.results, [o.name for o in self.outputs] + [EXIT_OUTPUT]))
        return graph

    @staticmethod
    def _margin_nodes(exit_: Exit, pooled: str, margins: str, p: str, initializers: list) -> list:
        """``margins = scores - thresholds``; disabled classes (threshold inf) get -FLT_MAX."""
        thresholds = np.where(np.isfinite(exit_.thresholds), exit_.thresholds, _NEVER)
        initializers.append(numpy_helper.from_array(exit_.scores.weight.astype(np.float32), f"{p}/weight"))
        matmul = helper.make_node("MatMul", [pooled, f"{p}/weight"], [f"{p}/linear"])
        if exit_.scores.normalize == "none":  # fold the thresholds into the bias: one Add
            offset = np.where(np.isfinite(exit_.thresholds), exit_.scores.bias - exit_.thresholds, -_NEVER)
            initializers.append(numpy_helper.from_array(offset.astype(np.float32), f"{p}/offset"))
            return [matmul, helper.make_node("Add", [f"{p}/linear", f"{p}/offset"], [margins])]
        initializers.extend([numpy_helper.from_array(exit_.scores.bias.astype(np.float32), f"{p}/bias"),
                             numpy_helper.from_array(thresholds.astype(np.float32), f"{p}/thresholds")])
        return [matmul, helper.make_node("Add", [f"{p}/linear", f"{p}/bias"], [f"{p}/logits"]),
                helper.make_node("LogSoftmax", [f"{p}/logits"], [f"{p}/log_probs"], axis=1),
                helper.make_node("Sub", [f"{p}/log_probs", f"{p}/thresholds"], [margins])]

    def _exited_value(self, original: onnx.ValueInfoProto, exit_: Exit, margins: str, top: str, p: str,
                      nodes: list, initializers: list) -> str:
        """What exited rows carry in ``original``: margins for the classifier, zeros otherwise."""
        elem = original.type.tensor_type.elem_type
        name = f"{p}/exited/{original.name}"
        if original.name == self.output:
            return self._exited_classifier_value(elem, exit_, margins, p, name, nodes, initializers)
        if original.name in self.trailing_shapes:
            trailing = self.trailing_shapes[original.name]
        else:
            trailing = f"{name}/trailing"
            initializers.append(numpy_helper.from_array(np.array(_trailing_dims(original), np.int64), trailing))
        nodes.append(helper.make_node("Shape", [top], [f"{name}/batch"]))
        nodes.append(helper.make_node("Concat", [f"{name}/batch", trailing], [f"{name}/shape"], axis=0))
        nodes.append(helper.make_node("ConstantOfShape", [f"{name}/shape"], [name],
                                      value=helper.make_tensor("zero", elem, [1], [0])))
        return name

    def _exited_classifier_value(self, elem: int, exit_: Exit, margins: str, p: str, name: str, nodes: list,
                                 initializers: list) -> str:
        """The exit's calibrated log-probabilities when it has a confidence scale
        (:func:`~moco_compile.passes.calibration.exit_confidence.exited_logits_nodes`), else its float32 margins;
        through the model's final Softmax/LogSoftmax if it has one, in the output's dtype; values
        beyond a narrower float's range (-FLT_MAX for classes an exit switched off) are clipped to
        it, so no exited row carries -inf."""
        value = margins
        if exit_.confidence_scale is not None and exit_.scores.normalize == "log_softmax":
            value = f"{name}/calibrated"
            nodes.extend(exited_logits_nodes(f"{p}/log_probs", margins, exit_.confidence_scale, value,
                                             f"{p}/confidence", initializers))
        head = self.index.probability_head(self.output)
        if head:
            nodes.append(helper.make_node(head, [value], [f"{name}/{head}"], axis=-1))
            value = f"{name}/{head}"
        if elem == onnx.TensorProto.FLOAT:
            return value
        if elem in _NARROW_FLOAT_MAX:
            limit = _NARROW_FLOAT_MAX[elem]
            initializers.extend([numpy_helper.from_array(np.array(-limit, np.float32), f"{name}/lowest"),
                                 numpy_helper.from_array(np.array(limit, np.float32), f"{name}/highest")])
            nodes.append(helper.make_node("Clip", [value, f"{name}/lowest", f"{name}/highest"],
                                          [f"{name}/clipped"]))
            value = f"{name}/clipped"
        nodes.append(helper.make_node("Cast", [value], [name], to=elem))
        return name

    def _side_inputs(self, level: int) -> set[str]:
        """Graph inputs that stages (or exits' pooling) from ``level`` on still read (e.g. an attention mask)."""
        inputs = set(self.index.graph_inputs)
        pooled = {name for exit_ in self.exits[level:] for name in pooling_inputs(exit_.pooling)}
        return pooled | {name for stage in self.stages[level:] for i in stage
                         for name in node_inputs(self.model.graph.node[i]) if name in inputs}

    def _rows_value_info(self, name: str, original: str, level: int) -> onnx.ValueInfoProto:
        """Declare a compressed tensor's shape with a named row dimension.

        Without it the row count is an anonymous unknown, onnxruntime cannot prove
        that a block's residual Add sees equal shapes, and it stops fusing the Add
        and the ReLU into the convolution inside the remainder.
        """
        value = self.value_infos.get(self.rest_sources.get(original, original))
        dims = [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim[1:]] if value else None
        if value is None or not all(dims):
            return onnx.ValueInfoProto(name=name)
        return helper.make_tensor_value_info(name, value.type.tensor_type.elem_type, [f"moco_rows_{level}", *dims])

    def _stage_value_info(self, nodes: Sequence[onnx.NodeProto], level: int) -> list[onnx.ValueInfoProto]:
        """The model's declared shapes of the tensors ``nodes`` compute, the batch dim renamed to the
        level's rows (``moco_rows_<level>``; dims derived from the batch dim left anonymous).

        Without them onnxruntime re-infers shapes from the inputs alone, which an exporter's computed
        Reshapes leave anonymous, and skips the fusions that check shapes: every BERT block's residual
        Add + LayerNormalization stays two ops (SkipLayerNormalization in the original graph), in the
        main graph too; slower, and in a statically quantized model other numbers than the model's.
        """
        batch = self._batch_dim()
        declared = []
        for name in (name for node in nodes for name in node.output if name in self.value_infos):
            value = onnx.ValueInfoProto()
            value.CopyFrom(self.value_infos[name])
            if level:
                for dim in value.type.tensor_type.shape.dim:
                    if dim.dim_param == batch:
                        dim.dim_param = f"moco_rows_{level}"
                    elif batch in dim.dim_param:
                        dim.Clear()
            declared.append(value)
        return declared

    def _empty_branch(self, level: int) -> onnx.GraphProto:
        """The If's else branch (no row left): every output with 0 rows and its non-batch dims."""
        no_rows = f"moco/exit{level}/empty/no_rows"
        nodes, outputs = [], []
        initializers = [numpy_helper.from_array(np.array([0], np.int64), no_rows)] if self.trailing_shapes else []
        for original in self.outputs + [None]:
            if original is None:
                elem, dims, name = onnx.TensorProto.INT64, [], f"moco/exit{level}/empty/exit"
            else:
                elem, dims = original.type.tensor_type.elem_type, _trailing_dims(original)
                name = f"moco/exit{level}/empty/{original.name}"
            outputs.append(helper.make_tensor_value_info(name, elem, [0, *dims]))
            if original is not None and original.name in self.trailing_shapes:
                nodes.extend([
                    helper.make_node("Concat", [no_rows, self.trailing_shapes[original.name]], [f"{name}/shape"],
                                     axis=0),
                    helper.make_node("ConstantOfShape", [f"{name}/shape"], [name],
                                     value=helper.make_tensor("zero", elem, [1], [0]))])
            else:
                dtype = helper.tensor_dtype_to_np_dtype(elem)
                initializers.append(numpy_helper.from_array(np.zeros([0, *dims], dtype), name))
        return helper.make_graph(nodes, f"moco_level_{level + 1}_skipped", [], outputs, initializers)

    def _value_info(self, name: str, original: str) -> onnx.ValueInfoProto:
        if original == EXIT_OUTPUT:
            return helper.make_tensor_value_info(name, onnx.TensorProto.INT64, ["rows"])
        value = next(o for o in self.outputs if o.name == original)
        return helper.make_tensor_value_info(name, value.type.tensor_type.elem_type, ["rows", *_trailing_dims(value)])

    def _fixed_size(self, tensor: str) -> bool:
        """True when the graph fixes every non-batch dim of ``tensor`` (pooling may bake them in)."""
        value = self.value_infos.get(tensor)
        return value is not None and value.type.tensor_type.HasField("shape") \
            and not has_dynamic_trailing_dims(value)


def _name_added_nodes(graph: onnx.GraphProto) -> None:
    """Name each node moco added (its outputs are ``moco/...``) after its first output, so later
    passes can tell moco's nodes from the model's (float16 keeps them in float32)."""
    for node in all_nodes(graph):
        if not node.name and node.output and node.output[0].startswith(ADDED_NODE_PREFIX):
            node.name = node.output[0]


def _trailing_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """Declared non-batch dims of ``value``: numbers, or names (``""`` when anonymous)."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim[1:]]
