"""The zoo's architectures by name, their inputs, and export with either ONNX exporter.

Shared by the conformance suite (random weights) and the zoo benchmark (trained weights).
"""
from __future__ import annotations

import io

import numpy as np
import onnx
import torch

from models.zoo import (MLP, BottleneckNet, ConvNeXtish, DenseNetish, MobileNetV3ish, NestedNet, ReusedPool,
                        TinyViT, TwoInputNet)

ARCHITECTURES = {"nested": NestedNet, "reused-module": ReusedPool, "inline-vit": TinyViT,
                 "two-input": TwoInputNet, "mlp": MLP, "resnet-bottleneck": BottleneckNet,
                 "mobilenet-v3": MobileNetV3ish, "densenet": DenseNetish, "convnext": ConvNeXtish}
EXPORTERS = ("legacy", "dynamo")
SIDE_FEATURES = 8


def input_names(module: torch.nn.Module) -> list[str]:
    """Graph input names of ``module``, in ``forward``'s argument order."""
    return ["images", "extra"] if isinstance(module, TwoInputNet) else ["images"]


def model_inputs(names: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
    """Images, plus a small side feature vector per row when the model reads one (seeded noise:
    with random weights a large one would decide the class alone, and no rule on the image could
    exit; a trained model learns to ignore it)."""
    extra = 0.1 * np.random.default_rng(len(images)).normal(size=(len(images), SIDE_FEATURES)).astype(np.float32)
    return {"images": images, "extra": extra} if "extra" in names else {"images": images}


def export(module: torch.nn.Module, exporter: str) -> onnx.ModelProto:
    """``module`` exported with the ``"legacy"`` (TorchScript, opset 18) or ``"dynamo"``
    (torch.export) exporter, batch axis dynamic, output ``logits``."""
    buffer = io.BytesIO()
    names = input_names(module)
    example = tuple(torch.from_numpy(v) for v in model_inputs(names, np.random.rand(2, 1, 28, 28).astype(np.float32))
                    .values())
    with torch.no_grad():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(module, example, dynamo=True, input_names=names, output_names=["logits"],
                                        dynamic_shapes=tuple({0: batch} for _ in names), verbose=False)
            program.save(buffer)
        elif exporter == "legacy":
            torch.onnx.export(module, example, buffer, dynamo=False, input_names=names, output_names=["logits"],
                              opset_version=18, dynamic_axes={name: {0: "batch"} for name in [*names, "logits"]})
        else:
            raise ValueError(f"unknown exporter {exporter!r}: use one of {EXPORTERS}")
    return onnx.load_from_string(buffer.getvalue())
