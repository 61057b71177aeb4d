"""Candidate exits: at every cut, the pooling variant and the softmax rule, fitted on the rules rows.

For each cut the pooling variant is chosen on held-out fitting rows
(:func:`~moco_compile.passes.rules.select_variant`), the rule is refitted on all
fitting rows, and each candidate comes with its scores on every split: the
rules rows get cross-fitted scores (rules fitted without the row), the other
splits the final rule's scores.  The planner only ever sees these scores.
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
from moco_compile.passes.plan import Exit
from moco_compile.passes.pooling import pooling_cost, variants_for
from moco_compile.passes.rules import SoftmaxRuleFitter, out_of_fold_scores, select_variant


@dataclass
class Candidates:
    """Candidate exits (thresholds off) and their scores per split name (``[N, C]`` per exit)."""

    exits: list[Exit]
    scores: dict[str, list[np.ndarray]]


def fit_candidates(frame: ActivationFrame, cuts: Sequence[CutPoint], rows: dict[str, np.ndarray],
                   num_classes: int, budget: Budget, config: PlannerConfig) -> Candidates:
    """Fit one candidate exit per cut on ``rows["rules"]`` and score ``rows``'s other splits."""
    predictions = frame[PREDICTIONS]
    fit_rows = rows["rules"]
    targets = predictions[fit_rows]
    fitter = SoftmaxRuleFitter()
    exits: list[Exit] = []
    scores: dict[str, list[np.ndarray]] = {name: [] for name in rows}
    for cut in cuts:
        column = cut_column(cut)
        variants = {variant: variant_features(frame, column, variant)
                    for variant in variants_for(cut.shape, cut.sequence_mask, cut.summary_token)}
        if not all(np.isfinite(values).all() for values in variants.values()):
            raise CalibrationDataError(f"the model's activations at {column} contain NaN or Inf; "
                                       "check the calibration inputs are in the range the model expects")
        variant, rule = select_variant({v: f[fit_rows] for v, f in variants.items()}, targets, num_classes,
                                       fitter, precision=1 - budget.max_disagreement / 2,
                                       held_out=config.variant_held_out, min_gain=config.variant_min_gain)
        rule_flops = pooling_cost(cut.shape, variant) + rule.flops + 2 * num_classes
        exits.append(Exit(cut, column, variant, rule, np.full(num_classes, np.inf), rule_flops))
        for name, indices in rows.items():
            features = variants[variant][indices]
            scores[name].append(out_of_fold_scores(fitter, features, targets, num_classes, config.cross_fit_folds)
                                if name == "rules" else rule(features))
    return Candidates(exits, scores)
