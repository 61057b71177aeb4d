"""Candidate exits: at every cut, the pooling variant and the softmax rule, fitted on the rules rows.

For each cut the pooling variant is chosen on held-out fitting rows
(:func:`~moco_compile.passes.rules.select_variant`), the rule is refitted on all
fitting rows, and each candidate comes with its scores on every split: the
rules rows get cross-fitted scores (rules fitted without the row), the other
splits the final rule's scores.  The planner only ever sees these scores.

With ``PlannerConfig.ood_guard`` each candidate also gets an out-of-distribution
guard (:mod:`~moco_compile.passes.guard`) fitted on the same rows and features,
and each split its verdicts: on the rules rows from cross-fitted distances (as
their scores are), on the others from the final guard, with the rows within
rounding of its threshold marked.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moco_compile.errors import CalibrationDataError
from moco_compile.frame import ActivationFrame
from moco_compile.passes.calibrate import PREDICTIONS, cut_column, variant_features
from moco_compile.passes.config import Budget, PlannerConfig
from moco_compile.passes.cut_points import CutPoint
from moco_compile.passes.guard import GuardFitter
from moco_compile.passes.plan import Exit
from moco_compile.passes.pooling import pooling_cost, variants_for
from moco_compile.passes.routing import GuardVerdicts
from moco_compile.passes.rules import SoftmaxRuleFitter, out_of_fold_scores, select_variant


@dataclass
class Candidates:
    """Candidate exits (thresholds off), their scores per split name (``[N, C]`` per exit) and,
    when they are guarded, their guards' verdicts per split name."""

    exits: list[Exit]
    scores: dict[str, list[np.ndarray]]
    guards: dict[str, GuardVerdicts] | None = None


def fit_candidates(frame: ActivationFrame, cuts: Sequence[CutPoint], rows: dict[str, np.ndarray],
                   num_classes: int, budget: Budget, config: PlannerConfig) -> Candidates:
    """Fit one candidate exit per cut on ``rows["rules"]`` and score ``rows``'s other splits."""
    predictions = frame[PREDICTIONS]
    fit_rows = rows["rules"]
    targets = predictions[fit_rows]
    fitter = SoftmaxRuleFitter()
    exits: list[Exit] = []
    scores: dict[str, list[np.ndarray]] = {name: [] for name in rows}
    verdicts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in rows}
    for cut in cuts:
        column = cut_column(cut)
        variants = {variant: variant_features(frame, column, variant)
                    for variant in variants_for(cut.shape, cut.sequence_mask)}
        if not all(np.isfinite(values).all() for values in variants.values()):
            raise CalibrationDataError(f"the model's activations at {column} contain NaN or Inf; "
                                       "check the calibration inputs are in the range the model expects")
        variant, rule = select_variant({v: f[fit_rows] for v, f in variants.items()}, targets, num_classes,
                                       fitter, precision=1 - budget.max_disagreement / 2,
                                       held_out=config.variant_held_out, min_gain=config.variant_min_gain)
        rule_flops = pooling_cost(cut.shape, variant) + rule.flops + 2 * num_classes
        guard = None
        if config.ood_guard is not None:
            guard_fitter = GuardFitter(config.ood_guard, config.cross_fit_folds)
            guard = guard_fitter.fit(variants[variant][fit_rows], targets)
            rule_flops += guard.flops
        exits.append(Exit(cut, column, variant, rule, np.full(num_classes, np.inf), rule_flops, guard))
        for name, indices in rows.items():
            features = variants[variant][indices]
            scores[name].append(out_of_fold_scores(fitter, features, targets, num_classes, config.cross_fit_folds)
                                if name == "rules" else rule(features))
            if guard is None:
                continue
            if name == "rules":
                verdicts[name].append((guard_fitter.out_of_fold_distances_ > guard.threshold,
                                       np.zeros(len(indices), bool)))
            else:
                verdicts[name].append(guard.verdicts(features, config.rounding.guard))
    guards = None if config.ood_guard is None else {
        name: GuardVerdicts(tuple(b for b, _ in pairs), tuple(n for _, n in pairs)) for name, pairs in verdicts.items()}
    return Candidates(exits, scores, guards)
