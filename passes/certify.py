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
that is shipped, not only the simulation.

Everything certification reads is a count (:class:`PlanCounts`): per plan, rows
leaving at each exit, failing rows, right rows.  Counts of disjoint row sets add
up, so the test rows can be counted shard by shard, anywhere, and merged: a few
integers per plan whatever the row count.  :func:`count_plans` is the one
counting function; the single-process path counts its test rows as one shard.
Out-of-distribution guards route the rows as they do in the graph (``Split.guard``:
the verdicts of the final guards on the test rows).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
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


@dataclass(frozen=True)
class PlanCounts:
    """What each of a list of plans does on some rows, as counts: sums over rows, so counts of
    disjoint row sets (shards) add up (``+``) to the counts of their union, exactly, in any order.

    Per plan (leading axis): rows leaving at each candidate exit (``exits[:, k]``; last column:
    the full network), rows whose class could differ from the full model's under float rounding
    (``could_disagree``; of which ``near_threshold`` only under some rounding), rows whose
    simulated class differs (``changed``); with labels, rows right after (``correct_after``) and
    rows right before that could be wrong after (``harm``), and once, rows right before.
    A row's cost is its exit's stage cost, so every cost figure is ``exits @ stage costs``.
    """

    rows: int
    exits: np.ndarray
    could_disagree: np.ndarray
    near_threshold: np.ndarray
    changed: np.ndarray
    correct_before: int | None = None
    correct_after: np.ndarray | None = None
    harm: np.ndarray | None = None

    def __add__(self, other: "PlanCounts") -> "PlanCounts":
        if self.exits.shape != other.exits.shape or (self.correct_before is None) != (other.correct_before is None):
            raise ValueError(f"cannot add counts of {self.exits.shape} plans x exits "
                             f"({'with' if self.correct_before is not None else 'without'} labels) to "
                             f"{other.exits.shape} ({'with' if other.correct_before is not None else 'without'})")
        return PlanCounts(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)
                             + getattr(other, f.name) for f in fields(self)})

    def failures(self, plan: int, budget: Budget) -> Failures:
        """Plan ``plan``'s failures against ``budget`` (accuracy harm only under an accuracy budget)."""
        harm = None if budget.max_accuracy_drop is None else int(self.harm[plan])
        return Failures(int(self.could_disagree[plan]), int(self.near_threshold[plan]), harm)

    def mean_cost(self, plan: int, costs: np.ndarray) -> float:
        """Mean over rows of plan ``plan``'s per-exit ``costs`` (``[exits + 1]``, last: full network)."""
        return float(self.exits[plan] @ costs / self.rows) if self.rows else 0.0


def count_plans(plans: Sequence[np.ndarray], rows: "Split", rounding: Rounding) -> PlanCounts:
    """Route ``rows`` through each plan (``[exits, classes]`` thresholds over ``rows``'s candidate
    exits) and count what it does there: the one counting function of certification, design
    scoring and reports, whether the rows are a whole split or one shard of it."""
    routings = [route_scores(rows.scores, plan, None, rounding, len(rows), rows.predictions, rows.guard)
                for plan in plans]
    return tally(routings, rows, len(rows.scores))


def tally(routings: Sequence[Routing], rows: "Split", exits: int) -> PlanCounts:
    """:class:`PlanCounts` of ``rows`` routed once per plan (``routings``, with ``could_disagree``)
    through plans over ``exits`` candidate exits."""
    predictions, labels = rows.predictions, rows.labels
    counts = {name: [] for name in ("exits", "could_disagree", "near_threshold", "changed", "correct_after", "harm")}
    for routing in routings:
        compiled = routing.predictions(predictions)
        certain = compiled != predictions
        counts["exits"].append(np.bincount(np.where(routing.exit_index < 0, exits, routing.exit_index),
                                           minlength=exits + 1))
        counts["could_disagree"].append(routing.could_disagree.sum())
        counts["near_threshold"].append((routing.could_disagree & ~certain).sum())
        counts["changed"].append(certain.sum())
        if labels is not None:
            counts["correct_after"].append((compiled == labels).sum())
            counts["harm"].append(((predictions == labels) & routing.could_disagree).sum())
    arrays = {name: np.array(values, np.int64).reshape(len(routings), *([exits + 1] if name == "exits" else []))
              for name, values in counts.items() if labels is not None or name not in ("correct_after", "harm")}
    return PlanCounts(len(predictions), correct_before=None if labels is None else int((predictions == labels).sum()),
                      **arrays)


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


CostsOf = Callable[[np.ndarray], np.ndarray]  # open exits -> cost of leaving at each exit (last: full network)


def certify_family(family: list[np.ndarray], test: PlanCounts, stage_costs_of: CostsOf, planning_costs_of: CostsOf,
                   total_flops: float, budget: Budget, delta: float) -> CertifiedFamily:
    """Test ``family``'s plans in order at level ``delta``, from their counts on the test rows
    (:func:`count_plans`, summed over shards).

    ``stage_costs_of(open_exits)`` gives the FLOPs of leaving at each exit for a plan
    that builds ``open_exits`` (see :func:`~moco_compile.passes.routing.stage_costs`);
    ``planning_costs_of(open_exits)`` the same with the exit overhead the planner charges,
    which chooses among the certified plans.
    """
    p_values, failures, reductions, accuracies, planning_costs = [], [], [], [], []
    for number, plan in enumerate(family):
        open_exits = np.isfinite(plan).any(axis=1)
        planning_costs.append(test.mean_cost(number, planning_costs_of(open_exits)))
        failed = test.failures(number, budget)
        failures.append(failed)
        p_values.append(failed.p_value(test.rows, budget))
        reductions.append(1 - test.mean_cost(number, stage_costs_of(open_exits)) / total_flops if test.rows else 0.0)
        accuracies.append(None if test.correct_after is None else float(test.correct_after[number] / test.rows))
    certified = fixed_sequence(p_values, delta)
    chosen = min(range(certified + 1), key=lambda k: (planning_costs[k], -k)) if certified >= 0 else -1
    return CertifiedFamily(certified, chosen, p_values, failures, reductions, accuracies)
