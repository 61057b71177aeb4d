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
