"""Non-batch dimensions of graph outputs, computed at run time from the inputs' shapes.

An exit fills the outputs of rows that leave early with zeros, so it must know
each output's non-batch dims without running the remainder that produces the
output.  Fixed dims are constants.  A dynamic dim (e.g. the positions of a
fully convolutional head, ``[N, h*w, 4]`` for ``[N, 1, H, W]`` images) is found
as a formula of the inputs' dims:

1. every dynamic input dim gets a symbol (``moco_dim_<k>``, one per distinct
   ``dim_param``; axis 0, the batch, gets ``moco_batch``);
2. onnxruntime's symbolic shape inference (sympy) derives each output dim as a
   formula of those symbols;
3. the formula is written as int64 ONNX arithmetic on ``Shape(input)`` slices
   (``floor`` and ``ceiling`` of a division by a positive constant become exact
   integer division; ``Max``, ``Min``, ``Mod`` and integer powers are supported).

A dim that is not such a formula (it depends on data values, as after
``NonZero``, or on the batch size) cannot be given to exited rows:
:class:`UndeterminedDimError` says so when the graph is built, never a wrong
shape at run time.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moco_compile.errors import ModelError

BATCH_SYMBOL = "moco_batch"


class UndeterminedDimError(ModelError):
    """An output's non-batch dim cannot be computed from the inputs' shapes."""


def has_dynamic_trailing_dims(value: onnx.ValueInfoProto) -> bool:
    """True when some non-batch dim of ``value`` is not a fixed number."""
    return any(not dim.HasField("dim_value") for dim in value.type.tensor_type.shape.dim[1:])


def trailing_shape_nodes(model: onnx.ModelProto, outputs: Sequence[str], prefix: str
                         ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], dict[str, str]]:
    """Nodes computing each output's non-batch dims (int64 ``[rank - 1]``) from the graph inputs.

    Returns the nodes, their constant initializers and, per output, the name of its
    trailing-shape tensor.  Raises :class:`UndeterminedDimError` when a dim is not a
    function of the inputs' shapes.
    """
    symbols, inferred = _infer_output_dims(model, outputs)
    writer = _DimWriter(symbols, prefix)
    shapes = {}
    for name in outputs:
        dims = [writer.dim(name, axis, dim) for axis, dim in enumerate(inferred[name][1:], start=1)]
        shapes[name] = f"{prefix}/{name}/trailing"
        writer.nodes.append(helper.make_node("Concat", dims, [shapes[name]], axis=0,
                                             name=f"{prefix}/{name}/trailing"))
    return writer.nodes, list(writer.constants.values()), shapes


def _infer_output_dims(model: onnx.ModelProto, outputs: Sequence[str]
                       ) -> tuple[dict[str, tuple[str, int]], dict[str, list[Any]]]:
    """Symbols of the inputs' dynamic dims (symbol -> (input, axis)) and each output's dims
    (ints, or sympy expressions of those symbols), by onnxruntime's symbolic shape inference."""
    try:
        import sympy
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as error:
        raise UndeterminedDimError(
            f"output(s) {', '.join(map(repr, outputs))} have dynamic non-batch dims; computing them for "
            f"rows that exit early needs sympy ({error}): pip install sympy") from error
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    initializers = {init.name for init in probe.graph.initializer}
    symbols: dict[str, tuple[str, int]] = {}
    renamed: dict[str, str] = {}
    for value in probe.graph.input:
        if value.name in initializers:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                continue
            if axis == 0:
                symbol = BATCH_SYMBOL
            else:
                key = dim.dim_param or f"{value.name}:{axis}"
                symbol = renamed.setdefault(key, f"moco_dim_{len(renamed)}")
                symbols.setdefault(symbol, (value.name, axis))
            dim.dim_param = symbol
    for value in probe.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
    try:
        inferred_model = SymbolicShapeInference.infer_shapes(probe, auto_merge=True)
    except Exception as error:  # its failures are plain Exceptions, AssertionErrors, ...
        raise UndeterminedDimError(
            f"output(s) {', '.join(map(repr, outputs))} have dynamic non-batch dims and onnxruntime's "
            f"symbolic shape inference failed on the model ({type(error).__name__}: {error}); give those "
            "dims fixed sizes or leave the outputs out of the model") from error
    known = {symbol: sympy.Symbol(symbol) for symbol in [*symbols, BATCH_SYMBOL]}
    dims = {}
    for value in inferred_model.graph.output:
        if value.name not in outputs:
            continue
        found = []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                found.append(dim.dim_value)
                continue
            try:
                found.append(sympy.sympify(dim.dim_param, locals=known) if dim.dim_param else None)
            except (sympy.SympifyError, SyntaxError, TypeError):
                found.append(None)
        dims[value.name] = found
    return symbols, dims


class _DimWriter:
    """Writes int64 ``[1]`` tensors for dims, reusing nodes for repeated subexpressions."""

    def __init__(self, symbols: dict[str, tuple[str, int]], prefix: str) -> None:
        self.symbols = symbols
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[int, onnx.TensorProto] = {}
        self.written: dict[Any, str] = {}
        self.output, self.axis = "", 0

    def dim(self, output: str, axis: int, dim: Any) -> str:
        """Tensor holding dim ``axis`` of ``output`` (an int or a sympy expression)."""
        self.output, self.axis = output, axis
        if isinstance(dim, int):
            return self._constant(dim)
        if dim is None:
            self._fail("onnxruntime's symbolic shape inference could not derive it")
        unknown = sorted(str(s) for s in dim.free_symbols if str(s) not in self.symbols)
        if BATCH_SYMBOL in unknown:
            self._fail(f"it depends on the batch size ({dim})")
        if unknown:
            self._fail(f"it depends on more than the inputs' shapes, e.g. on data values ({dim})")
        return self._expression(dim)

    def _fail(self, reason: str) -> None:
        raise UndeterminedDimError(
            f"dim {self.axis} of output {self.output!r} is dynamic and moco cannot compute it for rows that "
            f"exit early: {reason}. Give that dim a fixed size or leave the output out of the model")

    def _expression(self, expr: Any) -> str:
        import sympy

        if expr in self.written:
            return self.written[expr]
        numerator, denominator = sympy.fraction(sympy.together(expr))
        if denominator != 1:
            result = self._divide(numerator, denominator, exact=True)
        elif expr.is_Integer:
            result = self._constant(int(expr))
        elif expr.is_Symbol:
            source, axis = self.symbols[str(expr)]
            result = self._node("Shape", [source], start=axis, end=axis + 1)
        elif isinstance(expr, (sympy.Add, sympy.Mul, sympy.Max, sympy.Min)):
            op = {sympy.Add: "Add", sympy.Mul: "Mul", sympy.Max: "Max", sympy.Min: "Min"}[type(expr)]
            terms = [self._expression(arg) for arg in expr.args]
            result = terms[0]
            for term in terms[1:]:
                result = self._node(op, [result, term])
        elif isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
            base = self._expression(expr.base)
            result = base
            for _ in range(int(expr.exp) - 1):
                result = self._node("Mul", [result, base])
        elif isinstance(expr, (sympy.floor, sympy.ceiling)):
            numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
            if isinstance(expr, sympy.ceiling):  # ceil(n / d) = floor((n + d - 1) / d)
                numerator = numerator + denominator - 1
            result = self._divide(numerator, denominator, exact=False)
        elif isinstance(expr, sympy.Mod):
            result = self._node("Mod", [self._expression(expr.args[0]), self._expression(expr.args[1])])
        else:
            self._fail(f"its formula {expr} uses {type(expr).__name__}, which moco does not translate")
        self.written[expr] = result
        return result

    def _divide(self, numerator: Any, denominator: Any, exact: bool) -> str:
        """``numerator / denominator`` rounded down (``exact``: known to divide) for a positive constant."""
        if not (denominator.is_Integer and denominator > 0):
            self._fail(f"it divides by {denominator}, which is not a positive constant")
        top, bottom = self._expression(numerator), self._constant(int(denominator))
        if not exact:  # integer Div truncates towards zero; subtracting the (floor) Mod first makes it floor
            top = self._node("Sub", [top, self._node("Mod", [top, bottom])])
        return self._node("Div", [top, bottom])

    def _node(self, op: str, inputs: list[str], **attributes: Any) -> str:
        output = f"{self.prefix}/{op.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def _constant(self, value: int) -> str:
        if value not in self.constants:
            self.constants[value] = numpy_helper.from_array(np.array([value], np.int64),
                                                            f"{self.prefix}/const{value}")
        return self.constants[value].name
