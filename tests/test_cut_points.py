"""Cut points of the reference CNN and of graphs with branches."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from moco_compile.importer import import_model
from moco_compile.passes.graph.cut_points import find_cut_points
from moco_compile.passes.graph.flops import flops_per_row, measure_shapes
from moco_compile.passes.graph.index import GraphIndex


def _cuts(model, feed, **kwargs):
    shapes = measure_shapes(model, feed)
    node_flops = flops_per_row(model, shapes)
    return find_cut_points(model, node_flops, shapes, **kwargs), node_flops


def test_reference_cnn_cuts_are_block_boundaries(reference_onnx):
    imported = import_model(reference_onnx)
    cuts, node_flops = _cuts(imported.model, {"images": np.zeros((1, 1, 28, 28), np.float32)},
                             scopes=imported.scopes)
    assert [c.module for c in cuts] == ["layer1.0", "layer1", "layer2.0", "layer2", "layer3.0"]
    index = GraphIndex(imported.model)
    # conv multiply-adds before each cut: the 1->16 stem and 3x3 convs, two per block (+1x1 shortcuts)
    macs = {"layer1.0": 28 * 28 * 9 * (16 + 2 * 16 * 16), "layer1": 28 * 28 * 9 * (16 + 4 * 16 * 16)}
    macs["layer2.0"] = macs["layer1"] + 14 * 14 * (9 * (16 * 32 + 32 * 32) + 16 * 32)
    macs["layer2"] = macs["layer2.0"] + 14 * 14 * 9 * 2 * 32 * 32
    macs["layer3.0"] = macs["layer2"] + 7 * 7 * (9 * (32 * 64 + 64 * 64) + 32 * 64)
    for cut in cuts:
        producer = imported.model.graph.node[index.producer[cut.tensor]]
        feeding = imported.model.graph.node[index.producer[producer.input[0]]]
        assert (producer.op_type, feeding.op_type) == ("Relu", "Add")  # the block's output, after the skip-add
        assert cut.flops_before == pytest.approx(2 * macs[cut.module], rel=0.02), cut.module


def test_reference_cnn_flops_match_the_architecture(reference_onnx):
    imported = import_model(reference_onnx)
    shapes = measure_shapes(imported.model, {"images": np.zeros((1, 1, 28, 28), np.float32)})
    conv_flops = sum(f for f, node in zip(flops_per_row(imported.model, shapes), imported.model.graph.node)
                     if node.op_type == "Conv")
    # 3x3 convs: stem 1->16 and 4 of 16->16 at 28x28; 32-wide at 14x14, 64-wide at 7x7 (+1x1 shortcuts)
    macs = 28 * 28 * 9 * (16 + 4 * 16 * 16) + 14 * 14 * (9 * (16 * 32 + 3 * 32 * 32) + 16 * 32) \
        + 7 * 7 * (9 * (32 * 64 + 3 * 64 * 64) + 32 * 64)
    assert conv_flops == pytest.approx(2 * macs, rel=0.02)


def _branchy_model() -> onnx.ModelProto:
    """x -> conv a -> relu -> {conv b, conv c} -> add -> conv d -> flatten/gemm."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "wb"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["ra", "wc"], ["c"]),
        helper.make_node("Add", ["b", "c"], ["s"]),
        helper.make_node("Conv", ["s", "wd"], ["d"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["d"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wf"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "branchy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
        [weight("wa", 8, 3, 3, 3), weight("wb", 8, 8, 3, 3), weight("wc", 8, 8, 1, 1),
         weight("wd", 8, 8, 3, 3), weight("wf", 4, 8)])
    return helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)])


def test_no_cut_inside_a_branch():
    cuts, _ = _cuts(_branchy_model(), {"x": np.zeros((1, 3, 8, 8), np.float32)}, min_fraction=0.0,
                    merge_fraction=0.0)
    tensors = [c.tensor for c in cuts]
    assert "b" not in tensors and "c" not in tensors  # each branch alone does not separate the graph
    assert {"ra", "s"} <= set(tensors)


def _exported(module, example, opset: int) -> onnx.ModelProto:
    import io

    import torch

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module.eval(), (example,), buffer, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("opset", [17, 18])
def test_token_states_are_pooled_over_their_tokens_and_channels_over_their_positions(opset):
    """A transformer's [N, S, D] states (read by LayerNorm and Linear) get the mean over tokens and token 0; a
    1-D convolution's [N, C, L] channels keep the mean and max over positions. The probe's nodes compute
    exactly that, at either opset's form of ReduceMean."""
    torch = pytest.importorskip("torch")
    from models.zoo import TinyViT
    from moco_compile.passes.calibration.calibrate import probe_model
    from moco_compile.passes.calibration.pooling import variants_for

    torch.manual_seed(0)
    images = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    vit = import_model(_exported(TinyViT(), torch.from_numpy(images[:2]), opset)).model
    cuts, _ = _cuts(vit, {"x": images[:1]})
    tokens = [cut for cut in cuts if len(cut.shape) == 3]
    assert len(tokens) >= 3 and all(cut.tokens for cut in tokens)
    assert variants_for(tokens[0].shape, tokens=True) == ["first_token", "token_mean", "token_mean+first_token"]
    probe, columns = probe_model(vit, tokens[:1], raw=True)
    import onnxruntime as ort

    assert len(columns) == 3  # the raw tensor, then each piece
    raw, mean, first = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [output.name for output in probe.graph.output[-3:]], {"x": images})
    np.testing.assert_allclose(mean, raw.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(first, raw[:, 0])

    conv = torch.nn.Sequential(torch.nn.Conv1d(4, 16, 3), torch.nn.ReLU(), torch.nn.Conv1d(16, 16, 3), torch.nn.ReLU(),
                               torch.nn.Conv1d(16, 16, 3), torch.nn.Flatten(), torch.nn.Linear(16 * 26, 3))
    signals = np.random.default_rng(1).random((2, 4, 32), dtype=np.float32)
    cuts, _ = _cuts(import_model(_exported(conv, torch.from_numpy(signals), opset)).model, {"x": signals[:1]})
    assert cuts and not any(cut.tokens for cut in cuts)
    assert variants_for(cuts[0].shape, tokens=cuts[0].tokens) == ["mean", "mean+max"]
