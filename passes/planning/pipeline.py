"""From calibration rows to a certified exit plan: split the rows, fit candidate exits, plan.

This is what ``compile`` runs between calibration and the rewrite (and what benchmarks run
on frames of many random calibration draws), whether the rows are one frame in memory or
frame shards on a cluster (:class:`PlanningRows`).  Memory stays bounded by the design rows
whatever the row count:

1. split (:class:`~moco_compile.passes.planning.splits.RowSplit`): sizes from the row count, at most
   ``PlannerConfig.max_design_rows`` rules rows; labels drawn block by block;
2. read the rules rows into memory, fit the candidate exits there and design the plan
   families on their cross-fitted scores (:meth:`ExitPlanner.design`);
3. count what every plan of every family does on the test and report rows
   (:class:`RowCounter`, chunk by chunk; the rows may be counted shard by shard anywhere
   and the counts summed);
4. certify from the test counts (:meth:`ExitPlanner.certify`), report from the report
   counts (or the test counts, labelled so, when there is no report split).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from moco_compile.constants import LABELS, PREDICTIONS, PROBABILITIES, SPLIT_COLUMN
from moco_compile.errors import BudgetError, CalibrationDataError
from moco_compile.frame import ActivationFrame
from moco_compile.passes.calibration.exit_confidence import MIN_ROWS, TemperatureFitter
from moco_compile.passes.graph.cut_points import CutPoint
from moco_compile.passes.planning.candidates import Candidates, candidate_split, fit_candidates
from moco_compile.passes.planning.config import Budget, PlannerConfig, routes_with_agreement
from moco_compile.passes.planning.counts import PlanCounts, Split, count_plans
from moco_compile.passes.planning.design import within_noise
from moco_compile.passes.planning.planner import ExitPlanner, NoPlanError, RETRY_NOTE
from moco_compile.passes.planning.routing import Rounding, route_scores, stage_costs
from moco_compile.passes.planning.splits import RowSplit, SPLITS, check_split_sizes, min_test_rows, split_sizes
from moco_compile.passes.planning.types import Exit, ExitPlan, PlanEvaluation

PhaseTimer = Callable[[str], AbstractContextManager]  # phase name -> a context the phase runs in
COUNTED_SPLITS = ("test", "report")  # the splits counted over every row (the rules rows are read)
COUNT_CHUNK_ROWS = 16_384  # rows scored and routed at once while counting
Counts = dict[str, dict[str, PlanCounts]]  # split name -> family name -> counts of its plans


@dataclass(frozen=True)
class RowCounter:
    """Counts what each plan of ``families`` (thresholds over ``candidates``) does on the test and
    report rows of a frame chunk, the chunk's split labels drawn from ``split``.  Small and
    picklable: workers receive it and count their own rows."""

    candidates: list[Exit]
    families: dict[str, list[np.ndarray]]
    split: RowSplit
    rounding: Rounding

    def count(self, frame: ActivationFrame, start: int = 0, chunk_rows: int = COUNT_CHUNK_ROWS) -> Counts:
        """Counts of ``frame``'s rows, which are rows ``start``, ``start + 1``, ... of the split,
        ``chunk_rows`` rows in memory at a time."""
        total: Counts | None = None
        for offset in range(0, max(len(frame), 1), chunk_rows):
            part = frame[offset:offset + chunk_rows]
            labels = self.split.labels(start + offset, start + offset + len(part))
            counts = {name: self._count(part.take(np.flatnonzero(labels == SPLITS.index(name))))
                      for name in COUNTED_SPLITS}
            total = counts if total is None else add_counts(total, counts)
        return total

    def _count(self, frame: ActivationFrame) -> dict[str, PlanCounts]:
        rows = candidate_split(self.candidates, frame, self.rounding)
        return {name: count_plans(plans, rows, self.rounding, routes_with_agreement(name))
                for name, plans in self.families.items()}


def add_counts(first: Counts, second: Counts) -> Counts:
    """The counts of two disjoint sets of rows, summed."""
    return {split: {family: counts + second[split][family] for family, counts in families.items()}
            for split, families in first.items()}


class PlanningRows(Protocol):
    """Calibration rows as planning reads them: a row count, a few rows in memory, counts over all."""

    labelled: bool  # whether the rows have labels

    def __len__(self) -> int:
        """How many rows there are."""

    def read(self, positions: np.ndarray) -> ActivationFrame:
        """The rows at sorted ``positions``, in memory."""

    def count(self, counter: RowCounter) -> Counts:
        """``counter``'s counts summed over every row."""

    def kept_frame(self, split: RowSplit, first: int) -> ActivationFrame:
        """The rows a build keeps, with their split (column ``SPLIT_COLUMN``): at least the rules
        rows and the ``first`` rows (they verify the compiled graph), in row order."""


class FrameRows:
    """Rows of one frame (in memory or memory-mapped), counted in this process."""

    def __init__(self, frame: ActivationFrame) -> None:
        self.frame = frame
        self.labelled = LABELS in frame

    def __len__(self) -> int:
        return len(self.frame)

    def read(self, positions: np.ndarray) -> ActivationFrame:
        return self.frame.take(positions)

    def count(self, counter: RowCounter) -> Counts:
        return counter.count(self.frame)

    def kept_frame(self, split: RowSplit, first: int) -> ActivationFrame:
        """Every row (they are in memory already)."""
        return self.frame.with_column(SPLIT_COLUMN, split.labels(0, len(self)))


@dataclass
class Planning:
    """The plan, the split of the calibration rows, the plan's figures on the report rows (or the
    test rows when there is no report split: ``evaluated_on``), and how it was found
    (``candidates`` and ``planner`` are None when planning was skipped for too few rows)."""

    plan: ExitPlan
    row_split: RowSplit
    evaluation: PlanEvaluation
    evaluated_on: str
    candidates: Candidates | None
    planner: ExitPlanner | None

    @property
    def split(self) -> np.ndarray:
        """Every calibration row's split (index into ``SPLITS``; one label per row in memory)."""
        return self.row_split.labels(0, self.row_split.rows)


def untimed(name: str) -> AbstractContextManager:
    """The default :data:`PhaseTimer`: phases run as they are."""
    return nullcontext()


def plan_exits(frame: ActivationFrame, cuts: Sequence[CutPoint], num_classes: int, total_flops: float,
               budget: Budget, config: PlannerConfig = PlannerConfig(), seed: int = 0,
               allow_no_exit: bool = False) -> Planning:
    """:func:`plan_rows` of one frame's rows."""
    return plan_rows(FrameRows(frame), cuts, num_classes, total_flops, budget, config, seed, allow_no_exit)


def plan_rows(rows: PlanningRows, cuts: Sequence[CutPoint], num_classes: int, total_flops: float,
              budget: Budget, config: PlannerConfig = PlannerConfig(), seed: int = 0,
              allow_no_exit: bool = False, phase: PhaseTimer = untimed) -> Planning:
    """Split ``rows`` (seeded), fit candidate exits on the rules rows, design plan families there and
    certify one on the counts of the test rows.  ``phase(name)`` wraps each of the three phases
    (``rules``, ``design``, ``certification``), e.g. to time them.

    Raises :class:`CalibrationDataError` when there are too few rows to certify
    anything and :class:`BudgetError` when no plan with exits is certified; with
    ``allow_no_exit`` both give the plan with no exits instead, its certificate saying why.
    """
    if budget.max_accuracy_drop is not None and not rows.labelled:
        raise CalibrationDataError(f"--max-accuracy-drop needs labels: add a '{LABELS}' array to the calibration "
                                   "data, or drop --max-accuracy-drop")
    try:
        sizes = check_split_sizes(len(rows), budget, config)
    except CalibrationDataError as error:
        if not allow_no_exit:
            raise
        return _no_exit(rows, num_classes, total_flops, budget, config, seed, str(error))
    split = RowSplit.draw(len(rows), seed, sizes)
    with phase("rules"):
        design_frame = rows.read(split.positions("rules"))
        candidates = fit_candidates(design_frame, cuts, num_classes, budget, config)
    predictions, labels = design_frame[PREDICTIONS], design_frame[LABELS] if rows.labelled else None
    probabilities = design_frame[PROBABILITIES] if PROBABILITIES in design_frame else None
    del design_frame
    with phase("design"):
        options = _design(candidates, predictions, labels, sizes["test"], total_flops, budget, config, seed)
    if not any(designer.problem_.payable().any() for designer, _ in options):
        reason = _unpayable(config, total_flops)
        if not allow_no_exit:
            raise BudgetError(f"{reason}. Pass --allow-no-exit to emit the unchanged graph")
        return _no_exit(rows, num_classes, total_flops, budget, config, seed, reason)
    try:
        with phase("certification"):
            plan, planner, candidates, counts = _certified(options, rows, split, config)
    except NoPlanError as error:
        if not allow_no_exit:
            raise BudgetError(f"no exit plan can be certified ({error})") from error
        return _no_exit(rows, num_classes, total_flops, budget, config, seed, str(error))
    if not plan.exits:
        passed = max(result.certified for result in planner.certified_.values()) > 0
        failed = (f"the plans with exits that passed the test on {sizes['test']} held-out rows save no compute "
                  "there once their exits' cost is counted" if passed else
                  f"every plan with exits failed the test on {sizes['test']} held-out rows at --max-disagreement "
                  f"{budget.max_disagreement:g} and --confidence {budget.confidence:g}")
        if not allow_no_exit:
            raise BudgetError(
                f"no exit plan {'is worth building' if passed else 'meets the budget'}: {failed}. Note that "
                f"{RETRY_NOTE} (more rows certify smaller budgets). Or pass --allow-no-exit to emit the unchanged "
                "graph")
        plan = replace(plan, certificate={**plan.certificate, "note": f"no exits: {failed}; {RETRY_NOTE}"})
    if probabilities is not None:
        plan = calibrate_confidence(plan, candidates, probabilities)
    evaluated_on = _evaluated_on(split)
    return Planning(plan, split, planner.evaluation(counts[evaluated_on]), evaluated_on, candidates, planner)


def _design(candidates: Candidates, predictions: np.ndarray, labels: np.ndarray | None, test_rows: int,
            total_flops: float, budget: Budget, config: PlannerConfig, seed: int
            ) -> list[tuple[ExitPlanner, Candidates]]:
    """The head sets worth certifying, each with the planner that designed its families: one, or, when the
    design rows cannot tell the MLP heads from the softmax probes, both (the caller certifies each at half the
    error rate and keeps the one that saves more on the test rows).

    When some exit has an MLP head, the plan is designed on the softmax probes first, then the family they
    chose on the MLP heads, on the same folds.  The MLP heads alone go on when their held-out saving beats
    the probes' by more than twice the noise of the folds
    (:func:`~moco_compile.passes.planning.design.within_noise`, ``2 * family_choice_errors``), the probes
    alone when the heads save no more on average: an exit's head that admits more rows alone can still lose
    in a plan, where one threshold spans exits (the 6-block MiniLM's mixed heads saved 40.0% against the
    probes' 43.0%), and when the test rows are too few to certify even a perfect plan at half the error rate
    (reference CNN, 500 calibration rows, 299 test rows at 1%: both sets certified would leave no plan at all).
    Between the two the design rows are not to be trusted: the heads' pooling variant and
    the heads themselves were chosen on the rows their cross-fitted scores come from (mobilenet-v3 of the
    zoo: ahead by 3.4 pp, sd 2.5, on the design rows, 4 pp behind on the test rows).  Only the probes'
    family is tried on the MLP heads: designing every family twice took 35 s of a 66 s compile of the
    reference CNN."""
    def designed(option: Candidates, among: Sequence[str] | None = None) -> ExitPlanner:
        planner = ExitPlanner(budget, config, seed)
        planner.design(option.exits, Split(option.design_scores, predictions, labels, option.design_guard),
                       test_rows, total_flops, among)
        return planner

    if candidates.probes_only is None or not config.cross_validates_families:  # no folds: the per-cut choice stands
        return [(designed(candidates), candidates)]
    probes = designed(candidates.probes_only)
    family = next(iter(probes.families_))
    mlp = designed(candidates, among=(family,))
    gaps = np.subtract(mlp.family_savings_[family], probes.family_savings_[family])
    if not within_noise(gaps, 2 * config.family_choice_errors):
        return [(mlp, candidates)]
    if within_noise(gaps, 0.0) or test_rows < min_test_rows(budget, config, head_sets=2):
        return [(probes, candidates.probes_only)]
    return [(probes, candidates.probes_only), (mlp, candidates)]


def _certified(options: Sequence[tuple[ExitPlanner, Candidates]], rows: PlanningRows, split: RowSplit,
               config: PlannerConfig) -> tuple[ExitPlan, ExitPlanner, Candidates, Counts]:
    """The plan certified on the test rows for each head set, each at ``1 / len(options)`` of the error
    rate (Bonferroni: the one kept holds at the full confidence; ``tests/test_head_set_certification.py``
    simulates it, and catches each set certified at the full rate), and the one that saves most there
    (the first on a tie): its plan, planner, candidates and counts.  Raises :class:`NoPlanError` when
    none certifies."""
    results, errors = [], []
    for planner, candidates in options:
        counts = rows.count(RowCounter(candidates.exits, planner.families_, split, config.rounding))
        try:
            plan = planner.certify(counts["test"], head_sets=len(options))
        except NoPlanError as error:
            errors.append(error)
            continue
        results.append((plan, planner, candidates, counts))
    if not results:
        raise errors[0]
    best = max(range(len(results)), key=lambda i: (results[i][0].certificate["test_compute_reduction"], -i))
    return results[best]


def _unpayable(config: PlannerConfig, total_flops: float) -> str:
    """Why no exit can pay for itself, naming the serving batch and target the exits were priced for."""
    priced = "" if config.serving_batch is None else f" at batch {config.serving_batch} on {config.target}"
    advice = "" if config.serving_batch is None else (
        f"; each exit's fixed time per batch is shared by the batch's rows: serve larger batches "
        f"(--serving-batch above {config.serving_batch}) or compile for another target")
    return (f"no exit can pay for itself{priced}: on this network ({total_flops:,.0f} FLOPs per row) leaving at any "
            f"cut costs more than the full network once each exit's overhead is counted (at least "
            f"{config.exit_fixed_cost:,.0f} FLOP-equivalents per row reaching it, PlannerConfig.exit_fixed_cost: "
            f"its kernel launches{'' if config.target == 'cpu' else ' and host sync'}, paid per batch){advice}")


def _evaluated_on(split: RowSplit) -> str:
    """Where the plan's figures come from: the report rows, or the test rows when there are none."""
    return "report" if split.sizes["report"] else "test"


def calibrate_confidence(plan: ExitPlan, candidates: Candidates, probabilities: np.ndarray) -> ExitPlan:
    """``plan`` with each exit's confidence scale (:mod:`~moco_compile.passes.calibration.exit_confidence`) fitted on
    the rule-fitting rows that leave there under it (their cross-fitted scores and guard verdicts, as
    planning saw them; every fitting row's scores when fewer than ``MIN_ROWS`` leave there).
    ``probabilities``: the full model's, on the rule-fitting rows.  Routing is unchanged."""
    position = {candidate.cut.tensor: k for k, candidate in enumerate(candidates.exits)}
    chosen = [position[e.cut.tensor] for e in plan.exits]
    scores = [candidates.design_scores[k] for k in chosen]
    guard = None if candidates.design_guard is None else candidates.design_guard.at(chosen)
    routing = route_scores(scores, np.array([e.thresholds for e in plan.exits]), rows=len(probabilities),
                           guard=guard, agreement=plan.agreement)
    fitter, exits = TemperatureFitter(), []
    for k, exit_ in enumerate(plan.exits):
        rows = routing.exit_index == k
        rows = rows if rows.sum() >= MIN_ROWS else np.ones_like(rows)
        log_probs = scores[k][rows]
        scale = fitter.fit(log_probs, log_probs - exit_.thresholds, probabilities[rows]) \
            if exit_.scores.normalize == "log_softmax" else None
        exits.append(replace(exit_, confidence_scale=scale))
    return replace(plan, exits=exits)


def _no_exit(rows: PlanningRows, num_classes: int, total_flops: float, budget: Budget, config: PlannerConfig,
             seed: int, reason: str) -> Planning:
    """The unchanged model as a plan: nothing is certified because nothing changes."""
    split = RowSplit.draw(len(rows), seed, split_sizes(len(rows), budget, config))
    certificate = {"certified": None, "reason": f"no exits: {reason}", "max_disagreement": budget.max_disagreement,
                   "max_accuracy_drop": budget.max_accuracy_drop, "confidence": budget.confidence}
    no_exit = np.zeros((0, num_classes), np.float32)
    evaluated_on = _evaluated_on(split)
    counts = rows.count(RowCounter([], {"none": [no_exit]}, split, config.rounding))[evaluated_on]["none"]
    evaluation = PlanEvaluation.from_counts(counts, 0, np.zeros(0, np.int64), stage_costs(np.zeros(0), np.zeros(0),
                                                                                          total_flops), total_flops)
    return Planning(ExitPlan([], total_flops, certificate), split, evaluation, evaluated_on, None, None)
