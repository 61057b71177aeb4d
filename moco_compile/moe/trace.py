"""Recording routing traces (layout: :mod:`moco_compile.moe.frame`) from a torch MoE model,
and reading what speculative routing needs from it (:func:`gate_parameters`)."""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from moco_compile.errors import ModelError
from moco_compile.frame import ActivationFrame, FrameWriter, load_frame
from moco_compile.moe.frame import POSITION, RoutingSpec, WINDOW, experts_column, hidden_column
from moco_compile.runtime.moe.decode import forward_tokens, moe_blocks, new_kv, reference_step


def routing_spec(model: torch.nn.Module) -> RoutingSpec:
    """The routing shape of ``model`` (:class:`~moco_compile.errors.NoMoELayersError` if it has no MoE layers)."""
    layers = moe_blocks(model)
    return RoutingSpec(len(layers), len(layers[0].experts), int(layers[0].top_k), layers[0].gate.in_features)


def gate_parameters(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Per layer: the pre-MoE LayerNorm (``norm_weight``, ``norm_bias`` ``[L, D]``, ``norm_eps`` ``[L]``)
    and the gate (``gate_weight`` ``[L, E, D]``, no bias)."""
    norms = [block.norm2 for block in model.blocks]
    if not all(isinstance(norm, torch.nn.LayerNorm) and norm.elementwise_affine for norm in norms):
        raise ModelError("speculative routing needs each block's `norm2` to be a torch.nn.LayerNorm with affine "
                         "parameters (the norm applied before the gate)")
    gates = [layer.gate for layer in moe_blocks(model)]
    if any(gate.bias is not None for gate in gates):
        raise ModelError("speculative routing needs gates without bias (`nn.Linear(D, E, bias=False)`)")
    return {"norm_weight": _stack([n.weight for n in norms]), "norm_bias": _stack([n.bias for n in norms]),
            "norm_eps": np.array([n.eps for n in norms], np.float32), "gate_weight": _stack([g.weight for g in gates])}


def _stack(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.stack([tensor.detach().float().cpu().numpy() for tensor in tensors])


def trace_routing(model: torch.nn.Module, windows: np.ndarray, path: str | os.PathLike, batch: int = 16,
                  progress: Callable[[int], None] | None = None) -> ActivationFrame:
    """Run ``model`` on token ``windows`` ``[N, T]`` and write the trace to ``path`` (memory-mapped on return).

    ``progress(n)`` is called after each batch of ``n`` windows.
    """
    columns: dict[str, np.ndarray] = {}

    def record(layer: int, residual: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        columns[hidden_column(layer)] = residual.float().numpy()
        columns[experts_column(layer)] = chosen.numpy().astype(np.int16)

    step = reference_step(model, record)
    with FrameWriter(path) as writer, torch.no_grad():
        for start in range(0, len(windows), batch):
            chunk = torch.from_numpy(np.asarray(windows[start:start + batch], np.int64))
            columns.update({WINDOW: np.repeat(np.arange(start, start + len(chunk), dtype=np.int32), chunk.shape[1]),
                            POSITION: np.tile(np.arange(chunk.shape[1], dtype=np.int32), len(chunk))})
            forward_tokens(model, chunk, new_kv(model), step)
            writer.write(columns)
            if progress is not None:
                progress(len(chunk))
    return load_frame(path)
