"""Candidate exits: at every cut, the pooling variant and the softmax rule, fitted on the rules rows.

For each cut the pooling variant is chosen on held-out fitting rows
(:func:`~moco_compile.passes.calibration.rules.select_variant`), the rule is refitted on all
fitting rows, and each candidate comes with its cross-fitted scores on the
fitting rows (rules fitted without the row), on which plans are designed.
Other rows get the final rules' scores (:func:`candidate_scores`), wherever they
are: in memory or in a frame shard on a worker.  The planner only ever sees scores.

With ``PlannerConfig.ood_guard`` each candidate also gets an out-of-distribution
guard (:mod:`~moco_compile.passes.calibration.guard`) fitted on the same rows and features:
the fitting rows get its verdicts from cross-fitted distances (as their scores
are), other rows the final guard's (:func:`candidate_split`), with the rows
within rounding of its threshold marked.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moco_compile.constants import LABELS, PREDICTIONS
from moco_compile.errors import CalibrationDataError
from moco_compile.frame import ActivationFrame
from moco_compile.passes.calibration.calibrate import cut_column, variant_features
from moco_compile.passes.calibration.guard import GuardFitter
from moco_compile.passes.calibration.pooling import pooling_cost, variants_for
from moco_compile.passes.calibration.rules import SoftmaxRuleFitter, out_of_fold_scores, select_variant
from moco_compile.passes.graph.cut_points import CutPoint
from moco_compile.passes.planning.config import Budget, PlannerConfig
from moco_compile.passes.planning.counts import Split
from moco_compile.passes.planning.routing import GuardVerdicts, Rounding, guard_verdicts
from moco_compile.passes.planning.types import Exit


@dataclass
class Candidates:
    """Candidate exits (thresholds off), their cross-fitted scores on the fitting rows (``[N, C]`` per
    exit) and, when they are guarded, their guards' cross-fitted verdicts there."""

    exits: list[Exit]
    design_scores: list[np.ndarray]
    design_guard: GuardVerdicts | None = None


def fit_candidates(frame: ActivationFrame, cuts: Sequence[CutPoint], num_classes: int, budget: Budget,
                   config: PlannerConfig) -> Candidates:
    """Fit one candidate exit per cut on ``frame``'s rows (the rules rows, in memory)."""
    targets = frame[PREDICTIONS]
    fitter = SoftmaxRuleFitter()
    exits: list[Exit] = []
    design_scores: list[np.ndarray] = []
    verdicts: list[tuple[np.ndarray, np.ndarray]] = []
    for cut in cuts:
        column = cut_column(cut)
        variants = {variant: _finite(variant_features(frame, column, variant), column)
                    for variant in variants_for(cut.shape, cut.sequence_mask, cut.summary_token)}
        variant, rule = select_variant(variants, targets, num_classes, fitter,
                                       precision=1 - budget.max_disagreement / 2,
                                       held_out=config.variant_held_out, min_gain=config.variant_min_gain)
        rule_flops = pooling_cost(cut.shape, variant) + rule.flops + 2 * num_classes
        guard = None
        if config.ood_guard is not None:
            guard_fitter = GuardFitter(config.ood_guard, config.cross_fit_folds)
            guard = guard_fitter.fit(variants[variant], targets)
            rule_flops += guard.flops
            verdicts.append((guard_fitter.out_of_fold_distances_ > guard.threshold, np.zeros(len(targets), bool)))
        exits.append(Exit(cut, column, variant, rule, np.full(num_classes, np.inf), rule_flops, guard))
        design_scores.append(out_of_fold_scores(fitter, variants[variant], targets, num_classes,
                                                config.cross_fit_folds))
    guards = None if config.ood_guard is None else \
        GuardVerdicts(tuple(b for b, _ in verdicts), tuple(n for _, n in verdicts))
    return Candidates(exits, design_scores, guards)


def candidate_scores(exits: Sequence[Exit], frame: ActivationFrame) -> list[np.ndarray]:
    """Each exit's scores (``[N, C]``) on ``frame``'s rows, from its pooled features there."""
    return [e.scores(_finite(variant_features(frame, e.column, e.pooling), e.column)) for e in exits]


def candidate_split(exits: Sequence[Exit], frame: ActivationFrame, rounding: Rounding) -> Split:
    """``frame``'s rows as planning reads them: each exit's scores, the full model's predictions, the
    labels if any, and the exits' guards' verdicts (rows within ``rounding`` of a guard's threshold marked)."""
    if not len(frame):  # a chunk without rows of a split: variant_features cannot shape 0 rows
        classes = len(exits[0].thresholds) if exits else 0
        empty = np.zeros((0, classes), np.float32)
        none = tuple(np.zeros(0, bool) for _ in exits)
        guarded = any(e.guard is not None for e in exits)
        return Split([empty for _ in exits], frame[PREDICTIONS], frame[LABELS] if LABELS in frame else None,
                     GuardVerdicts(none, none) if guarded else None)
    features = [_finite(variant_features(frame, e.column, e.pooling), e.column) for e in exits]
    return Split([e.scores(f) for e, f in zip(exits, features)], frame[PREDICTIONS],
                 frame[LABELS] if LABELS in frame else None,
                 guard_verdicts([e.guard for e in exits], features, len(frame), rounding))


def _finite(features: np.ndarray, column: str) -> np.ndarray:
    if not np.isfinite(features).all():
        raise CalibrationDataError(f"the model's activations at {column} contain NaN or Inf; "
                                   "check the calibration inputs are in the range the model expects")
    return features
