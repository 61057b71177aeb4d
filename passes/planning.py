"""From a calibration frame to a certified exit plan: split the rows, fit candidate exits, plan.

This is what ``compile`` runs between calibration and the rewrite, and what
benchmarks run on frames of many random calibration draws.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from moco_compile.errors import BudgetError, CalibrationDataError
from moco_compile.frame import ActivationFrame
from moco_compile.passes.calibrate import LABELS, PREDICTIONS, PROBABILITIES
from moco_compile.passes.candidates import Candidates, fit_candidates
from moco_compile.passes.config import Budget, PlannerConfig
from moco_compile.passes.cut_points import CutPoint
from moco_compile.passes.exit_confidence import MIN_ROWS, TemperatureFitter
from moco_compile.passes.plan import ExitPlan, ExitPlanner, NoPlanError, Split
from moco_compile.passes.routing import route_scores
from moco_compile.passes.splits import SPLITS, assign_splits, split_sizes


@dataclass
class Planning:
    """The plan, the split of every calibration row (index into ``SPLITS``), and how it was found
    (``candidates`` and ``planner`` are None when planning was skipped for too few rows)."""

    plan: ExitPlan
    split: np.ndarray
    candidates: Candidates | None
    planner: ExitPlanner | None


def plan_exits(frame: ActivationFrame, cuts: Sequence[CutPoint], num_classes: int, total_flops: float,
               budget: Budget, config: PlannerConfig = PlannerConfig(), seed: int = 0,
               allow_no_exit: bool = False) -> Planning:
    """Split ``frame``'s rows (seeded), fit candidate exits and certify a plan.

    Raises :class:`CalibrationDataError` when there are too few rows to certify
    anything and :class:`BudgetError` when no plan with exits is certified; with
    ``allow_no_exit`` both give the plan with no exits instead, its certificate saying why.
    """
    labels = frame[LABELS] if LABELS in frame else None
    if budget.max_accuracy_drop is not None and labels is None:
        raise CalibrationDataError("--max-accuracy-drop needs labels: add a 'labels' array to the calibration "
                                   "data, or drop --max-accuracy-drop")
    try:
        split = assign_splits(len(frame), seed, budget, config)
    except CalibrationDataError as error:
        if not allow_no_exit:
            raise
        return _no_exit(frame, total_flops, budget, config, seed, str(error))
    rows = {name: np.flatnonzero(split == i) for i, name in enumerate(SPLITS) if name != "report"}
    candidates = fit_candidates(frame, cuts, rows, num_classes, budget, config)
    predictions = frame[PREDICTIONS]

    def split_of(name: str) -> Split:
        return Split(candidates.scores[name], predictions[rows[name]], None if labels is None else labels[rows[name]],
                     None if candidates.guards is None else candidates.guards[name])

    planner = ExitPlanner(budget, config, seed)
    try:
        plan = planner.fit(candidates.exits, split_of("rules"), split_of("test"), total_flops)
    except NoPlanError as error:
        if not allow_no_exit:
            raise BudgetError(f"no exit plan can be certified ({error})") from error
        return _no_exit(frame, total_flops, budget, config, seed, str(error))
    if not plan.exits and not allow_no_exit:
        raise BudgetError(
            f"no exit plan meets --max-disagreement {budget.max_disagreement:g} at --confidence "
            f"{budget.confidence:g}: every plan with exits failed the test on {len(rows['test'])} held-out "
            "rows. Raise the budget, give more calibration rows, or pass --allow-no-exit to emit "
            "the unchanged graph")
    if PROBABILITIES in frame:
        plan = calibrate_confidence(plan, candidates, frame[PROBABILITIES][rows["rules"]])
    return Planning(plan, split, candidates, planner)


def calibrate_confidence(plan: ExitPlan, candidates: Candidates, probabilities: np.ndarray) -> ExitPlan:
    """``plan`` with each exit's confidence scale (:mod:`~moco_compile.passes.exit_confidence`) fitted on
    the rule-fitting rows that leave there under it (their cross-fitted scores and guard verdicts, as
    planning saw them; every fitting row's scores when fewer than ``MIN_ROWS`` leave there).
    ``probabilities``: the full model's, on the rule-fitting rows.  Routing is unchanged."""
    position = {candidate.cut.tensor: k for k, candidate in enumerate(candidates.exits)}
    chosen = [position[e.cut.tensor] for e in plan.exits]
    scores = [candidates.scores["rules"][k] for k in chosen]
    guard = None if candidates.guards is None else candidates.guards["rules"].at(chosen)
    routing = route_scores(scores, np.array([e.thresholds for e in plan.exits]), rows=len(probabilities),
                           guard=guard)
    fitter, exits = TemperatureFitter(), []
    for k, exit_ in enumerate(plan.exits):
        rows = routing.exit_index == k
        rows = rows if rows.sum() >= MIN_ROWS else np.ones_like(rows)
        log_probs = scores[k][rows]
        scale = fitter.fit(log_probs, log_probs - exit_.thresholds, probabilities[rows]) \
            if exit_.scores.normalize == "log_softmax" else None
        exits.append(replace(exit_, confidence_scale=scale))
    return replace(plan, exits=exits)


def _no_exit(frame: ActivationFrame, total_flops: float, budget: Budget, config: PlannerConfig, seed: int,
             reason: str) -> Planning:
    """The unchanged model as a plan: nothing is certified because nothing changes."""
    sizes = split_sizes(len(frame), budget, config)
    labels = np.repeat(np.arange(len(SPLITS)), [sizes[name] for name in SPLITS])
    certificate = {"certified": None, "reason": f"no exits: {reason}", "max_disagreement": budget.max_disagreement,
                   "max_accuracy_drop": budget.max_accuracy_drop, "confidence": budget.confidence}
    return Planning(ExitPlan([], total_flops, certificate), np.random.default_rng(seed).permutation(labels),
                    None, None)
