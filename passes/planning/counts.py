"""What plans do on a set of rows, as counts that add up across shards.

:class:`Split` holds every candidate exit's scores on some rows with the full model's
predictions; :func:`count_plans` routes them through each plan (the one routing function,
:mod:`~moco_compile.passes.planning.routing`) and :func:`tally` counts the result as
:class:`PlanCounts`: per plan, rows leaving at each exit, failing rows, right rows.  Counts
of disjoint row sets add up, so rows can be counted shard by shard, anywhere, and merged.
Certification, design scoring, evaluation and reports all read these counts.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from moco_compile.passes.planning.bounds import binomial_p_value
from moco_compile.passes.planning.config import Budget
from moco_compile.passes.planning.routing import GuardVerdicts, Rounding, Routing, route_scores


@dataclass
class Split:
    """Scores of every candidate exit on a set of rows, with the full model's predictions (and,
    with out-of-distribution guards, their verdicts at every candidate exit)."""

    scores: list[np.ndarray]
    predictions: np.ndarray
    labels: np.ndarray | None = None
    guard: GuardVerdicts | None = None

    def __len__(self) -> int:
        return len(self.predictions)

    def take(self, rows: np.ndarray) -> "Split":
        """The rows selected by ``rows`` (a boolean mask or indices)."""
        return Split([s[rows] for s in self.scores], self.predictions[rows],
                     None if self.labels is None else self.labels[rows],
                     None if self.guard is None else self.guard.take(rows))

    def without_guard(self) -> "Split":
        """The same rows, each score of a row a guard sends on lowered so far that no threshold
        the design sets admits it (planning treats the guard as the graph does: such rows do not
        leave there); rows within rounding of a guard's threshold are left to certification."""
        if self.guard is None:
            return self
        scores = [np.where(blocked[:, None], GUARDED_SCORE, s) for s, blocked in zip(self.scores, self.guard.blocked)]
        return Split(scores, self.predictions, self.labels)


GUARDED_SCORE = np.float32(-1e30)  # finite: a threshold halfway to it stays finite (inf means "class off")



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


def count_plans(plans: Sequence[np.ndarray], rows: Split, rounding: Rounding, agreement: bool = False) -> PlanCounts:
    """Route ``rows`` through each plan (``[exits, classes]`` thresholds over ``rows``'s candidate
    exits; ``agreement``: routed with the agreement condition, as the family's plans are built, see
    :func:`~moco_compile.passes.planning.config.routes_with_agreement`) and count what it does there:
    the one counting function of certification, design scoring and reports, whether the rows are a
    whole split or one shard of it."""
    routings = [route_scores(rows.scores, plan, None, rounding, len(rows), rows.predictions, rows.guard, agreement)
                for plan in plans]
    return tally(routings, rows, len(rows.scores))


def tally(routings: Sequence[Routing], rows: Split, exits: int) -> PlanCounts:
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
