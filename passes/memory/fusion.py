"""onnxruntime's offline graph optimisation (constant folding and fusions), saved as a model.

The extended level fuses what onnxruntime's CPU and CUDA providers both run (Conv+activation,
Gelu, LayerNormalization, attention, ...); the layout-changing level (NCHWc) is left to the
session at load time, because a file saved with it runs only on the machine that wrote it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from moco_compile.errors import ModelError


def fused(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as onnxruntime's extended graph optimisations leave it."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="moco-fuse-") as scratch:
        target = Path(scratch, "fused.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(target)
        options.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot load the model to optimise it: {error}") from error
        return onnx.load(target)
