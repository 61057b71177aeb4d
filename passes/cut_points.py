"""Candidate cut points: tensors that separate a graph into a prefix and a remainder.

A tensor T is a cut when every non-constant value that the remainder (all
nodes that are not ancestors of T) reads from the prefix is T itself, apart
from declared side inputs (graph inputs such as ``attention_mask`` that the
remainder still reads).  Inside residual and multi-branch blocks the skip
tensor is live across the block, so only block boundaries qualify.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx

from moco_compile.passes.graph import GraphIndex

HEAVY_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "MatMulInteger", "QLinearConv",
             "QLinearMatMul", "ConvInteger"}


@dataclass(frozen=True)
class CutPoint:
    """A place where the graph can be split, with the cost on each side (FLOPs per row)."""

    tensor: str
    module: str
    shape: tuple[int, ...]
    flops_before: float
    flops_after: float
    side_inputs: tuple[str, ...] = ()

    @property
    def fraction_before(self) -> float:
        return self.flops_before / (self.flops_before + self.flops_after)


def find_cut_points(model: onnx.ModelProto, node_flops: Sequence[float],
                    shapes: Mapping[str, tuple[int, ...]],
                    scopes: Mapping[str, tuple[str, ...]] | None = None,
                    side_inputs: Iterable[str] = (), min_fraction: float = 0.02,
                    merge_fraction: float = 0.005) -> list[CutPoint]:
    """Return the useful cut points of ``model`` in execution order.

    ``node_flops`` is the per-row cost of each node, ``shapes`` the tensor shapes
    at batch 1.  Cuts with less than ``min_fraction`` of the FLOPs on either
    side are dropped, and of cuts closer than ``merge_fraction`` of the FLOPs
    (e.g. a block's Add and the ReLU after it) only the last is kept.
    """
    index = GraphIndex(model)
    allowed_crossing = set(side_inputs)
    total = float(sum(node_flops))
    heavy_seen = False
    separating: list[CutPoint] = []
    for position, node in enumerate(model.graph.node):
        heavy_seen = heavy_seen or node.op_type in HEAVY_OPS
        if not heavy_seen or index.is_constant_node(position):
            continue
        for tensor in node.output:
            if not tensor or tensor in index.graph_outputs or not _is_batched_float(model, tensor, shapes):
                continue
            before = index.ancestors(tensor)
            if index.crossing_tensors(before) - allowed_crossing != {tensor}:
                continue
            flops_before = sum(node_flops[i] for i in before)
            separating.append(CutPoint(tensor, _module_name(model, index, tensor, scopes or {}),
                                       shapes[tensor], flops_before, total - flops_before,
                                       tuple(sorted(allowed_crossing & set(index.graph_inputs)))))
    useful = [cut for cut in separating
              if min_fraction <= cut.fraction_before <= 1 - min_fraction]
    return [cut for cut, following in zip(useful, useful[1:] + [None])
            if following is None or following.flops_before - cut.flops_before > merge_fraction * total]


def _is_batched_float(model: onnx.ModelProto, tensor: str, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    shape = shapes.get(tensor)
    if shape is None or len(shape) < 2 or shape[0] != 1:
        return False
    for value in model.graph.value_info:
        if value.name == tensor:
            return value.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return True


def _module_name(model: onnx.ModelProto, index: GraphIndex, tensor: str,
                 scopes: Mapping[str, tuple[str, ...]]) -> str:
    """The outermost module whose last node produces ``tensor`` (i.e. the module's output)."""
    own = scopes.get(tensor, ())
    position = index.producer[tensor]
    later_scopes = [set(scopes.get(name, ())) for node in model.graph.node[position + 1:]
                    for name in node.output[:1]]
    for scope in own:
        if not any(scope in later for later in later_scopes):
            return scope
    return own[-1] if own else ""
