"""Pooling of a cut tensor into one feature vector per row, as ONNX nodes.

The same nodes are used when calibrating and inside the compiled graph, so the
features a rule was fitted on are exactly the features it sees at run time.
"""
from __future__ import annotations

import onnx
from onnx import helper

SPATIAL_MEAN = "spatial_mean"  # [N, C, *spatial] -> mean over spatial axes
FLAT = "flat"                  # [N, D] -> as is


def pooling_for(shape: tuple[int, ...]) -> str:
    """The pooling used for a cut tensor of this (batch-first) shape."""
    return FLAT if len(shape) == 2 else SPATIAL_MEAN


def pooled_width(shape: tuple[int, ...], pooling: str) -> int:
    """Length of the pooled feature vector."""
    return shape[1]


def pooling_cost(shape: tuple[int, ...]) -> float:
    """FLOPs per row of pooling a tensor of this batch-1 shape."""
    size = 1
    for dim in shape[1:]:
        size *= dim
    return float(size) if len(shape) > 2 else 0.0


def pooling_nodes(tensor: str, pooling: str, output: str, prefix: str) -> list[onnx.NodeProto]:
    """Nodes that read ``tensor`` and write the pooled ``[N, D]`` features to ``output``."""
    if pooling == FLAT:
        return [helper.make_node("Identity", [tensor], [output], name=f"{prefix}/pool")]
    if pooling == SPATIAL_MEAN:
        pooled = f"{prefix}/global_average"
        return [helper.make_node("GlobalAveragePool", [tensor], [pooled], name=f"{prefix}/pool"),
                helper.make_node("Flatten", [pooled], [output], name=f"{prefix}/flatten", axis=1)]
    raise ValueError(f"unknown pooling {pooling!r}")
