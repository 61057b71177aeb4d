"""Export the trained reference CNN and the demo's calibration data.

Run after ``python -m models.train_fashion_resnet``::

    python -m models.export_fashion_resnet

Writes ``models/artifacts/fashion_resnet.onnx`` (input ``images`` [N, 1, 28, 28]
float32 in [0, 1], output ``logits`` [N, 10], dynamic batch, torch.export-based
exporter) and ``models/artifacts/fashion_calib.npz`` (the 10,000 held-out
training images the network never saw, with ``labels``).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch

from models.fashion_mnist import train_and_calibration_splits
from models.fashion_resnet import FashionResNet
from models.train_fashion_resnet import ARTIFACTS

ONNX_PATH = ARTIFACTS / "fashion_resnet.onnx"
CALIBRATION_PATH = ARTIFACTS / "fashion_calib.npz"


def load_calibration() -> dict[str, np.ndarray]:
    """The shipped calibration rows of the reference CNN: ``images`` and ``labels``."""
    with np.load(CALIBRATION_PATH) as data:
        return {"images": data["images"], "labels": data["labels"]}


def load_trained() -> FashionResNet:
    model = FashionResNet()
    model.load_state_dict(torch.load(ARTIFACTS / "fashion_resnet.pt", weights_only=True))
    return model.eval()


def export_onnx(model: FashionResNet) -> onnx.ModelProto:
    example = torch.rand(2, 1, 28, 28)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"],
                                output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(ONNX_PATH))
    return onnx.load(str(ONNX_PATH))


def main() -> None:
    model = load_trained()
    export_onnx(model)
    _, (images, labels) = train_and_calibration_splits()
    np.savez_compressed(CALIBRATION_PATH, images=images, labels=labels)
    print(f"wrote {ONNX_PATH} and {CALIBRATION_PATH} ({len(labels)} rows)")


if __name__ == "__main__":
    main()
