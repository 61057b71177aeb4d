"""Free a batch dimension that the export fixed.

``torch.onnx.export`` without ``dynamic_axes`` (or ``dynamic_shapes``) writes a graph whose inputs
take exactly the example's batch, most often 1.  A compiled graph passes fewer rows past each exit
than it was given, and calibration runs batches of many rows, so moco needs the batch dimension
free.  This pass declares it free on the inputs and the outputs and rewrites the one place where
such exports also bake it in: a ``Reshape`` whose constant target shape starts with the fixed
batch size while its data input's first dimension is the batch (``x.view(x.size(0), -1)``
exported as ``Reshape(x, [1, -1])``).  That entry becomes ``-1`` (inferred), or ``0`` (copied
from the input, for a ``Reshape`` without ``allowzero``) when the shape already infers another
dimension.

Any other use of the batch size (an ``Expand`` to it, a ``Slice`` ending at it) is left as it is:
whether the freed graph still computes what the user's graph computed is checked on real rows by
:func:`moco_compile.prepare.cut_points_of`, which refuses the model when it does not.
"""
from __future__ import annotations

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
    freed = onnx.ModelProto()
    freed.CopyFrom(model)
    while True:  # a freed Reshape frees the shapes after it, where the next one may be found
        for value in [*_graph_inputs(freed), *freed.graph.output]:
            dim = value.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_param = BATCH_DIM
        del freed.graph.value_info[:]
        freed = onnx.shape_inference.infer_shapes(freed)
        if not _free_one_reshape(freed, size):
            return freed


def _free_one_reshape(model: onnx.ModelProto, size: int) -> bool:
    """Rewrite the first Reshape that fixes the batch at ``size`` on a batch-led input; False if none."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    leading = {value.name: value for value in [*graph.input, *graph.value_info]}
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] not in initializers or node.input[0] not in leading:
            continue
        target = numpy_helper.to_array(initializers[node.input[1]])
        if target.ndim != 1 or not len(target) or target[0] != size:
            continue
        if _leading_param(leading[node.input[0]]) != BATCH_DIM:
            continue
        allowzero = any(a.name == "allowzero" and a.i == 1 for a in node.attribute)
        if (target[1:] == -1).any() and allowzero:
            continue  # neither -1 nor 0 can stand for the batch here; the check on real rows decides
        freed = target.copy()
        freed[0] = 0 if (target[1:] == -1).any() else -1
        shared = sum(list(other.input).count(node.input[1]) for other in graph.node) > 1
        name = f"{node.input[1]}/{BATCH_DIM}_free" if shared else node.input[1]
        if shared:
            graph.initializer.append(numpy_helper.from_array(freed.astype(np.int64), name))
        else:
            initializers[name].CopyFrom(numpy_helper.from_array(freed.astype(np.int64), name))
        node.input[1] = name
        return True
    return False


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _leading_size(value: onnx.ValueInfoProto) -> int | None:
    dims = value.type.tensor_type.shape.dim
    return dims[0].dim_value if value.type.tensor_type.HasField("shape") and len(dims) and \
        dims[0].HasField("dim_value") else None


def _leading_param(value: onnx.ValueInfoProto) -> str | None:
    dims = value.type.tensor_type.shape.dim
    return dims[0].dim_param if len(dims) and dims[0].HasField("dim_param") else None
