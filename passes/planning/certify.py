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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moco_compile.passes.planning.bounds import fixed_sequence
from moco_compile.passes.planning.config import Budget
from moco_compile.passes.planning.counts import Failures, PlanCounts


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
    that builds ``open_exits`` (see :func:`~moco_compile.passes.planning.routing.stage_costs`);
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
