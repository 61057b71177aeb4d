"""Pooling of a cut tensor into one feature vector per row, as ONNX nodes.

A pooling *variant* concatenates one or more *pieces*:

* ``mean``: global average over spatial axes (``[N, C, *S] -> [N, C]``);
* ``max``: global maximum over spatial axes;
* ``grid``: average over a 2x2 grid of spatial quadrants (``[N, C, H, W] -> [N, 4C]``),
  which keeps where in the image a pattern sits, cheaply;
* ``flat``: a ``[N, D]`` tensor as it is.

The same nodes are used when calibrating and inside the compiled graph, so the
features a rule was fitted on are exactly the features it sees at run time.
"""
from __future__ import annotations

import math

import onnx
from onnx import helper


def pieces_for(shape: tuple[int, ...]) -> list[str]:
    """Pieces that can be computed from a tensor of this (batch-first) shape."""
    if len(shape) == 2:
        return ["flat"]
    pieces = ["mean", "max"]
    if len(shape) == 4 and min(shape[2:]) >= 2:
        pieces.append("grid")
    return pieces


def variants_for(shape: tuple[int, ...]) -> list[str]:
    """Pooling variants worth trying at a cut, cheapest first."""
    pieces = pieces_for(shape)
    if pieces == ["flat"]:
        return ["flat"]
    return ["mean", "mean+max"] + (["grid", "grid+max"] if "grid" in pieces else [])


def variant_pieces(variant: str) -> list[str]:
    return variant.split("+")


def piece_width(shape: tuple[int, ...], piece: str) -> int:
    return shape[1] * (4 if piece == "grid" else 1) if piece != "flat" else math.prod(shape[1:])


def pooling_cost(shape: tuple[int, ...], variant: str) -> float:
    """FLOPs per row of computing a variant from a tensor of this batch-1 shape."""
    if variant == "flat":
        return 0.0
    return float(math.prod(shape[1:]) * len(variant_pieces(variant)))


def _grid_window(size: int) -> tuple[int, int]:
    """Kernel and stride splitting ``size`` into two (possibly overlapping) halves."""
    kernel = (size + 1) // 2
    return kernel, size - kernel


def piece_nodes(tensor: str, piece: str, shape: tuple[int, ...], output: str,
                prefix: str) -> list[onnx.NodeProto]:
    """Nodes writing the ``[N, width]`` features of one piece to ``output``."""
    if piece == "flat":
        return [helper.make_node("Identity", [tensor], [output], name=f"{prefix}/flat")]
    pooled = f"{prefix}/{piece}_pooled"
    if piece == "mean":
        pool = helper.make_node("GlobalAveragePool", [tensor], [pooled], name=f"{prefix}/mean")
    elif piece == "max":
        pool = helper.make_node("GlobalMaxPool", [tensor], [pooled], name=f"{prefix}/max")
    elif piece == "grid":
        windows = [_grid_window(size) for size in shape[2:]]
        pool = helper.make_node("AveragePool", [tensor], [pooled], name=f"{prefix}/grid",
                                kernel_shape=[k for k, _ in windows], strides=[s for _, s in windows])
    else:
        raise ValueError(f"unknown pooling piece {piece!r}")
    return [pool, helper.make_node("Flatten", [pooled], [output], name=f"{prefix}/{piece}_flatten", axis=1)]


def variant_nodes(tensor: str, variant: str, shape: tuple[int, ...], output: str,
                  prefix: str) -> list[onnx.NodeProto]:
    """Nodes writing the concatenated pieces of ``variant`` to ``output``."""
    pieces = variant_pieces(variant)
    if len(pieces) == 1:
        return piece_nodes(tensor, pieces[0], shape, output, prefix)
    nodes, names = [], []
    for piece in pieces:
        names.append(f"{prefix}/{piece}")
        nodes.extend(piece_nodes(tensor, piece, shape, names[-1], prefix))
    nodes.append(helper.make_node("Concat", names, [output], name=f"{prefix}/concat", axis=1))
    return nodes
