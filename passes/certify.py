"""Certification: a fixed-sequence test of one plan family on the test rows.

Plans are tested in family order (fixed on the design rows, before any test row
was seen) with exact binomial p-values for H0 "disagreement rate >= budget"
(and, when asked, "accuracy harm >= its budget": a plan passes only if both are
rejected).  Every plan rejected before the first failure is certified: with
probability >= ``1 - delta`` all their rates are within budget at once, so the
one that saves most on the test rows (in planning cost) is kept; one test covers
the whole plan, not each rule (Learn-then-Test, Angelopoulos et al. 2021).
Usually that is the last one, but not when its extra exits cost more than
they save on the test rows.

A row counts as a disagreement when its simulated class differs from the full
model's, or when float rounding in the shipped graph could send it out with
another class (``Routing.could_disagree``), so the certificate covers the graph
that is shipped, not only the simulation.  Out-of-distribution guards route the
test rows as they do in the graph (``Split.guard``, verdicts of the final guards).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moco_compile.passes.bounds import binomial_p_value, fixed_sequence
from moco_compile.passes.config import Budget
from moco_compile.passes.routing import Rounding, Routing, route_scores

if TYPE_CHECKING:  # plan.py holds the data types and imports this module
    from moco_compile.passes.plan import Split


@dataclass(frozen=True)
class Failures:
    """What a plan got wrong on some rows."""

    disagreements: int  # class differs from the full model's, or could under float rounding
    near_threshold: int  # of which: rows that disagree only under some rounding
    accuracy_harm: int | None  # right before, wrong after (None without labels or accuracy budget)

    def p_value(self, rows: int, budget: Budget) -> float:
        """p-value of "the plan breaks the budget" (the larger of the two tests')."""
        p_value = binomial_p_value(self.disagreements, rows, budget.max_disagreement)
        if self.accuracy_harm is not None:
            p_value = max(p_value, binomial_p_value(self.accuracy_harm, rows, budget.max_accuracy_drop))
        return p_value


def count_failures(routing: Routing, split: "Split", budget: Budget) -> Failures:
    """Disagreements and accuracy harm of a split routed with ``full_predictions``: every row
    whose class could differ from the full model's under float rounding counts."""
    could_disagree = routing.could_disagree
    certain = routing.predictions(split.predictions) != split.predictions
    harm = None
    if budget.max_accuracy_drop is not None:
        harm = int(((split.predictions == split.labels) & could_disagree).sum())
    return Failures(int(could_disagree.sum()), int((could_disagree & ~certain).sum()), harm)


@dataclass(frozen=True)
class CertifiedFamily:
    """Outcome of certifying one family: the index of the last certified plan and of the kept
    plan (-1: none, not even the plan with no exits), and per plan its test figures."""

    certified: int
    chosen: int
    p_values: list[float]
    failures: list[Failures]
    compute_reductions: list[float]
    accuracies: list[float | None]


def certify_family(family: list[np.ndarray], test: "Split", stage_costs_of, planning_costs_of, total_flops: float,
                   budget: Budget, delta: float, rounding: Rounding) -> CertifiedFamily:
    """Test ``family``'s plans in order on ``test`` at level ``delta``.

    ``stage_costs_of(open_exits)`` gives the FLOPs of leaving at each exit for a plan
    that builds ``open_exits`` (see :func:`~moco_compile.passes.routing.stage_costs`);
    ``planning_costs_of(open_exits)`` the same with the exit overhead the planner charges,
    which chooses among the certified plans.
    """
    p_values, failures, reductions, accuracies, planning_costs = [], [], [], [], []
    for plan in family:
        open_exits = np.isfinite(plan).any(axis=1)
        routing = route_scores(test.scores, plan, stage_costs_of(open_exits), rounding, len(test), test.predictions,
                               test.guard)
        planning_costs.append(float(planning_costs_of(open_exits)[routing.exit_index].mean()) if len(test) else 0.0)
        failed = count_failures(routing, test, budget)
        failures.append(failed)
        p_values.append(failed.p_value(len(test), budget))
        reductions.append(float(1 - routing.cost.mean() / total_flops) if len(test) else 0.0)
        accuracies.append(None if test.labels is None else
                          float((routing.predictions(test.predictions) == test.labels).mean()))
    certified = fixed_sequence(p_values, delta)
    chosen = min(range(certified + 1), key=lambda k: (planning_costs[k], -k)) if certified >= 0 else -1
    return CertifiedFamily(certified, chosen, p_values, failures, reductions, accuracies)
