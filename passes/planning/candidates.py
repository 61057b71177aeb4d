"""Candidate exits: at every cut, the pooling variant and the rule, fitted on the rules rows.

For each cut the pooling variant is chosen on held-out fitting rows
(:func:`~moco_compile.passes.calibration.rules.select_variant`, with the softmax rule), then the
head by cross-validation: with ``"mlp"`` in ``PlannerConfig.exit_heads`` (and enough rows), an MLP
distilled from the full model (:mod:`~moco_compile.passes.calibration.mlp_head`), on the variant
chosen for it the same way, replaces the softmax rule where its cross-fitted scores admit
``variant_min_gain`` more of the fitting rows at the exit's precision
(:func:`~moco_compile.passes.calibration.rules.high_precision_coverage`).  Each kept rule is then
fitted on all fitting rows, and each candidate comes with its cross-fitted scores on the fitting rows
(rules fitted without the row), on which plans are designed; the softmax probes alone come along
(``Candidates.probes_only``) for the planner to keep instead when the MLP heads do not pay.

With ``PlannerConfig.ood_guard`` each candidate also gets an out-of-distribution
guard (:mod:`~moco_compile.passes.calibration.guard`) fitted on the same rows and features:
the fitting rows get its verdicts from cross-fitted distances (as their scores
are), other rows the final guard's (:func:`candidate_split`), with the rows
within rounding of its threshold marked.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from threadpoolctl import threadpool_limits

from moco_compile.constants import LABELS, PREDICTIONS, PROBABILITIES
from moco_compile.errors import CalibrationDataError
from moco_compile.frame import ActivationFrame
from moco_compile.passes.calibration.calibrate import cut_column, variant_features
from moco_compile.passes.calibration.guard import GuardFitter
from moco_compile.passes.calibration.mlp_head import DistilledMLPFitter
from moco_compile.passes.calibration.pooling import pooling_cost, variant_pieces, variants_for
from moco_compile.passes.calibration.rules import (RuleFitter, SoftmaxRuleFitter, high_precision_coverage,
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
    precision = 1 - budget.max_disagreement / 2
    try_mlp = "mlp" in config.exit_heads

    def fit_cut(cut: CutPoint) -> tuple[_Fitted, _Fitted]:
        """The cut's softmax probe, and its chosen head (the probe, or an MLP head that beats it)."""
        column = cut_column(cut)
        variants = {variant: _finite(variant_features(frame, column, variant), column)
                    for variant in head_variants(cut, try_mlp)}
        head = _HeadFitting(cut, column, variants, targets, num_classes, precision, config)
        probe = head.fit(SoftmaxRuleFitter(), targets, among=probe_variants(cut))
        mlp = head.fit(DistilledMLPFitter(), probabilities, beat=probe) if try_mlp else None
        return probe, probe if mlp is None else mlp

    # cuts are fitted independently, each fit on one BLAS thread (small products: threads only contend),
    # so the cores fit cuts side by side; the fits are seeded, so the result does not depend on the order
    with threadpool_limits(1), ThreadPoolExecutor(max(1, min(len(cuts), os.cpu_count() or 1))) as pool:
        probes, chosen = zip(*pool.map(fit_cut, cuts)) if cuts else ((), ())
    if all(mine is probe for mine, probe in zip(chosen, probes)):
        return _candidates(probes, config)
    return replace(_candidates(chosen, config), probes_only=_candidates(probes, config))


@dataclass
class _Fitted:
    """One cut's candidate exit with one kind of head: its cross-fitted scores on the fitting rows, the
    share of those rows they admit at the exit's precision, and its guard's cross-fitted verdicts."""

    exit: Exit
    scores: np.ndarray
    coverage: float
    guard_blocked: np.ndarray | None


@dataclass
class _HeadFitting:
    """One cut's fitting rows (``variants``: its pooled features per pooling variant), to fit heads on."""

    cut: CutPoint
    column: str
    variants: dict[str, np.ndarray]
    targets: np.ndarray
    num_classes: int
    precision: float
    config: PlannerConfig

    def fit(self, fitter: RuleFitter, fit_to: np.ndarray, beat: _Fitted | None = None,
            among: Sequence[str] | None = None) -> _Fitted | None:
        """``fitter``'s head fitted to ``fit_to``: the pooling variant chosen for it, cross-fitted scores,
        then (only when they admit ``variant_min_gain`` more rows than ``beat``'s, else None) the head
        fitted on all rows, and the guard on that variant's features (``beat``'s when it is the same).
        ``among``: the variants to choose from (default: every one).

        A head that must beat another chooses among that head's variant and the costlier ones only: a
        richer head reads at least the features the simpler one needed (reference CNN: the same plan
        as searching every variant, rules 13.7 -> 12.0 s)."""
        config = self.config
        variants = self.variants if among is None else {name: self.variants[name] for name in among}
        if beat is not None:
            names = list(variants)
            variants = {name: variants[name] for name in names[names.index(beat.exit.pooling):]}
        variant = select_variant(variants, self.targets, self.num_classes, fitter, self.precision,
                                 config.variant_held_out, config.variant_min_gain, fit_to)
        features = self.variants[variant]
        scores = out_of_fold_scores(fitter, features, fit_to, self.num_classes, config.cross_fit_folds)
        coverage = high_precision_coverage(scores, self.targets, self.precision)
        if beat is not None and coverage <= beat.coverage + config.variant_min_gain:
            return None
        rule = fitter.fit(features, fit_to, self.num_classes)
        guard, blocked = None, None
        if config.ood_guard is not None and beat is not None and beat.exit.pooling == variant:
            guard, blocked = beat.exit.guard, beat.guard_blocked  # fitted on the same features and classes
        elif config.ood_guard is not None:
            guard_fitter = GuardFitter(config.ood_guard, config.cross_fit_folds)
            guard = guard_fitter.fit(features, self.targets)
            blocked = guard_fitter.out_of_fold_distances_ > guard.threshold
        rule_flops = pooling_cost(self.cut.shape, variant) + rule.flops + 2 * self.num_classes + \
            (guard.flops if guard is not None else 0)
        exit_ = Exit(self.cut, self.column, variant, rule, np.full(self.num_classes, np.inf), rule_flops, guard)
        return _Fitted(exit_, scores, coverage, blocked)


def head_variants(cut: CutPoint, mlp: bool) -> list[str]:
    """The pooling variants a cut's heads may read, cheapest first: every variant where an MLP head may be
    fitted (``mlp``), else the probe's (:func:`probe_variants`)."""
    return variants_for(cut.shape, cut.sequence_mask, cut.summary_token, cut.tokens) if mlp else probe_variants(cut)


def probe_variants(cut: CutPoint) -> list[str]:
    """The pooling variants a cut's softmax probe chooses among: all but the 3x3 grid, which only heads with
    a hidden layer read.  Reference CNN, test split: a linear probe gains nothing from it (probes only at
    0.5%: 46.4% with it, 46.2% without), and the probes, grown stronger on it, tied the MLP heads at 0.5% in
    the plan-level check, which then keeps the probes (46.4% where the MLP heads on the 2x2 grid saved 53.4%)."""
    return [variant for variant in variants_for(cut.shape, cut.sequence_mask, cut.summary_token, cut.tokens)
            if "grid3" not in variant_pieces(variant)]


def _candidates(fitted: Sequence[_Fitted], config: PlannerConfig) -> Candidates:
    guards = None if config.ood_guard is None else GuardVerdicts(
        tuple(f.guard_blocked for f in fitted), tuple(np.zeros(len(f.scores), bool) for f in fitted))
    return Candidates([f.exit for f in fitted], [f.scores for f in fitted], guards)


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
