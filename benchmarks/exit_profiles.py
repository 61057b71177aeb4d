"""Exits whose thresholds reach given exit profiles on random-weight models: a systems curve, not a certificate.

A served shape with random weights has no classes worth keeping, so instead of certifying a plan the benchmark
sets one exit, about a third of the way through the FLOPs, to let a chosen fraction of rows leave:

1. :func:`third_cut`: the cut (``find_cut_points`` on the model's measured shapes and FLOPs) nearest a third of
   the compute.
2. :func:`pooled_features`: the cut's pooled features (``mean`` of an image map, ``first_token`` of token
   states), computed by the same ONNX pooling nodes the compiled graph runs, on the prefix up to the cut only.
3. :func:`random_rule`: a seeded random linear map of the standardised features, one score per class.
4. :func:`profile_plans`: per profile ``p``, one threshold for every class at the ``1 - p`` quantile of the
   rows' top score, so that a fraction ``p`` of rows like these leaves; ``"closed"``: threshold +inf, rules run
   and no row leaves (the price of an exit alone).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from moco_compile.constants import FLOPS_ORIGINAL_KEY, STAGE_FLOPS_KEY
from moco_compile.passes.calibration.pooling import pooling_cost, variant_nodes
from moco_compile.passes.calibration.rules import LinearScores
from moco_compile.passes.graph.cut_points import CutPoint, find_cut_points
from moco_compile.passes.graph.flops import flops_per_row, measure_shapes
from moco_compile.passes.graph.index import GraphIndex
from moco_compile.passes.planning.types import Exit, ExitPlan
from moco_compile.runtime.session import ExitStatistics

PROFILES = (0.3, 0.5, 0.7)
CLOSED = "closed"
FEATURES = "moco_bench/features"
NOTE = "systems curve: thresholds set to an exit profile on random rows, nothing certified"


def third_cut(model: onnx.ModelProto, row: Mapping[str, np.ndarray], fraction: float = 1 / 3) -> CutPoint:
    """The cut point of ``model`` whose share of the FLOPs before it is nearest ``fraction`` (``row``: one row)."""
    shapes = measure_shapes(model, row)
    cuts = find_cut_points(model, flops_per_row(model, shapes), shapes)
    return min(cuts, key=lambda cut: abs(cut.fraction_before - fraction))


def pooling_for(cut: CutPoint) -> str:
    """Token 0 of ``[N, S, D]`` token states (BERT's summary token), the spatial mean of an image map."""
    return "first_token" if len(cut.shape) == 3 else "mean"


def prefix_with_features(model: onnx.ModelProto, cut: CutPoint, pooling: str) -> onnx.ModelProto:
    """The nodes of ``model`` up to ``cut`` and the pooling nodes after it; one output, the features."""
    index = GraphIndex(model)
    keep = sorted(index.ancestors(cut.tensor) | {i for i in range(len(model.graph.node)) if index.is_constant_node(i)})
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes = [model.graph.node[i] for i in keep] + variant_nodes(cut.tensor, pooling, cut.shape, FEATURES,
                                                                "moco_bench/pool", opset=opset)
    graph = helper.make_graph(nodes, "prefix", list(model.graph.input),
                              [helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None)],
                              list(model.graph.initializer))
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def pooled_features(model: onnx.ModelProto, cut: CutPoint, pooling: str, feed: Mapping[str, np.ndarray],
                    providers: Sequence, batch: int = 64) -> np.ndarray:
    """``[N, D]`` pooled features at ``cut`` of the rows of ``feed``, run in batches on ``providers``."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(prefix_with_features(model, cut, pooling).SerializeToString(), options,
                                   providers=list(providers))
    rows = len(next(iter(feed.values())))
    return np.concatenate([session.run(None, {k: v[i:i + batch] for k, v in feed.items()})[0]
                           for i in range(0, rows, batch)])


def random_rule(features: np.ndarray, classes: int, seed: int = 0) -> LinearScores:
    """Scores ``z @ W`` of the standardised features ``z`` (``W`` seeded, unit-variance scores), folded into
    one weight and bias."""
    mean, spread = features.mean(0), features.std(0) + 1e-6
    projection = np.random.default_rng(seed).standard_normal((features.shape[1], classes)) / np.sqrt(features.shape[1])
    weight = projection / spread[:, None]
    return LinearScores(weight.astype(np.float32), (-(mean / spread) @ projection).astype(np.float32))


def profile_plans(cut: CutPoint, pooling: str, rule: LinearScores, features: np.ndarray,
                  profiles: Sequence[float] = PROFILES) -> dict[str, ExitPlan]:
    """One single-exit plan per profile (key ``"30%"`` ...: that share of rows like ``features`` leaves at
    ``cut``), and the closed plan (key :data:`CLOSED`)."""
    top = rule(features).max(axis=1)
    classes = rule.bias.size
    thresholds = {f"{p:.0%}": float(np.quantile(top, 1 - p)) for p in profiles}
    thresholds[CLOSED] = np.inf
    total = cut.flops_before + cut.flops_after
    plans = {}
    for name, threshold in thresholds.items():
        exit_ = Exit(cut, cut.tensor, pooling, rule, np.full(classes, threshold, np.float32),
                     pooling_cost(cut.shape, pooling) + rule.flops)
        plans[name] = ExitPlan([exit_], total, {"note": NOTE, "profile": name})
    return plans


def realized(compiled: onnx.ModelProto, exit_ids: np.ndarray) -> dict[str, float | None]:
    """Share of rows that left and the FLOPs reduction of ``exit_ids`` (the graph's ``moco_exit``), costed by
    the compiled graph's own metadata (what a row leaving at each exit costs, the original's cost)."""
    metadata = {p.key: p.value for p in compiled.metadata_props}
    statistics = ExitStatistics(stage_flops=json.loads(metadata[STAGE_FLOPS_KEY]),
                                original_flops=float(metadata[FLOPS_ORIGINAL_KEY]))
    statistics.add(exit_ids)
    return {"exit_fraction": float((exit_ids >= 0).mean()), "flops_reduction": statistics.compute_reduction}
