"""Synthetic exit scores and candidate exits for planning tests: a network of 100 MFLOPs whose exits'
log-probability scores get sharper at later cuts, with known ground truth."""
from __future__ import annotations

import numpy as np

from moco_compile.passes.calibration.rules import LinearScores
from moco_compile.passes.graph.cut_points import CutPoint
from moco_compile.passes.planning.counts import Split
from moco_compile.passes.planning.types import Exit

MFLOP = 1e6  # synthetic networks of 100 MFLOPs: exits' fixed cost (PlannerConfig.exit_fixed_cost) is small beside them
TOTAL_FLOPS = 100 * MFLOP


def synthetic_scores(predictions: np.ndarray, rng: np.random.Generator, classes: int = 3,
                     signals=(1.0, 2.5, 4.0)) -> list[np.ndarray]:
    """Per-exit log-probability scores for rows whose full-model class is ``predictions``: unit normal
    logits plus ``signal`` on that class, one exit per signal."""
    scores = []
    for signal in signals:
        logits = rng.normal(0, 1, (len(predictions), classes)) + signal * np.eye(classes)[predictions]
        scores.append((logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)).astype(np.float32))
    return scores


def synthetic(rows: int, rng: np.random.Generator, classes: int = 3, signals=(1.0, 2.5, 4.0)) -> Split:
    """Per-exit log-probability scores that get sharper at later exits, and the full model's class."""
    predictions = rng.integers(0, classes, rows)
    return Split(synthetic_scores(predictions, rng, classes, signals), predictions)


def candidate_exits(count: int, classes: int = 3) -> list[Exit]:
    """``count`` closed exits at cuts 25, 50, ... MFLOPs into the network (their rules unused: the
    planner reads the scores it is given)."""
    exits = []
    for k in range(count):
        cut = CutPoint(f"t{k}", f"block{k}", (1, 4), MFLOP * 25.0 * (k + 1), MFLOP * (100.0 - 25.0 * (k + 1)))
        exits.append(Exit(cut, f"block{k}", "flat", LinearScores(np.zeros((4, classes), np.float32),
                                                                  np.zeros(classes, np.float32)),
                          np.full(classes, np.inf), 1.0))
    return exits
