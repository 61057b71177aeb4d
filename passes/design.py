"""Plan design: nested families of exit plans, built on the design rows only.

A plan is a ``[exits, classes]`` threshold matrix (``inf`` = class off).  A
family is a list of plans ordered from no exits to more and more rows leaving;
certification (:mod:`moco_compile.passes.certify`) tests it in that order.

* ``"per-class"``: starting from no exits, repeatedly lower the one (cut, class)
  threshold that buys the most cost saved per extra design risk (rows that left
  earlier no longer available), so cheap early exits and precise classes are
  preferred where they pay;
* ``"shared"``: one threshold on every open exit's log-probabilities, lowered
  step by step (a max-probability rule; one degree of freedom, so it
  generalises well from few rows).

Which exits a family opens is chosen by backward elimination: starting from
all, drop the exit whose removal lowers the design cost most (at a fraction of
the budget) while one does; opening an exit charges its cost to every row
reaching it, which a one-threshold-at-a-time search could never pay for.

:func:`choose_family` picks one family without looking at the test rows: each
family is built on one half of the design rows and scored on the other, both
ways, at the disagreement the test split could certify.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moco_compile.passes.bounds import max_certifiable_failures
from moco_compile.passes.certify import count_failures
from moco_compile.passes.config import Budget, PlannerConfig
from moco_compile.passes.routing import route, route_scores, stage_costs

if TYPE_CHECKING:  # plan.py holds the data types and imports this module
    from moco_compile.passes.plan import Split

Plan = np.ndarray  # [exits, classes] thresholds
Path = list[tuple[Plan, float, float]]  # (plan, design cost, design risk) per step


@dataclass(frozen=True)
class DesignProblem:
    """What every family construction reads: design scores, costs, the budget and the config."""

    design: Split
    flops_before: np.ndarray  # per candidate exit
    exit_costs: np.ndarray  # planning cost of each exit per row reaching it (rule + boundary)
    total_flops: float
    budget: Budget
    config: PlannerConfig

    @classmethod
    def build(cls, design: Split, flops_before: np.ndarray, rule_flops: np.ndarray, cut_elements: np.ndarray,
              total_flops: float, budget: Budget, config: PlannerConfig) -> "DesignProblem":
        exit_costs = rule_flops + config.boundary_cost * cut_elements
        return cls(design, flops_before, exit_costs, total_flops, budget, config)

    def on(self, design: Split) -> "DesignProblem":
        """The same problem on other design rows."""
        return DesignProblem(design, self.flops_before, self.exit_costs, self.total_flops, self.budget, self.config)

    def row_risk(self, split: Split) -> np.ndarray:
        """``[N, C]``: risk (in budgets) a row adds if it leaves with class c."""
        classes = split.scores[0].shape[1]
        wrong = (np.arange(classes)[None, :] != split.predictions[:, None]) / self.budget.max_disagreement
        if self.budget.max_accuracy_drop is not None:
            harmed = (split.predictions == split.labels)[:, None] & \
                (np.arange(classes)[None, :] != split.labels[:, None])
            wrong = wrong + harmed / self.budget.max_accuracy_drop
        return wrong

    def risk_cap(self) -> float:
        """Design risk (in budgets) at which a path stops growing."""
        return self.config.design_risk_factor * len(self.design) * (1 + (self.budget.max_accuracy_drop is not None))

    def costs(self, active: np.ndarray) -> np.ndarray:
        """Planning cost of leaving at each exit (last: full network) with ``active`` exits built."""
        return stage_costs(self.flops_before, np.where(active, self.exit_costs, 0.0), self.total_flops)


def build_family(name: str, problem: DesignProblem) -> list[Plan]:
    """The nested plans of family ``name`` on ``problem``'s design rows."""
    path_of = _PATHS[name]
    sorted_scores = [-np.sort(-s, axis=0) for s in problem.design.scores]
    rows = len(problem.design)
    elimination_risk = problem.config.elimination_risk_fraction * rows
    active = np.ones(len(problem.flops_before), bool)
    path = path_of(problem, sorted_scores, active)
    value = _cost_within(path, elimination_risk)
    while active.sum() > 1:
        trials = []
        for k in np.flatnonzero(active):
            trial = active.copy()
            trial[k] = False
            trial_path = path_of(problem, sorted_scores, trial)
            trials.append((_cost_within(trial_path, elimination_risk), k, trial_path))
        trial_value, k, trial_path = min(trials, key=lambda t: t[:2])
        if trial_value >= value:
            break
        active[k], value, path = False, trial_value, trial_path
    return [plan for plan, _, _ in path]


def choose_family(problem: DesignProblem, test_rows: int, seed: int = 0) -> tuple[str, dict[str, float]]:
    """The family whose plans, built on one half of the design rows, save most on the other half
    at the disagreement a ``test_rows``-row test could certify; and each family's held-out
    saving (planning cost, mean over the two halves)."""
    config, budget = problem.config, problem.budget
    delta = config.family_delta(budget)
    allowed_rate = max(max_certifiable_failures(test_rows, budget.max_disagreement, delta), 0) / test_rows
    allowed_harm = None if budget.max_accuracy_drop is None else \
        max(max_certifiable_failures(test_rows, budget.max_accuracy_drop, delta), 0) / test_rows
    half = np.random.default_rng(seed).permutation(len(problem.design)) % 2 == 0
    scores: dict[str, float] = {}
    for name in config.families:
        saved = []
        for build_on in (half, ~half):
            family = build_family(name, problem.on(problem.design.take(build_on)))
            held_out = problem.design.take(~build_on)
            saved.append(_best_within(family, held_out, problem, allowed_rate, allowed_harm))
        scores[name] = float(np.mean(saved))
    return max(scores, key=lambda name: (scores[name], -config.families.index(name))), scores


def _best_within(family: list[Plan], rows: Split, problem: DesignProblem, allowed_rate: float,
                 allowed_harm: float | None) -> float:
    """Highest saving (planning cost) on ``rows`` among plans whose disagreement there is within
    ``allowed_rate`` (and accuracy harm within ``allowed_harm``)."""
    best = 0.0
    for plan in family:
        routing = route_scores(rows.scores, plan, problem.costs(np.isfinite(plan).any(axis=1)),
                               problem.config.rounding_tolerance, len(rows), rows.predictions)
        failures = count_failures(routing, rows, problem.budget)
        if failures.disagreements > allowed_rate * len(rows):
            continue
        if allowed_harm is not None and failures.accuracy_harm > allowed_harm * len(rows):
            continue
        best = max(best, 1 - routing.cost.mean() / problem.total_flops)
    return best


def _per_class_path(problem: DesignProblem, sorted_scores: list[np.ndarray], active: np.ndarray) -> Path:
    """Greedy path over the ``active`` exits' (cut, class) thresholds."""
    rows, classes = problem.design.scores[0].shape
    step = max(1, round(problem.config.step_fraction * rows))
    state = _DesignState(problem, active)
    counts = np.zeros((len(active), classes), np.int64)
    path = [(_thresholds(counts, sorted_scores), state.total_cost, state.risk)]
    while True:
        best = None
        for k in np.flatnonzero(active):
            for cls in range(classes):
                # larger moves too: the next rows by score may already leave earlier
                for size in (multiplier * step for multiplier in problem.config.step_multipliers):
                    q = min(counts[k, cls] + size, rows)
                    if q == counts[k, cls]:
                        break
                    saved, added_risk = state.delta(k, cls, _threshold(sorted_scores[k][:, cls], q))
                    if saved <= 0:
                        continue
                    priority = (np.inf, saved) if added_risk <= 0 else (saved / added_risk, saved)
                    if best is None or priority > best[0]:
                        best = (priority, k, cls, q)
        if best is None:
            return path
        _, k, cls, q = best
        counts[k, cls] = q
        thresholds = _thresholds(counts, sorted_scores)
        state.update(thresholds)
        if state.risk > problem.risk_cap():
            return path
        path.append((thresholds, state.total_cost, state.risk))


def _shared_path(problem: DesignProblem, sorted_scores: list[np.ndarray], active: np.ndarray) -> Path:
    """One threshold for every class of every ``active`` exit, lowered step by step."""
    classes = problem.design.scores[0].shape[1]
    state = _DesignState(problem, active)
    off = np.full((len(active), classes), np.inf, np.float32)
    path = [(off, state.total_cost, state.risk)]
    best = -np.sort(-np.concatenate([s[:, 0] for s, on in zip(sorted_scores, active) if on]))
    stride = max(1, round(problem.config.shared_step_fraction * len(best)))
    for count in range(stride, len(best) + 1, stride):
        thresholds = np.where(active[:, None], np.float32(_threshold(best, count)), off)
        admitted = state.exit_index.copy()
        state.update(thresholds)
        if state.risk > problem.risk_cap():
            break
        if not np.array_equal(admitted, state.exit_index):  # a plan that moves no design row adds only a test
            path.append((thresholds, state.total_cost, state.risk))
    return path


_PATHS: dict[str, Callable[[DesignProblem, list[np.ndarray], np.ndarray], Path]] = {
    "per-class": _per_class_path, "shared": _shared_path}


def _cost_within(path: Path, risk: float) -> float:
    """Lowest design cost on a path among plans whose design risk is at most ``risk``."""
    return min(cost for _, cost, plan_risk in path if plan_risk <= risk)


def _threshold(descending: np.ndarray, count: int) -> float:
    """Threshold between the ``count``-th and the next highest score (inf for count 0)."""
    if count == 0:
        return np.inf
    lower = descending[count] if count < len(descending) else descending[-1] - 1.0
    return float((descending[count - 1] + lower) / 2)


def _thresholds(counts: np.ndarray, sorted_scores: Sequence[np.ndarray]) -> Plan:
    """Per (cut, class) thresholds admitting the top ``counts[k, c]`` design scores."""
    return np.array([[_threshold(scores[:, cls], counts[k, cls]) for cls in range(counts.shape[1])]
                     for k, scores in enumerate(sorted_scores)], np.float32).reshape(counts.shape)


class _DesignState:
    """Where each design row exits under the current thresholds, what it costs and risks.

    Every row reaching an ``active`` exit pays that exit's planning cost.  ``delta``
    prices lowering one threshold in O(rows), so the greedy search can try every
    (cut, class) move at each step.
    """

    def __init__(self, problem: DesignProblem, active: np.ndarray) -> None:
        self.scores = problem.design.scores
        self.row_risk = problem.row_risk(problem.design)
        self.costs = problem.costs(active)
        self.update(np.full((len(self.scores), self.scores[0].shape[1]), np.inf, np.float32))

    def update(self, thresholds: Plan) -> None:
        margins = [s - t for s, t in zip(self.scores, thresholds)]
        routing = route(margins, self.costs)
        self.exit_index, self.exit_class, self.cost = routing.exit_index, routing.exit_class, routing.cost
        rows = np.arange(len(self.exit_index))
        exited = self.exit_index >= 0
        self.margin = np.full(len(rows), -np.inf)
        self.margin[exited] = np.stack(margins)[self.exit_index[exited], rows[exited], self.exit_class[exited]]
        self.current_risk = np.where(exited, self.row_risk[rows, np.maximum(self.exit_class, 0)], 0.0)
        self.risk = float(self.current_risk.sum())
        self.total_cost = float(self.cost.sum())

    def delta(self, k: int, cls: int, threshold: float) -> tuple[float, float]:
        """(cost saved, risk added) on the design rows if threshold (k, cls) became ``threshold``."""
        reach = (self.exit_index < 0) | (self.exit_index >= k)
        margin = self.scores[k][:, cls] - threshold
        at_k = self.exit_index == k
        newly = reach & ~at_k & (margin > 0)
        switched = at_k & (self.exit_class != cls) & (margin > self.margin)
        added_cost = (self.costs[k] - self.cost[newly]).sum()
        moved = newly | switched
        added_risk = (self.row_risk[moved, cls] - self.current_risk[moved]).sum()
        return float(-added_cost), float(added_risk)


def cut_elements(shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """Elements per row of each cut tensor (what the boundary cost is charged per)."""
    return np.array([math.prod(shape[1:]) for shape in shapes], np.float64)
