"""Other heads on an exported classifier, as ONNX edits (for tests and benchmarks)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def with_soft_probabilities(model: onnx.ModelProto, softness: float = 4.0) -> onnx.ModelProto:
    """A copy of ``model`` (one ``[N, C]`` logits output) whose only output is
    ``probabilities = Softmax(logits / softness)``: a softmax-ending network whose probabilities are
    far less peaked than its logits make them (as an underconfident or label-smoothed one's are)."""
    soft = onnx.ModelProto()
    soft.CopyFrom(model)
    logits = soft.graph.output[0]
    classes = logits.type.tensor_type.shape.dim[1].dim_value
    soft.graph.initializer.append(numpy_helper.from_array(np.array(softness, np.float32), "softness"))
    soft.graph.node.extend([helper.make_node("Div", [logits.name, "softness"], ["soft_logits"]),
                            helper.make_node("Softmax", ["soft_logits"], ["probabilities"], axis=1)])
    del soft.graph.output[:]
    soft.graph.output.append(helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["N", classes]))
    return soft
