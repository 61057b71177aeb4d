"""Free a batch dimension that the export fixed.

``torch.onnx.export`` without ``dynamic_axes`` (or ``dynamic_shapes``) writes a graph whose inputs
take exactly the example's batch, most often 1.  A compiled graph passes fewer rows past each exit
than it was given, and calibration runs batches of many rows, so moco needs the batch dimension
free.  This pass declares it free on the inputs and the outputs and rewrites the one place where
such exports also bake it in: a ``Reshape`` to a constant shape that starts with the fixed batch size
while its input carries the batch (``x.view(x.size(0), -1)`` exported as ``Reshape(x, [1, 64])``, an
attention's ``view(batch, seq, heads, dim)``).  Its shape becomes the one the fixed graph gives its
output with the first dimension inferred (``[-1, 64]``); where that shape is not static, the batch
entry becomes ``-1``, or ``0`` (copied from the input, for a ``Reshape`` without ``allowzero``) when
the shape already infers another dimension.  Shapes come from onnxruntime's symbolic shape inference,
which keeps the batch through broadcasts where ``onnx.shape_inference`` loses it.

Any other use of the batch size (an ``Expand`` to it, a ``GatherND`` at row 0, as static exports of
Hugging Face attention masks have) is left as it is:
whether the freed graph still computes what the user's graph computed is checked on real rows by
:func:`moco_compile.prepare.cut_points_of`, which refuses the model when it does not.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper

BATCH_DIM = "batch"  # the name the freed dimension is declared with


def fixed_batch_size(model: onnx.ModelProto) -> int | None:
    """The batch size every input and output of ``model`` is fixed at; None when any leaves it free
    (or declares no shape, or inputs disagree: then the batch is not a fixed size to free)."""
    values = [*_graph_inputs(model), *model.graph.output]
    sizes = {_leading_size(value) for value in values}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def free_batch(model: onnx.ModelProto, size: int) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs and outputs take any batch (dimension 0 declared
    :data:`BATCH_DIM`), and whose Reshapes to a constant shape starting with ``size`` keep the batch
    their input has (module docstring).  Shapes are inferred again."""
    fixed_shapes = _shapes(_inferred(model))
    freed = onnx.ModelProto()
    freed.CopyFrom(model)
    while True:  # a freed Reshape frees the shapes after it, where the next one may be found
        _declare_free(freed)
        del freed.graph.value_info[:]
        freed = _inferred(freed)
        if not _free_reshapes(freed, size, fixed_shapes):
            break
    _declare_free(freed)  # inference may have merged the batch back into the fixed size where an op
    del freed.graph.value_info[:]  # still fixes it: the declarations stand, the check on rows decides
    freed = onnx.shape_inference.infer_shapes(freed)
    _declare_free(freed)
    return freed


def _declare_free(model: onnx.ModelProto) -> None:
    """Declare dimension 0 of ``model``'s inputs and outputs :data:`BATCH_DIM`."""
    for value in [*_graph_inputs(model), *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = BATCH_DIM


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its tensors' shapes inferred by onnxruntime's symbolic shape inference, which keeps
    a symbolic batch through broadcasts and attention reshapes where ``onnx.shape_inference`` loses it."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # an op it does not know: onnx's inference, which may lose the batch sooner
        return onnx.shape_inference.infer_shapes(model)


def _free_reshapes(model: onnx.ModelProto, size: int, fixed_shapes: dict[str, list]) -> int:
    """Rewrite every Reshape to a constant shape led by ``size`` whose input carries the batch; how many.
    The new shape is the one the fixed graph gives it with its first dimension inferred (``-1``), where
    that graph's shapes are known; else the batch entry becomes ``-1`` or ``0`` (copied from the input)."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    shapes = _shapes(model)
    freed_count = 0
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in initializers:
            continue
        target = numpy_helper.to_array(initializers[node.input[1]]).astype(np.int64)
        if target.ndim != 1 or not len(target) or target[0] != size or not _carries_batch(shapes.get(node.input[0])):
            continue
        fixed = fixed_shapes.get(node.output[0])
        if fixed and len(fixed) == len(target) and all(isinstance(d, int) for d in fixed):
            freed = np.array([-1, *fixed[1:]], np.int64)
        elif not (target[1:] == -1).any():
            freed = np.concatenate([[-1], target[1:]])
        elif not any(a.name == "allowzero" and a.i == 1 for a in node.attribute):
            freed = np.concatenate([[0], target[1:]])
        else:
            continue  # neither -1 nor 0 can stand for the batch here; the check on real rows decides
        if sum(list(other.input).count(node.input[1]) for other in graph.node) > 1:  # shared: a copy of its own
            name = f"{node.input[1]}/{BATCH_DIM}_free"
            if name not in initializers:
                initializers[name] = numpy_helper.from_array(freed, name)
                graph.initializer.append(initializers[name])
            node.input[1] = name
        else:
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array(freed, node.input[1]))
        freed_count += 1
    return freed_count


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Declared and inferred shapes by tensor name: ints for fixed dims, strings for symbolic ones."""
    values = [*model.graph.input, *model.graph.value_info, *model.graph.output]
    return {value.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                         for d in value.type.tensor_type.shape.dim]
            for value in values if value.type.tensor_type.HasField("shape")}


def _carries_batch(shape: list | None) -> bool:
    """True when a dimension of ``shape`` is (or is a product with) the freed batch."""
    return bool(shape) and any(isinstance(d, str) and re.search(rf"\b{BATCH_DIM}\b", d) for d in shape)


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _leading_size(value: onnx.ValueInfoProto) -> int | None:
    dims = value.type.tensor_type.shape.dim
    return dims[0].dim_value if value.type.tensor_type.HasField("shape") and len(dims) and \
        dims[0].HasField("dim_value") else None
