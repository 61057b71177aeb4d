"""Candidate exits: at every cut, the pooling variant and the rule, fitted on the rules rows.

For each cut the pooling variant is chosen on held-out fitting rows
(:func:`~moco_compile.passes.calibration.rules.select_variant`, with the softmax rule), then the
head by cross-validation: with ``"mlp"`` in ``PlannerConfig.exit_heads``, an MLP distilled from the
full model (:mod:`~moco_compile.passes.calibration.mlp_head`) replaces the softmax rule where its
cross-fitted scores admit ``variant_min_gain`` more of the fitting rows at the exit's precision
(:func:`~moco_compile.passes.calibration.rules.high_precision_coverage`; on few rows the richer head
rarely wins).  The rule is refitted on all fitting rows, and each candidate comes with its
cross-fitted scores on the fitting rows (rules fitted without the row), on which plans are designed.
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
from dataclasses import dataclass, replace

import numpy as np

from moco_compile.constants import LABELS, PREDICTIONS, PROBABILITIES
from moco_compile.errors import CalibrationDataError
from moco_compile.frame import ActivationFrame
from moco_compile.passes.calibration.calibrate import cut_column, variant_features
from moco_compile.passes.calibration.guard import GuardFitter
from moco_compile.passes.calibration.mlp_head import DistilledMLPFitter
from moco_compile.passes.calibration.pooling import pooling_cost, variants_for
from moco_compile.passes.calibration.rules import (LinearScores, SoftmaxRuleFitter, high_precision_coverage,
                                                 out_of_fold_scores, select_variant)
from moco_compile.passes.graph.cut_points import CutPoint
from moco_compile.passes.planning.config import Budget, PlannerConfig
from moco_compile.passes.planning.counts import Split
from moco_compile.passes.planning.routing import GuardVerdicts, Rounding, guard_verdicts
from moco_compile.passes.planning.types import Exit


@dataclass
class Candidates:
    """Candidate exits (thresholds off), their cross-fitted scores on the fitting rows (``[N, C]`` per
    exit) and, when they are guarded, their guards' cross-fitted verdicts there.  ``probes_only``:
    when some exit got an MLP head, the same candidates with softmax probes at every cut (the
    planner keeps the MLP heads only where they pay for the plan as a whole), else None."""

    exits: list[Exit]
    design_scores: list[np.ndarray]
    design_guard: GuardVerdicts | None = None
    probes_only: "Candidates | None" = None


def fit_candidates(frame: ActivationFrame, cuts: Sequence[CutPoint], num_classes: int, budget: Budget,
                   config: PlannerConfig) -> Candidates:
    """Fit one candidate exit per cut on ``frame``'s rows (the rules rows, in memory)."""
    targets = frame[PREDICTIONS]
    probabilities = frame[PROBABILITIES] if PROBABILITIES in frame else targets  # what an MLP head is distilled from
    linear, mlp = SoftmaxRuleFitter(), DistilledMLPFitter()
    precision = 1 - budget.max_disagreement / 2
    probes: list[tuple[Exit, np.ndarray]] = []
    chosen: list[tuple[Exit, np.ndarray]] = []
    verdicts: list[tuple[np.ndarray, np.ndarray]] = []
    for cut in cuts:
        column = cut_column(cut)
        variants = {variant: _finite(variant_features(frame, column, variant), column)
                    for variant in variants_for(cut.shape, cut.sequence_mask, cut.summary_token)}
        variant, probe = select_variant(variants, targets, num_classes, linear, precision,
                                        config.variant_held_out, config.variant_min_gain)
        features = variants[variant]
        guard, guard_flops = None, 0.0
        if config.ood_guard is not None:
            guard_fitter = GuardFitter(config.ood_guard, config.cross_fit_folds)
            guard = guard_fitter.fit(features, targets)
            guard_flops = guard.flops
            verdicts.append((guard_fitter.out_of_fold_distances_ > guard.threshold, np.zeros(len(targets), bool)))

        def candidate(rule: LinearScores, scores: np.ndarray) -> tuple[Exit, np.ndarray]:
            rule_flops = pooling_cost(cut.shape, variant) + rule.flops + 2 * num_classes + guard_flops
            return Exit(cut, column, variant, rule, np.full(num_classes, np.inf), rule_flops, guard), scores

        probes.append(candidate(probe, out_of_fold_scores(linear, features, targets, num_classes,
                                                          config.cross_fit_folds)))
        chosen.append(probes[-1])
        if "mlp" in config.exit_heads and len(targets) >= config.mlp_min_rows:
            mlp_scores = out_of_fold_scores(mlp, features, probabilities, num_classes, config.cross_fit_folds)
            if (high_precision_coverage(mlp_scores, targets, precision)
                    > high_precision_coverage(probes[-1][1], targets, precision) + config.variant_min_gain):
                chosen[-1] = candidate(mlp.fit(features, probabilities, num_classes), mlp_scores)
    guards = None if config.ood_guard is None else \
        GuardVerdicts(tuple(b for b, _ in verdicts), tuple(n for _, n in verdicts))

    def as_candidates(pairs: list[tuple[Exit, np.ndarray]]) -> Candidates:
        return Candidates([e for e, _ in pairs], [scores for _, scores in pairs], guards)

    if all(mine is probe for mine, probe in zip(chosen, probes)):
        return as_candidates(probes)
    return replace(as_candidates(chosen), probes_only=as_candidates(probes))

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
