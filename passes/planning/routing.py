"""The one model of routing and cost: which exit a row takes, with which class, at what cost.

Design, certification, evaluation, reports and verification all call
:func:`route` (the shipped graph implements the same rule), so the plan that is
certified is the plan that is measured and built:

* a row leaves at the first exit where its largest margin ``score - threshold``
  is positive, with the class of that margin; otherwise it runs the full network;
* a row that leaves at exit ``k`` costs ``stage_costs[k]``, a row that runs the
  full network ``stage_costs[-1]`` (:func:`stage_costs` builds them);
* a row is *near a threshold* when float rounding could change its route: some
  exit it reaches has its largest margin within rounding of zero, or the exit it
  takes has a runner-up class within rounding of the winner.  The compiled graph
  computes margins in float32 in another order of operations, so these rows may
  route differently there: verification allows exactly them to differ, and
  certification counts every row that some such rounding could send out with a
  wrong class (``could_disagree``) against the budget.  How far rounding can move
  a margin is :class:`Rounding`'s job;
* with ``agreement`` (the ``"patience"`` family's rule: leave when two exits in a row agree), a
  row may leave at an open exit other than the first only with the class that was its
  best-margin class at the previous open exit, which it passed: that exit computed its margins
  already, so the graph only carries one class per row.  The first open exit has no
  predecessor and fires on its margins alone (it is the max-probability rule there, as in
  ``"shared"``; the elimination that chooses the open exits decides whether an early exit pays
  as a leaving point and as the first vote).  A row whose best class at either exit is tied
  within rounding (its runner-up within the tolerances of the winner) may agree or not in the
  graph: it is near a threshold when its margin could fire, and could disagree as for a tie;
* with an out-of-distribution guard (:mod:`~moco_compile.passes.calibration.guard`), a row the
  guard sends on at an exit cannot leave there, whatever its margins
  (:class:`GuardVerdicts`); a row within rounding of the guard's threshold may be
  sent on or not, and is near a threshold there when its margin could fire.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from moco_compile.passes.calibration.guard import OODGuard


@dataclass(frozen=True)
class Rounding:
    """How far float rounding in the shipped graph can move a margin ``log p_c - t``.

    If rounding moves every logit by at most ``d``, it moves ``log p_c`` by at most
    ``2 d (1 - p_c)`` (the derivative of log-softmax), and ``1 - p_c <= min(1, |log p_c|)``.
    So the bound is ``scale * min(1, |t|) + floor`` for a threshold ``t``: ``scale``
    (= ``2 d``) bounds the error of any log-probability, ``floor`` the float32 rounding of
    the log-softmax itself near ``log p = 0``; ``guard`` bounds the rounding of a guard's
    distance relative to its threshold.  A threshold near 0 (``p`` close to 1, the
    usual case for a 1% budget) thus gets a tolerance about ``|t|`` times smaller than a
    flat one: on a text reference a flat 1e-4 at ``t = -4e-4`` counted a fifth of the
    test failures as "could disagree".  Holds for log-probability scores only (every
    compiled exit's); ``Rounding()`` is exact arithmetic.
    """

    scale: float = 0.0
    floor: float = 0.0
    guard: float = 0.0  # relative bound on the rounding of an out-of-distribution guard's distance

    def of(self, thresholds: np.ndarray) -> np.ndarray:
        """Per threshold (any shape; ``inf`` = class off), the margin's rounding bound."""
        magnitude = np.where(np.isfinite(thresholds), np.abs(thresholds), 1.0)
        return self.scale * np.minimum(1.0, magnitude) + self.floor


@dataclass(frozen=True)
class GuardVerdicts:
    """Per exit (``[N]`` bool each): the rows an out-of-distribution guard sends on there, and the
    rows whose guard distance is within float rounding of its threshold (either may happen in the
    graph).  An exit without a guard has both all False."""

    blocked: tuple[np.ndarray, ...]
    near: tuple[np.ndarray, ...]

    def take(self, rows: np.ndarray) -> "GuardVerdicts":
        """The rows selected by ``rows`` (a boolean mask or indices)."""
        return GuardVerdicts(tuple(b[rows] for b in self.blocked), tuple(n[rows] for n in self.near))

    def at(self, exits: Sequence[int]) -> "GuardVerdicts":
        """The verdicts of the exits ``exits``, in that order."""
        return GuardVerdicts(tuple(self.blocked[k] for k in exits), tuple(self.near[k] for k in exits))


@dataclass(frozen=True)
class Routing:
    """Where each row goes: exit index and class (-1: full network), its cost, whether float
    rounding could change that, and (given the full model's predictions) whether the row's class
    could differ from the full model's under some rounding; ``guard``: the out-of-distribution
    guards' verdicts at every exit it routed through (None: no guard)."""

    exit_index: np.ndarray
    exit_class: np.ndarray
    cost: np.ndarray
    near_threshold: np.ndarray
    could_disagree: np.ndarray | None = None
    guard: GuardVerdicts | None = None

    def take(self, rows: np.ndarray) -> "Routing":
        """The rows selected by ``rows`` (a boolean mask or indices)."""
        return Routing(self.exit_index[rows], self.exit_class[rows], self.cost[rows], self.near_threshold[rows],
                       None if self.could_disagree is None else self.could_disagree[rows],
                       None if self.guard is None else self.guard.take(rows))

    def predictions(self, full_predictions: np.ndarray) -> np.ndarray:
        """The compiled model's class per row: the exit's class, or the full model's."""
        return np.where(self.exit_index >= 0, self.exit_class, full_predictions)


def stage_costs(flops_before: np.ndarray, exit_costs: np.ndarray, total_flops: float) -> np.ndarray:
    """``[m + 1]`` cost of a row leaving at each of ``m`` exits (last: the full network).

    A row pays the network up to its exit plus every exit it reached (``exit_costs``:
    the rules' FLOPs, or a planning cost that also prices the exit's overhead; 0 for
    an exit that is not built).
    """
    paid = np.cumsum(exit_costs, dtype=np.float64)
    return np.append(np.asarray(flops_before, np.float64) + paid, total_flops + (paid[-1] if len(paid) else 0.0))


def route(margins: Sequence[np.ndarray], costs: np.ndarray | None = None, tolerance: float | np.ndarray = 0.0,
          rows: int | None = None, full_predictions: np.ndarray | None = None,
          guard: GuardVerdicts | None = None, agreement: bool = False) -> Routing:
    """Route rows given ``margins[k]`` (``[N, C]``, ``score - threshold``) at each exit in order.

    ``costs`` (from :func:`stage_costs`) prices each row; without it every cost is 0.
    ``rows`` is only needed when there are no exits.  ``tolerance`` bounds how far
    rounding can move each margin: one number, or ``[m, C]`` per (exit, class).  With
    ``full_predictions``, ``could_disagree`` marks rows that such rounding could send
    out with another class than the full model's (the routes a row can take: at each
    exit it certainly leaves, certainly continues, or, within tolerance, either).  ``guard``:
    which rows an out-of-distribution guard sends on at each exit (they never leave there).
    ``agreement``: past the first exit, a row leaves only with the best-margin class it had at the
    exit before (see the module's docstring).
    """
    rows = len(margins[0]) if len(margins) else (rows or 0)
    exit_index = np.full(rows, -1, np.int64)
    exit_class = np.full(rows, -1, np.int64)
    near = np.zeros(rows, bool)
    remaining = np.ones(rows, bool)
    reachable = np.ones(rows, bool)  # under some rounding
    could_disagree = np.zeros(rows, bool)
    previous_best = previous_tied = None  # each row's best class at the exit before, and whether it was tied
    tolerance = np.asarray(tolerance, np.float64)
    row_index = np.arange(rows)
    for position, margin in enumerate(margins):
        tolerances = np.broadcast_to(tolerance[position] if tolerance.ndim == 2 else tolerance, margin.shape[1:])
        others = np.where(np.isneginf(margin), np.finfo(np.float32).min, margin)  # classes switched off
        best = others.argmax(axis=1)
        top = others[row_index, best]
        others[row_index, best] = -np.inf
        runner_up = others.argmax(axis=1)  # best itself when there is one class: never tied
        second = others[row_index, runner_up]
        slack = tolerances[best]
        tied = top - second <= slack + tolerances[runner_up]
        blocked, unsure = (guard.blocked[position], guard.near[position]) if guard is not None \
            else (np.False_, np.False_)
        turned_away = blocked & ~unsure  # under any rounding
        if agreement and position:  # the class must be the one the row had at the exit before
            disagrees, either_tied = best != previous_best, previous_tied | tied
            turned_away = turned_away | (disagrees & ~either_tied)
            blocked, unsure = blocked | disagrees, (unsure | either_tied) & ~turned_away
        fired = remaining & (top > 0) & ~blocked
        near |= remaining & (np.abs(top) <= slack) & ~turned_away
        near |= remaining & unsure & (top > -slack)
        near |= fired & tied
        if full_predictions is not None:
            could_disagree |= reachable & ~turned_away & (top > -slack) & ((best != full_predictions) | tied)
            reachable &= (top <= slack) | blocked | unsure
        previous_best, previous_tied = best, tied
        exit_index[fired] = position
        exit_class[fired] = best[fired]
        remaining &= ~fired
    cost = np.zeros(rows) if costs is None else np.asarray(costs, np.float64)[exit_index]
    return Routing(exit_index, exit_class, cost, near, None if full_predictions is None else could_disagree,
                   guard)


def route_scores(scores: Sequence[np.ndarray], thresholds: np.ndarray, costs: np.ndarray | None = None,
                 rounding: Rounding = Rounding(), rows: int | None = None,
                 full_predictions: np.ndarray | None = None, guard: GuardVerdicts | None = None,
                 agreement: bool = False) -> Routing:
    """:func:`route` for per-exit log-probability ``scores`` and a ``[m, C]`` threshold matrix
    (``inf`` = class off), with the margin tolerances ``rounding`` gives those thresholds
    (``guard``: the guard's verdicts at each of the ``m`` exits; ``agreement``: :func:`route`'s).

    Exits with every class off never fire and no rounding can make them: only the others are
    routed (plans that open a few of many candidate exits route in proportion to those few;
    with ``agreement``, an exit's predecessor is the open exit before it).
    """
    thresholds = np.asarray(thresholds)
    open_ = np.flatnonzero(np.isfinite(thresholds).any(axis=1)) if thresholds.size else np.zeros(0, np.int64)
    if len(open_) == len(thresholds):
        return route([s - t for s, t in zip(scores, thresholds)], costs, rounding.of(thresholds), rows,
                     full_predictions, guard, agreement)
    rows = len(scores[0]) if len(scores) else rows
    open_costs = None if costs is None else np.append(np.asarray(costs)[open_], np.asarray(costs)[-1])
    routing = route([scores[k] - thresholds[k] for k in open_], open_costs, rounding.of(thresholds[open_]), rows,
                    full_predictions, None if guard is None else guard.at(open_), agreement)
    exit_index = np.where(routing.exit_index >= 0, open_[np.maximum(routing.exit_index, 0)], -1) \
        if len(open_) else routing.exit_index
    return replace(routing, exit_index=exit_index, guard=guard)


def guard_verdicts(guards: Sequence[OODGuard | None], features: Sequence[np.ndarray], rows: int,
                   rounding: Rounding = Rounding()) -> GuardVerdicts | None:
    """The verdicts of each exit's guard (``None``: unguarded) on ``rows`` rows given their pooled
    features per exit; ``None`` when no exit is guarded."""
    if all(guard is None for guard in guards):
        return None
    none = np.zeros(rows, bool)
    verdicts = [(none, none) if guard is None else guard.verdicts(f, rounding.guard)
                for guard, f in zip(guards, features)]
    return GuardVerdicts(tuple(b for b, _ in verdicts), tuple(n for _, n in verdicts))
