"""Hugging Face image classifiers (``<Name>ForImageClassification``) exported to ONNX.

The graph has one input, ``pixel_values`` ``[batch, channels, height, width]`` (float32, as the model's
image processor writes it), and one output, ``logits``; the batch axis is dynamic, height and width are
fixed (position embeddings, patch grids and windows are built for one size).  The size is, first found:
the ``example_input``'s; the config's ``image_size``; the image processor saved beside the weights
(``preprocessor_config.json``: its ``crop_size`` when it crops, else its ``size``).

Any such architecture whose forward takes ``pixel_values`` is accepted; ViT, DeiT, BEiT, Swin, ConvNeXt,
ResNet, RegNet and MobileNetV2 are tested (``tests/test_image_architectures.py``).  The TorchScript-based
exporter runs first: it takes well under a second on small models and exports Swin and EfficientNet,
where ``torch.export`` stops at their data-dependent shapes; the ``torch.export``-based exporter is the
fallback.  Either export is run against the module before it is accepted
(:func:`~moco_compile.export_check.check_export`).
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from moco_compile.errors import ModelError
from moco_compile.export_check import check_export, check_single_label_head

ARCHITECTURE_SUFFIX = "ForImageClassification"
PIXELS = "pixel_values"
PROCESSOR_FILE = "preprocessor_config.json"


def is_hf_image_classifier(obj: Any) -> bool:
    """Whether ``obj`` is a Hugging Face image classifier module (``transformers``' ``*ForImageClassification``)."""
    return type(obj).__name__.endswith(ARCHITECTURE_SUFFIX) and type(obj).__module__.startswith("transformers.")


def export_hf_image_classifier(model: Any, example_input: Any = None, directory: Path | None = None,
                               opset: int = 18) -> onnx.ModelProto:
    """Export ``model`` (a ``*ForImageClassification``) with input ``pixel_values`` and output ``logits``.

    ``example_input``: a batch of images (tensor or array ``[N, C, H, W]``) fixing the input size;
    ``directory``: where the model was saved, to read the image processor's size from when neither the
    example nor the config gives one.
    """
    import torch

    architecture = type(model).__name__
    check_single_label_head(model)
    shape = _input_shape(model, example_input, directory)
    images = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    model = model.eval()
    failures = []
    for name, exporter in _EXPORTERS:  # the first export that runs and gives the module's logits
        try:
            exported = exporter(model, images, opset)
            if [o.name for o in exported.graph.output] != ["logits"]:
                raise ModelError(f"outputs {[o.name for o in exported.graph.output]}, not one 'logits' output")
            check_export(exported, model, {PIXELS: images}, architecture, f"{len(images)} random images")
            return exported
        except Exception as error:  # each exporter raises its own types
            message = str(error).strip()
            failures.append(f"{name}: {message.splitlines()[0] if message else type(error).__name__}")
    raise ModelError(f"exporting {architecture} to ONNX failed ({'; '.join(failures)}); export it yourself "
                     f"(input {PIXELS!r} [batch, {', '.join(map(str, shape))}], output [batch, classes] logits) "
                     "and pass the .onnx file")


def _input_shape(model: Any, example_input: Any, directory: Path | None) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one image, from the example, the config or the saved image processor."""
    architecture, config = type(model).__name__, model.config
    channels = int(getattr(config, "num_channels", 3))
    if example_input is not None:
        shape = tuple(np.shape(example_input))
        if len(shape) != 4 or shape[1] != channels:
            raise ModelError(f"example_input has shape {list(shape)}: {architecture} takes images "
                             f"[batch, {channels}, height, width]")
        return channels, int(shape[2]), int(shape[3])
    size = getattr(config, "image_size", None)
    if size is None and directory is not None and (directory / PROCESSOR_FILE).exists():
        size = _processor_size(directory / PROCESSOR_FILE)
    if size is None:
        raise ModelError(f"{architecture}'s config has no image_size and no image processor ({PROCESSOR_FILE}) "
                         "says what size its images are: save the processor beside the model "
                         "(processor.save_pretrained(path)), or pass example_input=<a batch of images>")
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return channels, int(height), int(width)


def _processor_size(path: Path) -> int | tuple[int, int] | None:
    """The size an image processor's output has: its crop when it crops, else its resize target."""
    try:
        processor = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{path} is not readable JSON ({error}): save the image processor again") from error
    crop = processor.get("crop_size") if processor.get("do_center_crop") else None
    for size in (crop, processor.get("size")):
        if isinstance(size, int):
            return size
        if isinstance(size, dict) and "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if isinstance(size, dict) and "shortest_edge" in size and "longest_edge" not in size:
            return int(size["shortest_edge"])
    return None


def _export_torchscript(model: Any, images: Any, opset: int) -> onnx.ModelProto:
    import torch

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on the (fixed) image size
        torch.onnx.export(model, (images,), buffer, dynamo=False, opset_version=opset, input_names=[PIXELS],
                          output_names=["logits"], dynamic_axes={PIXELS: {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(model: Any, images: Any, opset: int) -> onnx.ModelProto:
    import torch

    with torch.no_grad():
        program = torch.onnx.export(model, (images,), dynamo=True, opset_version=opset, input_names=[PIXELS],
                                    output_names=["logits"], dynamic_shapes={PIXELS: {0: torch.export.Dim("batch")}},
                                    verbose=False)
    buffer = io.BytesIO()
    program.save(buffer)
    return onnx.load_from_string(buffer.getvalue())


_EXPORTERS = (("the TorchScript-based exporter", _export_torchscript),
              ("the torch.export-based exporter", _export_dynamo))
