"""Model shapes people serve, as ONNX graphs built from a seed: a ResNet-50 and a BERT-base encoder.

Latency depends on shapes, not on weights, so the weights are random (seeded, scaled so that activations
neither explode nor vanish) and the graphs are written with ``onnx.helper`` and numpy alone: a GPU machine
without torch builds the same bytes from the same seed, and nothing over the transfer limit travels.

- :func:`resnet50`: input ``pixels`` ``[batch, 3, 224, 224]``; a 7x7/2 stem convolution and 3x3/2 max pool,
  bottleneck stages of 3, 4, 6 and 3 blocks (widths 256, 512, 1024, 2048; stride on the 3x3, a projection
  shortcut on each stage's first block), batch normalisation folded into the convolutions' biases, ReLU,
  residual Add, GlobalAveragePool, Flatten and a Gemm to 1,000 classes; output ``logits``.
- :func:`bert_base`: input ``hidden`` ``[batch, 128, 768]`` float, the embeddings' output (token ids and
  an embedding Gather would add a lookup only; the benchmark's random rows feed the states directly), an
  embedding LayerNormalization, 12 post-LN blocks (Q, K, V MatMuls, 12-head scaled dot-product attention
  with Softmax, output projection, residual + LayerNormalization, a 3,072-wide FFN with the Erf form of
  Gelu, residual + LayerNormalization), the first token pooled by a Tanh dense layer, a classifier to 2
  classes; output ``logits``.  Reshapes copy the batch dim (``0``), so no Shape node is needed.

``small=True`` keeps the layout (stages, blocks, heads) at a fraction of the widths and sizes, for tests and
CPU dry runs.  Both graphs have a dynamic batch dim, opset 17, and shapes inferred.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
BATCH = "batch"
OUTPUT = "logits"
RESNET_STAGES = ((3, 64, 256, 1), (4, 128, 512, 2), (6, 256, 1024, 2), (3, 512, 2048, 2))  # blocks, mid, out, stride


class _Builder:
    """Nodes and seeded random initializers of one graph, named by the module path they belong to."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...], std: float) -> str:
        values = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def constant(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{output}/{op}", **attributes))
        return output

    def model(self, name: str, inputs: list[onnx.ValueInfoProto], classes: int) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs,
                                  [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [BATCH, classes])],
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="moco-bench",
                                  ir_version=8)
        return onnx.shape_inference.infer_shapes(model)


def _conv(b: _Builder, x: str, name: str, channels: tuple[int, int], kernel: int, stride: int = 1,
          gain: float = 1.0) -> str:
    """A convolution with its batch normalisation folded into the bias (He-initialised, times ``gain``)."""
    cin, cout = channels
    w = b.weight(f"{name}.weight", (cout, cin, kernel, kernel), gain * math.sqrt(2.0 / (cin * kernel * kernel)))
    bias = b.weight(f"{name}.bias", (cout,), 0.01)
    pad = kernel // 2
    return b.node("Conv", [x, w, bias], name, kernel_shape=[kernel, kernel], strides=[stride, stride],
                  pads=[pad] * 4)


def _bottleneck(b: _Builder, x: str, name: str, cin: int, mid: int, cout: int, stride: int) -> str:
    h = b.node("Relu", [_conv(b, x, f"{name}.conv1", (cin, mid), 1)], f"{name}.relu1")
    h = b.node("Relu", [_conv(b, h, f"{name}.conv2", (mid, mid), 3, stride)], f"{name}.relu2")
    h = _conv(b, h, f"{name}.conv3", (mid, cout), 1, gain=0.2)  # a small last gain, as zero-init BN gamma does
    shortcut = x if cin == cout and stride == 1 else _conv(b, x, f"{name}.downsample", (cin, cout), 1, stride)
    return b.node("Relu", [b.node("Add", [h, shortcut], f"{name}.add")], name)


def resnet50(small: bool = False, seed: int = 0, classes: int = 1000) -> onnx.ModelProto:
    """A ResNet-50 (torchvision v1.5 layout) at 224x224; ``small``: widths / 16 and 64x64 images."""
    scale, image = (16, 64) if small else (1, 224)
    b = _Builder(seed)
    stem = 64 // scale
    x = b.node("Relu", [_conv(b, "pixels", "conv1", (3, stem), 7, 2)], "relu")
    x = b.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels = stem
    for stage, (blocks, mid, out, stride) in enumerate(RESNET_STAGES, start=1):
        for block in range(blocks):
            x = _bottleneck(b, x, f"layer{stage}.{block}", channels, mid // scale, out // scale,
                            stride if block == 0 else 1)
            channels = out // scale
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "avgpool")], "flatten", axis=1)
    fc_w = b.weight("fc.weight", (classes, channels), math.sqrt(1.0 / channels))
    b.node("Gemm", [x, fc_w, b.weight("fc.bias", (classes,), 0.01)], OUTPUT, transB=1)
    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [BATCH, 3, image, image])
    return b.model("resnet50", [pixels], classes)


def _linear(b: _Builder, x: str, name: str, width_in: int, width_out: int) -> str:
    w = b.weight(f"{name}.weight", (width_in, width_out), math.sqrt(1.0 / width_in))
    return b.node("Add", [b.node("MatMul", [x, w], f"{name}.matmul"), b.weight(f"{name}.bias", (width_out,), 0.01)],
                  name)


def _layer_norm(b: _Builder, x: str, name: str, width: int) -> str:
    gamma = b.constant(f"{name}.weight", np.ones(width, np.float32))
    beta = b.constant(f"{name}.bias", np.zeros(width, np.float32))
    return b.node("LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=1e-12)


def _attention(b: _Builder, x: str, name: str, width: int, heads: int, sequence: int) -> str:
    head = width // heads
    split = b.constant(f"{name}.heads_shape", np.array([0, sequence, heads, head], np.int64))
    merged = b.constant(f"{name}.merged_shape", np.array([0, sequence, width], np.int64))

    def heads_of(role: str, perm: list[int]) -> str:
        projected = _linear(b, x, f"{name}.{role}", width, width)
        return b.node("Transpose", [b.node("Reshape", [projected, split], f"{name}.{role}.split")],
                      f"{name}.{role}.heads", perm=perm)

    q, k, v = heads_of("query", [0, 2, 1, 3]), heads_of("key", [0, 2, 3, 1]), heads_of("value", [0, 2, 1, 3])
    scale = b.constant(f"{name}.scale", np.array(1.0 / math.sqrt(head), np.float32))
    scores = b.node("Mul", [b.node("MatMul", [q, k], f"{name}.scores"), scale], f"{name}.scaled")
    probabilities = b.node("Softmax", [scores], f"{name}.softmax", axis=-1)
    context = b.node("Transpose", [b.node("MatMul", [probabilities, v], f"{name}.context")],
                     f"{name}.context.tokens", perm=[0, 2, 1, 3])
    return _linear(b, b.node("Reshape", [context, merged], f"{name}.merged"), f"{name}.output", width, width)


def _gelu(b: _Builder, x: str, name: str) -> str:
    """``x * 0.5 * (1 + erf(x / sqrt(2)))``, the form exporters write and onnxruntime fuses."""
    root = b.constant(f"{name}.sqrt2", np.array(math.sqrt(2.0), np.float32))
    one = b.constant(f"{name}.one", np.array(1.0, np.float32))
    half = b.constant(f"{name}.half", np.array(0.5, np.float32))
    erf = b.node("Erf", [b.node("Div", [x, root], f"{name}.div")], f"{name}.erf")
    inner = b.node("Mul", [x, b.node("Add", [erf, one], f"{name}.add")], f"{name}.mul")
    return b.node("Mul", [inner, half], name)


def bert_base(small: bool = False, seed: int = 0, classes: int = 2) -> onnx.ModelProto:
    """A BERT-base encoder (12 blocks, 768 wide, 12 heads, FFN 3,072) on 128 tokens; ``small``: 12 blocks
    64 wide, 4 heads, FFN 256, 16 tokens."""
    width, heads, ffn, sequence = (64, 4, 256, 16) if small else (768, 12, 3072, 128)
    b = _Builder(seed)
    x = _layer_norm(b, "hidden", "embeddings.LayerNorm", width)
    for block in range(12):
        name = f"encoder.layer.{block}"
        attended = _attention(b, x, f"{name}.attention", width, heads, sequence)
        x = _layer_norm(b, b.node("Add", [attended, x], f"{name}.attention.residual"), f"{name}.attention.LayerNorm",
                        width)
        inner = _gelu(b, _linear(b, x, f"{name}.intermediate", width, ffn), f"{name}.gelu")
        out = _linear(b, inner, f"{name}.output", ffn, width)
        x = _layer_norm(b, b.node("Add", [out, x], f"{name}.residual"), f"{name}.output.LayerNorm", width)
    first = b.node("Gather", [x, b.constant("pooler.index", np.array(0, np.int64))], "pooler.first_token", axis=1)
    pooled = b.node("Tanh", [_linear(b, first, "pooler.dense", width, width)], "pooler")
    w = b.weight("classifier.weight", (width, classes), math.sqrt(1.0 / width))
    b.node("Add", [b.node("MatMul", [pooled, w], "classifier.matmul"), b.weight("classifier.bias", (classes,), 0.01)],
           OUTPUT)
    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [BATCH, sequence, width])
    return b.model("bert_base", [hidden], classes)


SHAPES = {"resnet50": resnet50, "bert_base": bert_base}


def random_rows(model: onnx.ModelProto, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded standard-normal rows for every input of ``model`` (its non-batch dims are fixed)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
        feed[value.name] = rng.standard_normal((rows, *dims), dtype=np.float32)
    return feed
