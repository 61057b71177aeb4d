"""Quantize a float model's weights (and activations) to int8 with onnxruntime.quantization.

Two passes, each one job:

1. :func:`quantize_dynamic_int8`: weights stored as int8 per output channel with a 7-bit
   range (``reduce_range``, onnxruntime's guard against int8 kernels saturating; on the text
   reference it cut the disagreement with float32 from 2.2% to 1.1% of 3,000 rows),
   activations quantized at run time (``MatMulInteger``/``ConvInteger``).
2. :func:`quantize_static_int8`: weights int8 per output channel, activations uint8 (QDQ
   format), activation ranges from calibration rows (MinMax), at the weighted ops only
   (:data:`STATIC_INT8_OPS`).  uint8 activations with int8 weights is the pair x86's integer
   kernels take directly: with onnxruntime's default int8 activations static int8 took 1.02x
   (6-block MiniLM) and 3.29x (reference CNN) of float32's batch-64 time on this AVX512-VNNI
   CPU, with uint8 0.65x and 0.55x (``bench_memory``, RESULTS "Memory optimisation", before and
   after this change).

Ops the chosen quantizer has no int8 kernel for keep their float weights; each pass lists
them (:attr:`Quantized.kept_float`) so the caller can say so.  A model that is already
quantized is refused: quantize its float original.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from moco_compile.errors import CalibrationDataError, ModelError
from moco_compile.passes.graph.index import all_nodes

QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                           "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulNBits", "QAttention",
                           "DynamicQuantizeMatMul", "QGemm"})
MIN_STATIC_ROWS = 64  # MinMax ranges from fewer rows depend too much on which rows were drawn
MAX_STATIC_ROWS = 512  # enough for stable MinMax ranges; more only slows the calibration run
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "LSTM", "GRU", "Attention")
# Static int8 at these ops only: quantizing every op's activations (onnxruntime's default) put Q/DQ
# around Softmax, LayerNorm and the residual Adds: the 6-block MiniLM kept 69.50% of its 81.65%
# accuracy; at the weighted ops 81.10%, weights 3.96x smaller (bench_memory, 2,000 test rows).
STATIC_INT8_OPS = ("Conv", "MatMul", "Gemm", "Gather")


@dataclass
class Quantized:
    """A quantized model and the weighted ops that stayed float (op type -> node count)."""

    model: onnx.ModelProto
    kept_float: dict[str, int]


def check_not_quantized(model: onnx.ModelProto) -> None:
    """Raise :class:`ModelError` when ``model`` already holds quantized ops or int8 weights."""
    ops = sorted({node.op_type for node in all_nodes(model.graph) if node.op_type in QUANTIZED_OPS})
    if ops:
        raise ModelError(f"the model is already quantized (it has {', '.join(ops)} nodes): "
                         "quantize or convert its float original instead")


def quantize_dynamic_int8(model: onnx.ModelProto) -> Quantized:
    """Rule 1: int8 weights, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    check_not_quantized(model)
    quantized = _run_quantizer(lambda source, target: quantize_dynamic(
        source, target, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True), model)
    return Quantized(quantized, _kept_float(model, set(IntegerOpsRegistry)))


def quantize_static_int8(model: onnx.ModelProto, calibration: Mapping[str, np.ndarray]) -> Quantized:
    """Rule 2: int8 weights and activations, ranges from ``calibration`` (input name -> rows)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry

    check_not_quantized(model)
    rows = len(next(iter(calibration.values())))
    if rows < MIN_STATIC_ROWS:
        raise CalibrationDataError(f"static int8 quantization needs at least {MIN_STATIC_ROWS} calibration rows to "
                                   f"set activation ranges; got {rows}. Give more rows or use dynamic int8")
    used = min(rows, MAX_STATIC_ROWS)

    class _Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{name: values[start:start + 32] for name, values in calibration.items()}
                                  for start in range(0, used, 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    quantized = _run_quantizer(lambda source, target: quantize_static(
        source, target, _Rows(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        op_types_to_quantize=list(STATIC_INT8_OPS)), model)
    return Quantized(quantized, _kept_float(model, set(QDQRegistry) & set(STATIC_INT8_OPS)))


def _run_quantizer(quantize, model: onnx.ModelProto) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="moco-int8-") as scratch:
        source, target = Path(scratch, "float.onnx"), Path(scratch, "int8.onnx")
        onnx.save(model, source)
        try:
            quantize(source, target)
        except Exception as error:  # onnxruntime.quantization raises plain exceptions
            raise ModelError(f"onnxruntime's quantizer failed on this model: {error}") from error
        return onnx.load(target)


def _kept_float(model: onnx.ModelProto, quantizable: set[str]) -> dict[str, int]:
    weights = {init.name for init in model.graph.initializer
               if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(init.dims) >= 2}
    kept = Counter(node.op_type for node in all_nodes(model.graph)
                   if node.op_type in _WEIGHTED_OPS and node.op_type not in quantizable
                   and any(name in weights for name in node.input))
    return dict(kept)
