"""What moco checks of a model it exports: a Hugging Face head it can compile, and an ONNX graph that computes
what the model it came from computes.

A head must choose one class per row (the argmax moco's certificate is about), so regression heads and
multi-label heads (a sigmoid per label) are refused before anything is exported.  Every graph moco derives
from a user's model before planning (a PyTorch export, a Hugging Face export, a graph whose fixed batch moco
freed) is run against that model's own outputs here first: a graph that traces differently than it runs would
otherwise be compiled unnoticed.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from moco_compile.errors import ModelError

OUTPUT_TOLERANCE = 1e-3  # an exported or freed graph agrees with the model's outputs within this (relative)


def check_single_label_head(model: Any) -> None:
    """Refuse a Hugging Face ``model`` whose head does not choose one of two or more classes: a regression
    head (``num_labels`` < 2) or a multi-label one (``problem_type="multi_label_classification"``)."""
    architecture, config = type(model).__name__, model.config
    if getattr(config, "num_labels", 0) < 2:
        raise ModelError(f"{architecture} has num_labels={getattr(config, 'num_labels', None)}: moco compiles "
                         "classifiers with >= 2 classes, not regression heads")
    if getattr(config, "problem_type", None) == "multi_label_classification":
        raise ModelError(f"{architecture} is a multi-label classifier (problem_type='multi_label_classification': "
                         "each label is decided by its own sigmoid), and moco certifies that the class a row gets, "
                         "the argmax, stays the full model's: it compiles classifiers that choose one class per row")


def outputs_agree(got: np.ndarray, expected: np.ndarray) -> bool:
    """Whether a rewritten or exported graph's outputs ``got`` are the reference's ``expected``: the same
    shape, and within :data:`OUTPUT_TOLERANCE` of the largest expected magnitude (at least 1)."""
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    return got.shape == expected.shape and bool(np.abs(got - expected).max(initial=0.0) <= OUTPUT_TOLERANCE * scale)


def check_export(exported: onnx.ModelProto, module: Any, example: dict, architecture: str,
                 batch: str = "a padded batch") -> None:
    """Refuse an export whose graph, run by onnxruntime on ``example`` (named tensors, described to the user
    as ``batch``), gives other logits than ``module`` called on them."""
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        expected = module(**example)
    expected = getattr(expected, "logits", expected)
    expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
    options = ort.SessionOptions()  # run once: optimising the graph would take longer than running it
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        got, = ort.InferenceSession(exported.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
            None, {name: value.numpy() for name, value in example.items()})
    except Exception as error:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot run the ONNX export of {architecture} ({error}); export it to ONNX "
                         "yourself and pass the .onnx file") from error
    if not outputs_agree(got, expected):
        found = f"max difference {float(np.abs(got - expected).max()):.3g}" if got.shape == expected.shape \
            else f"shape {list(got.shape)}, not {list(expected.shape)}"
        raise ModelError(f"the ONNX export of {architecture} gives other logits than the module ({found} on "
                         f"{batch}); export it to ONNX yourself, checking its outputs, and pass the .onnx file")
