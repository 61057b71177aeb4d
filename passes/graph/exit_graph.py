"""What every exit layout builds alike: the base of the graph builders that insert a plan's exits.

:class:`ExitGraphBuilder` holds the model's index, splits its nodes into stages (stage k ends at
exit k's cut, the last stage is the rest), and writes the parts that do not depend on how the
stages are laid out: an exit's rule (pooling, linear scores, thresholds, guard), what exited rows
carry in each output, and the declared shapes of outputs.  The layouts subclass it:
:mod:`~moco_compile.passes.graph.rewrite` (nested, flat) and :mod:`~moco_compile.passes.graph.buckets`
(bucketed).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moco_compile.constants import ADDED_NODE_PREFIX, EXIT_OUTPUT
from moco_compile.passes.calibration.exit_confidence import exited_logits_nodes, swap_is_identity
from moco_compile.passes.calibration.guard import guard_nodes
from moco_compile.passes.calibration.mlp_head import MLPScores
from moco_compile.passes.calibration.pooling import pooling_inputs, reduce_nodes, variant_nodes
from moco_compile.passes.graph.index import GraphIndex, all_nodes, elem_types, node_inputs, opset_of
from moco_compile.passes.graph.trailing_dims import has_dynamic_trailing_dims, trailing_shape_nodes
from moco_compile.passes.planning.types import Exit

_NEVER = float(np.finfo(np.float32).max)
# largest finite value of float types narrower than float32 (exited classifier outputs are clipped to it)
_NARROW_FLOAT_MAX = {onnx.TensorProto.FLOAT16: float(np.finfo(np.float16).max),
                     onnx.TensorProto.BFLOAT16: (2 - 2 ** -7) * 2.0 ** 127}




class ExitGraphBuilder:
    """Base of the layout builders: ``build()`` (in a subclass) returns the model with ``exits`` inserted."""

    def __init__(self, model: onnx.ModelProto, exits: list[Exit], classifier_output: str,
                 agreement: bool = False) -> None:
        self.model = model
        self.exits = exits
        self.agreement = agreement  # past the first exit, a row leaves only with its class at the exit before
        self.output = classifier_output
        self.index = GraphIndex(model)
        self.opset = opset_of(model)
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.outputs = [o for o in model.graph.output]
        self.value_infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + self.outputs}
        self.input_symbols = {dim.dim_param for value in model.graph.input for dim in value.type.tensor_type.shape.dim
                              if dim.dim_param}
        self.types = elem_types(model)
        self.full_names = {o.name: f"moco/full/{o.name}" for o in self.outputs}
        # outputs computed from the classifier's logits alone (its class, its probabilities): exited rows get
        # them computed from the exit's logits by copies of those nodes; other outputs get zeros
        self.logits = self.index.classifier_logits(classifier_output)
        self.derived = derived_outputs(self.index, classifier_output)
        self._exited_logits: dict[tuple, str] = {}  # per exit and graph: its exited rows' float32 logits
        self.rest_sources: dict[str, str] = {}  # compressed tensor -> original tensor
        # outputs besides the classifier whose non-batch dims are dynamic: exited rows get zeros
        # shaped by int64 tensors computed once in the main graph (see passes/graph/trailing_dims.py)
        self.dynamic_outputs = [o.name for o in self.outputs
                                if o.name != self.output and has_dynamic_trailing_dims(o)]
        self.trailing_shapes: dict[str, str] = {}
        self.stages = self._partition()

    def _compiled_model(self, nodes: list, initializers: list, value_info: list = ()) -> onnx.ModelProto:
        """The compiled model around a main graph of ``nodes``: the model's inputs, its outputs plus
        ``moco_exit``, its opsets and metadata; moco's nodes named."""
        graph = helper.make_graph(nodes, self.model.graph.name or "moco_compiled", [], [], initializers)
        graph.value_info.extend(value_info)
        graph.input.extend(i for i in self.model.graph.input if i.name not in self.initializers)
        graph.output.extend(self.outputs)
        graph.output.append(helper.make_tensor_value_info(EXIT_OUTPUT, onnx.TensorProto.INT64, [self._batch_dim()]))
        graph.output[-1].doc_string = "index of the exit each row took; -1 = full network"
        compiled = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                     producer_name="moco", ir_version=self.model.ir_version)
        compiled.metadata_props.extend(self.model.metadata_props)
        name_added_nodes(compiled.graph)
        return compiled

    def _exit_rule(self, level: int, renames: dict[str, str], p: str, nodes: list, initializers: list
                   ) -> tuple[str, str, str]:
        """Exit ``level``'s rule on its cut tensor (read through ``renames``), in tensors prefixed ``p``:
        returns the names of its margins ``[N, C]`` (score - threshold), their row maximum ``[N]`` and
        ``keep`` (bool ``[N]``: the row goes on, because no class fired, the guard sends it on or, routed
        with agreement, its class is not the one it had at the exit before: :meth:`_class_tensor`)."""
        exit_ = self.exits[level]
        cut = exit_.cut.tensor
        pooled = f"{p}/pooled"
        nodes.extend(variant_nodes(renames.get(cut, cut), exit_.pooling, exit_.cut.shape, pooled, p, inputs=renames,
                                   fixed_size=self._fixed_size(cut), opset=self.opset))
        if self.types.get(cut, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [pooled], [f"{pooled}_f32"], to=onnx.TensorProto.FLOAT))
            pooled = f"{pooled}_f32"
        margins = f"{p}/margins"
        nodes.extend(self._margin_nodes(exit_, pooled, margins, p, initializers))
        initializers.append(numpy_helper.from_array(np.array(0.0, np.float32), f"{p}/zero"))
        top, keep = f"{p}/top", f"{p}/keep"
        nodes.extend(reduce_nodes("ReduceMax", margins, [1], top, f"{p}/top", self.opset))
        reasons = []  # to go on besides no class firing
        if exit_.guard is not None:
            nodes.extend(guard_nodes(exit_.guard, pooled, f"{p}/unfamiliar", f"{p}/guard", self.opset, initializers))
            reasons.append(f"{p}/unfamiliar")
        if self.agreement and len(self.exits) > 1:
            nodes.append(helper.make_node("ArgMax", [margins], [self._class_tensor(level)], axis=1, keepdims=0))
            if level:
                before = self._class_tensor(level - 1)
                nodes.extend([helper.make_node("Equal", [self._class_tensor(level), renames.get(before, before)],
                                               [f"{p}/agrees"]),
                              helper.make_node("Not", [f"{p}/agrees"], [f"{p}/disagrees"])])
                reasons.append(f"{p}/disagrees")
        so_far = f"{p}/not_fired" if reasons else keep
        nodes.append(helper.make_node("LessOrEqual", [top, f"{p}/zero"], [so_far]))
        for position, reason in enumerate(reasons, 1):
            either = keep if position == len(reasons) else f"{p}/go_on{position}"
            nodes.append(helper.make_node("Or", [so_far, reason], [either]))
            so_far = either
        return margins, top, keep

    def _fires_on_margins_alone(self, level: int) -> bool:
        """Whether exit ``level``'s ``keep`` is just "no class fired": no guard, and no agreement to check
        (the first exit has no exit before it)."""
        return self.exits[level].guard is None and not (self.agreement and level)

    @staticmethod
    def _class_tensor(level: int) -> str:
        """Exit ``level``'s class per row (the ArgMax of its margins), built when rows are routed with
        agreement: the next exit reads it, for the rows that reach it."""
        return f"moco/exit{level}/class"

    def _carried_class(self, level: int) -> list[str]:
        """What goes on from exit ``level`` to the next besides the cut and side inputs: its class, when
        rows are routed with agreement and a next exit reads it."""
        return [self._class_tensor(level)] if self.agreement and level + 1 < len(self.exits) else []

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

    def _batch_dim(self) -> str | int:
        dims = next(o for o in self.outputs if o.name == self.output).type.tensor_type.shape.dim
        return dims[0].dim_param or "batch" if dims and not dims[0].HasField("dim_value") else "batch"

    def _declared_on_rows(self, value: onnx.ValueInfoProto, name: str, rows: str | int,
                          batch_first: bool = False) -> onnx.ValueInfoProto:
        """``value``'s declaration for tensor ``name`` computed on ``rows`` (a named dim or a fixed count)
        rather than the whole batch (``batch_first``: its first dim is the batch, whatever it is called).

        The batch dim becomes ``rows``, dims computed from it are left anonymous, and the other symbols
        shape inference made up (``unk__7``: not the model inputs' own, such as ``sequence``) get the
        rows' suffix, as one of them may stand for the batch: onnxruntime plans buffers by symbol, and a
        symbol shared by tensors of unequal row counts makes it reuse a buffer of the wrong size.
        """
        batch = self._batch_dim()
        declared = onnx.ValueInfoProto()
        declared.CopyFrom(value)
        declared.name = name
        dims = declared.type.tensor_type.shape.dim
        if batch_first and dims:
            dims[0].dim_param = str(batch)
        if rows == batch:
            return declared
        for dim in dims:
            if dim.dim_param == batch:
                if isinstance(rows, int):
                    dim.dim_value = rows
                else:
                    dim.dim_param = rows
            elif batch in dim.dim_param:
                dim.Clear()
            elif dim.dim_param and dim.dim_param not in self.input_symbols:
                dim.dim_param = f"{dim.dim_param}@{rows}"
        return declared

    def _trailing_shape_nodes(self) -> tuple[list, list]:
        """Nodes (and their constants) computing, once at the top level, the non-batch dims of the
        outputs whose dims are dynamic (``self.trailing_shapes``; see passes/graph/trailing_dims.py)."""
        if not (self.exits and self.dynamic_outputs):
            return [], []
        nodes, constants, self.trailing_shapes = trailing_shape_nodes(self.model, self.dynamic_outputs,
                                                                      "moco/trailing_dims")
        return nodes, constants

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

    @staticmethod
    def _margin_nodes(exit_: Exit, pooled: str, margins: str, p: str, initializers: list) -> list:
        """``margins = scores - thresholds``; disabled classes (threshold inf) get -FLT_MAX.  An MLP head's
        hidden layer (MatMul, Add, Relu) comes first."""
        thresholds = np.where(np.isfinite(exit_.thresholds), exit_.thresholds, _NEVER)
        hidden_nodes = []
        if isinstance(exit_.scores, MLPScores):  # relu(pooled @ hidden_weight + hidden_bias) feeds the scores
            initializers.extend([numpy_helper.from_array(exit_.scores.hidden_weight, f"{p}/hidden_weight"),
                                 numpy_helper.from_array(exit_.scores.hidden_bias, f"{p}/hidden_bias")])
            hidden_nodes = [helper.make_node("MatMul", [pooled, f"{p}/hidden_weight"], [f"{p}/hidden_linear"]),
                            helper.make_node("Add", [f"{p}/hidden_linear", f"{p}/hidden_bias"], [f"{p}/hidden_pre"]),
                            helper.make_node("Relu", [f"{p}/hidden_pre"], [f"{p}/hidden"])]
            pooled = f"{p}/hidden"
        initializers.append(numpy_helper.from_array(exit_.scores.weight.astype(np.float32), f"{p}/weight"))
        matmul = helper.make_node("MatMul", [pooled, f"{p}/weight"], [f"{p}/linear"])
        if exit_.scores.normalize == "none":  # fold the thresholds into the bias: one Add
            offset = np.where(np.isfinite(exit_.thresholds), exit_.scores.bias - exit_.thresholds, -_NEVER)
            initializers.append(numpy_helper.from_array(offset.astype(np.float32), f"{p}/offset"))
            return [*hidden_nodes, matmul, helper.make_node("Add", [f"{p}/linear", f"{p}/offset"], [margins])]
        initializers.extend([numpy_helper.from_array(exit_.scores.bias.astype(np.float32), f"{p}/bias"),
                             numpy_helper.from_array(thresholds.astype(np.float32), f"{p}/thresholds")])
        return [*hidden_nodes, matmul, helper.make_node("Add", [f"{p}/linear", f"{p}/bias"], [f"{p}/logits"]),
                helper.make_node("LogSoftmax", [f"{p}/logits"], [f"{p}/log_probs"], axis=1),
                helper.make_node("Sub", [f"{p}/log_probs", f"{p}/thresholds"], [margins])]

    def _exited_value(self, original: onnx.ValueInfoProto, exit_: Exit, margins: str, top: str, p: str,
                      nodes: list, initializers: list, into: str | None = None) -> str:
        """What exited rows carry in ``original``: the exit's logits for the classifier and the outputs computed
        from its logits alone, zeros otherwise; the rule's tensors are prefixed ``p``, the new ones ``into``
        (default ``p``: an If's two branches need two)."""
        elem = original.type.tensor_type.elem_type
        into = into or p
        name = f"{into}/exited/{original.name}"
        if original.name == self.output:
            logits = self._exit_logits(exit_, margins, p, into, nodes, initializers)
            head = self.index.probability_head(self.output)
            if head:
                nodes.append(helper.make_node(head, [logits], [f"{name}/{head}"], axis=-1))
                logits = f"{name}/{head}"
            return self._as_type(logits, elem, name, nodes, initializers)
        if original.name in self.derived:
            logits = self._exit_logits(exit_, margins, p, into, nodes, initializers)
            logits = self._as_type(logits, self.types.get(self.logits, onnx.TensorProto.FLOAT), f"{name}/logits",
                                   nodes, initializers)
            return self._derived_nodes(original.name, logits, name, nodes, initializers)
        if original.name in self.trailing_shapes:
            trailing = self.trailing_shapes[original.name]
        else:
            trailing = f"{name}/trailing"
            initializers.append(numpy_helper.from_array(np.array(trailing_dims(original), np.int64), trailing))
        nodes.append(helper.make_node("Shape", [top], [f"{name}/batch"]))
        nodes.append(helper.make_node("Concat", [f"{name}/batch", trailing], [f"{name}/shape"], axis=0))
        nodes.append(helper.make_node("ConstantOfShape", [f"{name}/shape"], [name],
                                      value=helper.make_tensor("zero", elem, [1], [0])))
        return name

    def _exit_logits(self, exit_: Exit, margins: str, p: str, into: str, nodes: list, initializers: list) -> str:
        """The float32 logits exited rows carry (built once per ``into`` and graph): the exit's calibrated
        log-probabilities when it has a confidence scale
        (:func:`~moco_compile.passes.calibration.exit_confidence.exited_logits_nodes`), else its margins."""
        key = (into, id(nodes))  # the same prefix in another node list (another graph) is built again
        if key in self._exited_logits:
            return self._exited_logits[key]
        value = margins
        if exit_.confidence_scale is not None and exit_.scores.normalize == "log_softmax":
            value = f"{into}/exited/calibrated"
            nodes.extend(exited_logits_nodes(f"{p}/log_probs", margins, exit_.confidence_scale, value,
                                             f"{into}/confidence", initializers,
                                             swap=not swap_is_identity(exit_.thresholds, exit_.confidence_scale)))
        self._exited_logits[key] = value
        return value

    @staticmethod
    def _as_type(value: str, elem: int, name: str, nodes: list, initializers: list) -> str:
        """Float32 ``value`` in type ``elem`` (as ``name`` unless float32): values beyond a narrower float's range
        (-FLT_MAX for classes an exit switched off) are clipped to it, so no exited row carries -inf."""
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

    def _derived_nodes(self, output: str, logits: str, name: str, nodes: list, initializers: list) -> str:
        """Copies of the model's nodes that compute ``output`` from its classifier's logits, reading ``logits``
        instead; their tensors (and copies of the initializers they read) prefixed ``name``.  Returns the
        copy of ``output``."""
        renames = {self.logits: logits}
        for index in self.derived[output]:
            node = onnx.NodeProto()
            node.CopyFrom(self.model.graph.node[index])
            node.name = ""
            for position, tensor in enumerate(node.input):
                if tensor and tensor not in renames:  # an initializer: every derived node's other inputs come first
                    renames[tensor] = f"{name}/{tensor}"
                    copy = numpy_helper.to_array(self.initializers[tensor])
                    initializers.append(numpy_helper.from_array(copy, renames[tensor]))
                node.input[position] = renames.get(tensor, tensor)
            for position, tensor in enumerate(node.output):
                renames[tensor] = node.output[position] = f"{name}/{tensor}" if tensor else tensor
            nodes.append(node)
        return renames[output]

    def _side_inputs(self, level: int) -> set[str]:
        """Graph inputs that stages (or exits' pooling) from ``level`` on still read (e.g. an attention mask)."""
        inputs = set(self.index.graph_inputs)
        pooled = {name for exit_ in self.exits[level:] for name in pooling_inputs(exit_.pooling)}
        return pooled | {name for stage in self.stages[level:] for i in stage
                         for name in node_inputs(self.model.graph.node[i]) if name in inputs}

    def _empty_branch(self, prefix: str, graph_name: str) -> onnx.GraphProto:
        """An If's else branch (no row left): every output with 0 rows and its non-batch dims, as
        tensors named ``<prefix>/empty/<output>`` (``.../exit`` for the exit ids)."""
        no_rows = f"{prefix}/empty/no_rows"
        nodes, outputs = [], []
        initializers = [numpy_helper.from_array(np.array([0], np.int64), no_rows)] if self.trailing_shapes else []
        for original in self.outputs + [None]:
            if original is None:
                elem, dims, name = onnx.TensorProto.INT64, [], f"{prefix}/empty/exit"
            else:
                elem, dims = original.type.tensor_type.elem_type, trailing_dims(original)
                name = f"{prefix}/empty/{original.name}"
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
        return helper.make_graph(nodes, graph_name, [], outputs, initializers)

    def _value_info(self, name: str, original: str) -> onnx.ValueInfoProto:
        if original == EXIT_OUTPUT:
            return helper.make_tensor_value_info(name, onnx.TensorProto.INT64, ["rows"])
        value = next(o for o in self.outputs if o.name == original)
        return helper.make_tensor_value_info(name, value.type.tensor_type.elem_type, ["rows", *trailing_dims(value)])

    def _fixed_size(self, tensor: str) -> bool:
        """True when the graph fixes every non-batch dim of ``tensor`` (pooling may bake them in)."""
        value = self.value_infos.get(tensor)
        return value is not None and value.type.tensor_type.HasField("shape") \
            and not has_dynamic_trailing_dims(value)


def derived_outputs(index: GraphIndex, classifier_output: str) -> dict[str, list[int]]:
    """The model's outputs besides ``classifier_output`` that it computes from the classifier's logits alone
    (:meth:`~moco_compile.passes.graph.index.GraphIndex.classifier_logits`; e.g. its class or its probabilities),
    each with the nodes that compute it: rows that leave at an exit get them from the exit's logits, and every
    other output zeros."""
    logits = index.classifier_logits(classifier_output)
    return {name: nodes for name in index.graph_outputs if name != classifier_output
            and (nodes := index.derived_nodes(name, logits)) is not None}


def name_added_nodes(graph: onnx.GraphProto) -> None:
    """Name each node moco added (its outputs are ``moco/...``) after its first output, so later
    passes can tell moco's nodes from the model's (float16 keeps them in float32)."""
    for node in all_nodes(graph):
        if not node.name and node.output and node.output[0].startswith(ADDED_NODE_PREFIX):
            node.name = node.output[0]


def trailing_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """Declared non-batch dims of ``value``: numbers, or names (``""`` when anonymous)."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim[1:]]
