"""Plan design: nested families of exit plans, built on the design rows only.

A plan is a ``[exits, classes]`` threshold matrix (``inf`` = class off).  A
family is a list of plans ordered from no exits to more and more rows leaving;
certification (:mod:`moco_compile.passes.planning.certify`) tests it in that order.

* ``"per-class"``: starting from no exits, repeatedly lower the one (cut, class)
  threshold that buys the most cost saved per extra design risk (rows that left
  earlier no longer available), so cheap early exits and precise classes are
  preferred where they pay;
* ``"per-cut"``: the same greedy with one threshold per cut for all its classes
  (a max-probability rule per exit: the early exits that are sure earlier get
  their own threshold, with a class's fewer degrees of freedom);
* ``"shared"``: one threshold on every open exit's log-probabilities, lowered
  step by step (a max-probability rule; one degree of freedom, so it
  generalises well from few rows);
* ``"patience"``: ``"shared"`` routed with agreement (PABEE-style patience of one, with a
  margin): past the first open exit a row leaves only when its top log-probability clears the
  threshold AND its top class is the one it had at the open exit before
  (:func:`~moco_compile.passes.planning.routing.route`'s ``agreement``;
  :func:`~moco_compile.passes.planning.config.routes_with_agreement` says which families are
  routed so, wherever their plans are counted);
* ``"shared-all"``: the same with every candidate exit open (the plain
  max-softmax early exit of BranchyNet / SDN): no exit set is chosen on the
  design rows, so it cannot overfit them, which matters when they are few.
  Beyond ``PlannerConfig.max_exits`` candidates (nested, an ONNX file cannot hold more),
  that many are opened, spread evenly over the compute, still without the rows.

No family opens an exit that cannot pay (:meth:`DesignProblem.payable`): one where a row
leaving costs more than the full network, its rule and overhead (``PlannerConfig.boundary_cost``
and ``exit_fixed_cost``) included; a late exit of a small network is one.

Which exits ``"shared"``, ``"patience"``, ``"per-cut"`` and ``"per-class"`` open is chosen by backward
elimination: starting from all, drop the exit whose removal lowers the design
cost most (at a fraction of the budget) while one does; opening an exit
charges its cost to every row reaching it, which a one-threshold-at-a-time
search could never pay for.  So that planning scales to deep models (47 candidate
cuts: 3 s per path, thousands of paths tried exhaustively), each round rebuilds the
path only without the few exits whose removal, thresholds kept, saves most
(priced for all exits in one routing), and the greedy families start from at most
``PlannerConfig.per_class_candidates`` exits chosen by the one-threshold elimination.

:func:`choose_family` picks one family without looking at the test rows: each
family is built on one half of the design rows and scored on the other, both
ways and repeatedly, at the disagreement the test split could certify; the
simplest family within one standard error of the best wins (the error of
repeated cross-validation corrected for its overlapping folds, Nadeau & Bengio
2003: without it a richer family won on noise and trailed the plain max-softmax
rule on small calibration sets).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from moco_compile.passes.planning.bounds import max_certifiable_failures
from moco_compile.passes.planning.config import Budget, PlannerConfig, routes_with_agreement
from moco_compile.passes.planning.counts import Split, count_plans
from moco_compile.passes.planning.routing import route, stage_costs

Plan = np.ndarray  # [exits, classes] thresholds
Path = list[tuple[Plan, float, float]]  # (plan, design cost, design risk) per step


@dataclass(frozen=True)
class DesignProblem:
    """What every family construction reads: design scores, costs, the budget and the config."""

    design: Split
    flops_before: np.ndarray  # per candidate exit
    exit_costs: np.ndarray  # planning cost of each exit per row reaching it (rule + boundary + fixed)
    total_flops: float
    budget: Budget
    config: PlannerConfig

    @classmethod
    def build(cls, design: Split, flops_before: np.ndarray, rule_flops: np.ndarray, cut_elements: np.ndarray,
              total_flops: float, budget: Budget, config: PlannerConfig) -> "DesignProblem":
        exit_costs = rule_flops + exit_overhead(cut_elements, config)
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

    def payable(self) -> np.ndarray:
        """Exits that could save anything: a row leaving there costs less than the full network.
        Decided from costs alone, without rows, so even ``"shared-all"`` leaves the others closed
        (an exit whose fixed cost exceeds the network after its cut only ever slows rows down)."""
        return self.flops_before + self.exit_costs < self.total_flops

    def costs(self, active: np.ndarray) -> np.ndarray:
        """Planning cost of leaving at each exit (last: full network) with ``active`` exits built."""
        return stage_costs(self.flops_before, np.where(active, self.exit_costs, 0.0), self.total_flops)


def build_family(name: str, problem: DesignProblem) -> list[Plan]:
    """The nested plans of family ``name`` on ``problem``'s design rows."""
    return build_families([name], problem)[name]


def build_families(names: Sequence[str], problem: DesignProblem) -> dict[str, list[Plan]]:
    """The nested plans of each family in ``names`` on ``problem``'s design rows.

    The greedy families (``"per-cut"``, ``"per-class"``) cost O(open exits) per step, so with more
    than ``PlannerConfig.per_class_candidates`` candidates their elimination starts from the exits
    the cheap one-threshold elimination keeps, that elimination continued down to the cap; the
    one-threshold elimination runs once for every family.
    """
    sorted_scores = [-np.sort(-s, axis=0) for s in problem.design.scores]
    payable = problem.payable()
    if not payable.any():
        closed = np.full((len(payable), problem.design.scores[0].shape[1]), np.inf, np.float32)
        return {name: [closed] for name in names}
    max_exits = problem.config.max_exits
    cap = min(problem.config.per_class_candidates, max_exits)
    capped = any(name in _GREEDY_PATHS for name in names) and payable.sum() > cap
    if "shared" in names or capped:
        shared_kept, shared_path = _eliminate(_shared_path, problem, sorted_scores, payable,
                                              keep_at_most=max_exits)
    if capped:
        greedy_start = _eliminate(_shared_path, problem, sorted_scores, shared_kept, keep_at_most=cap)[0]
    families = {}
    for name in names:
        if name == "shared-all":
            path = _shared_path(problem, sorted_scores, _spread_evenly(problem.flops_before, payable, max_exits))
        elif name == "shared":
            path = shared_path
        elif name == "patience":
            path = _eliminate(_patience_path, problem, sorted_scores, payable, keep_at_most=max_exits,
                              agreement=True)[1]
        elif name in _GREEDY_PATHS:
            path = _eliminate(_GREEDY_PATHS[name], problem, sorted_scores, greedy_start if capped else payable)[1]
        else:
            raise ValueError(f"unknown plan family {name!r}")
        families[name] = [plan for plan, _, _ in path]
    return families


def _spread_evenly(flops_before: np.ndarray, among: np.ndarray, count: int) -> np.ndarray:
    """The exits in ``among`` when there are at most ``count``, else ``count`` of them spread evenly over
    the compute before them (the first and the last kept): chosen without looking at any row."""
    if among.sum() <= count:
        return among.copy()
    indices = np.flatnonzero(among)
    before = flops_before[indices]
    chosen: set[int] = set()
    for target in np.linspace(before.min(), before.max(), count):  # nearest not chosen yet
        order = np.argsort(np.abs(before - target), kind="stable")
        chosen.add(int(next(k for k in order if k not in chosen)))
    active = np.zeros(len(flops_before), bool)
    active[indices[list(chosen)]] = True
    return active


def _eliminate(path_of: Callable[[DesignProblem, list[np.ndarray], np.ndarray], Path], problem: DesignProblem,
               sorted_scores: list[np.ndarray], active: np.ndarray,
               keep_at_most: int | None = None, agreement: bool = False) -> tuple[np.ndarray, Path]:
    """Backward elimination from ``active``: drop the exit whose removal lowers the design cost at
    ``elimination_risk_fraction`` of the budget most, while one does (and, down to ``keep_at_most``
    exits, the one whose removal raises it least); the kept exits and their path (``agreement``: the
    paths' plans are routed with it)."""
    risk = problem.config.elimination_risk_fraction * len(problem.design)
    active = active.copy()
    path = path_of(problem, sorted_scores, active)
    value = _cost_within(path, risk)
    while active.sum() > 1:
        trials = []
        for k in _removal_candidates(problem, path, active, risk, agreement):
            trial = active.copy()
            trial[k] = False
            trial_path = path_of(problem, sorted_scores, trial)
            trials.append((_cost_within(trial_path, risk), k, trial_path))
        trial_value, k, trial_path = min(trials, key=lambda t: t[:2])
        if trial_value >= value and (keep_at_most is None or active.sum() <= keep_at_most):
            break
        active[k], value, path = False, trial_value, trial_path
    return active, path


def _removal_candidates(problem: DesignProblem, path: Path, active: np.ndarray, risk: float,
                        agreement: bool = False) -> np.ndarray:
    """The exits backward elimination tries to drop this round: every open exit, or, beyond
    ``PlannerConfig.elimination_candidates`` of them, those whose removal lowers the design cost
    of the path's best plan within ``risk`` most with its other thresholds unchanged (one
    routing per exit instead of one path)."""
    open_ = np.flatnonzero(active)
    limit = problem.config.elimination_candidates
    if limit is None or len(open_) <= limit:
        return open_
    costs_without = _design_costs_without_each(problem, _cheapest_within(path, risk)[0], active, agreement)
    return open_[np.argsort(costs_without, kind="stable")[:limit]]


def _design_costs_without_each(problem: DesignProblem, plan: Plan, active: np.ndarray,
                               agreement: bool = False) -> np.ndarray:
    """For each open exit, the design cost of ``plan`` with that exit removed, in O(rows x exits)
    for all of them: rows that left there go on to the next open exit that fires for them, every
    other row reaching it saves its exit cost.  With ``agreement`` a removal also changes the next
    exit's predecessor, so each plan without one exit is routed anew (O(rows x exits^2))."""
    open_ = np.flatnonzero(active)
    margins = [s - t for s, t in zip(problem.design.scores, plan)]
    if agreement:
        costs = []
        for k in open_:
            kept = open_[open_ != k]
            trial = active.copy()
            trial[k] = False
            costs.append(route([margins[j] for j in kept], problem.costs(trial)[np.append(kept, -1)],
                               rows=len(problem.design), agreement=True).cost.sum())
        return np.array(costs)
    routing = route(margins, problem.costs(active))
    costs = []
    for k in open_:
        trial = active.copy()
        trial[k] = False
        at_k = routing.exit_index == k
        later = open_[open_ > k]
        moved = route([margins[j][at_k] for j in later], problem.costs(trial)[np.append(later, -1)],
                      rows=int(at_k.sum()))
        reaching = ~at_k & ((routing.exit_index < 0) | (routing.exit_index > k))
        costs.append(routing.cost[~at_k].sum() - problem.exit_costs[k] * reaching.sum() + moved.cost.sum())
    return np.array(costs)


def choose_family(problem: DesignProblem, test_rows: int, seed: int = 0,
                  among: Sequence[str] | None = None) -> tuple[str, dict[str, list[float]]]:
    """The simplest family (of ``among``, default ``PlannerConfig.families``) whose held-out saving is
    within one (corrected) standard error of the best's; and each family's held-out saving per fold
    (planning cost).

    Each family is built on one half of the design rows and scored on the other, both ways,
    ``PlannerConfig.family_cv_repeats`` times: its saving is that of its best plan within the
    disagreement a ``test_rows``-row test could certify.  Families are listed simplest first
    (``PlannerConfig.families``); a richer one is kept only when it beats the simpler ones by more
    than the noise of the folds, since on few design rows its extra choices mostly fit noise.
    The folds depend only on ``seed`` and the number of design rows, so two problems on the same
    rows (other candidate exits) are scored on the same folds.
    """
    config, budget = problem.config, problem.budget
    delta = config.family_delta(budget)
    allowed_rate = max(max_certifiable_failures(test_rows, budget.max_disagreement, delta), 0) / test_rows
    allowed_harm = None if budget.max_accuracy_drop is None else \
        max(max_certifiable_failures(test_rows, budget.max_accuracy_drop, delta), 0) / test_rows
    names = list(config.families if among is None else among)
    rng = np.random.default_rng(seed)
    saved: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(config.family_cv_repeats):
        half = rng.permutation(len(problem.design)) % 2 == 0
        for build_on in (half, ~half):
            on, held_out = problem.on(problem.design.take(build_on)), problem.design.take(~build_on)
            for name, family in build_families(names, on).items():
                saved[name].append(_best_within(family, held_out, problem, allowed_rate, allowed_harm,
                                                routes_with_agreement(name)))
    best = max(saved, key=lambda name: (np.mean(saved[name]), -names.index(name)))
    chosen = next(name for name in names  # the best always is within noise of itself
                  if within_noise(np.subtract(saved[best], saved[name]), config.family_choice_errors))
    return chosen, saved


def within_noise(gaps: np.ndarray, errors: float) -> bool:
    """Whether trailing the best family by ``gaps`` (one per fold of repeated 2-fold CV) is within
    ``errors`` standard errors.  The folds share rows, so the naive error (std / sqrt(folds)) is far
    too small; Nadeau & Bengio's correction adds held-out / fitting rows (1 for halves) to 1 / folds."""
    return gaps.mean() <= errors * gaps.std(ddof=1) * math.sqrt(1 / len(gaps) + 1)


def _best_within(family: list[Plan], rows: Split, problem: DesignProblem, allowed_rate: float,
                 allowed_harm: float | None, agreement: bool) -> float:
    """Highest saving (planning cost) on ``rows`` among plans whose disagreement there is within
    ``allowed_rate`` (and accuracy harm within ``allowed_harm``), routed with ``agreement`` or not;
    of a long family, only ``PlannerConfig.family_cv_plans`` plans evenly spaced along it are routed."""
    plans = problem.config.family_cv_plans
    if len(family) > plans:
        family = [family[round(i)] for i in np.linspace(0, len(family) - 1, plans)]
    counts = count_plans(family, rows, problem.config.rounding, agreement)
    best = 0.0
    for number, plan in enumerate(family):
        failures = counts.failures(number, problem.budget)
        if failures.disagreements > allowed_rate * len(rows):
            continue
        if allowed_harm is not None and failures.accuracy_harm > allowed_harm * len(rows):
            continue
        best = max(best, 1 - counts.mean_cost(number, problem.costs(np.isfinite(plan).any(axis=1))) / problem.total_flops)
    return best


def _per_class_path(problem: DesignProblem, sorted_scores: list[np.ndarray], active: np.ndarray) -> Path:
    """Greedy path over the ``active`` exits' (cut, class) thresholds."""
    return _greedy_path(problem, sorted_scores, active, _DesignState(problem, active))


def _per_cut_path(problem: DesignProblem, sorted_scores: list[np.ndarray], active: np.ndarray) -> Path:
    """Greedy path over the ``active`` exits' thresholds, one per cut on its top log-probability.

    One threshold for every class of a cut admits a row exactly when its top class clears it,
    with that class: the per-class greedy on scores masked to each row's top class, each cut's
    classes lowered together.
    """
    design = problem.design
    masked = [np.where(np.arange(s.shape[1])[None, :] == s.argmax(axis=1)[:, None], s, -np.inf).astype(s.dtype)
              for s in design.scores]
    masked_problem = problem.on(replace(design, scores=masked))
    sorted_top = [-np.sort(-s.max(axis=1))[:, None] for s in design.scores]
    return _greedy_path(problem, sorted_top, active, _DesignState(masked_problem, active))


def _greedy_path(problem: DesignProblem, sorted_columns: list[np.ndarray], active: np.ndarray,
                 state: "_DesignState") -> Path:
    """Starting from no exits, repeatedly lower the one threshold that buys the most cost saved per
    extra design risk.  ``sorted_columns[k]``: ``[rows, columns]`` scores of exit k, each column sorted
    high to low; one threshold per column (a column per class, or one for every class of the cut)."""
    rows, classes = problem.design.scores[0].shape
    columns = sorted_columns[0].shape[1]
    step = max(1, round(problem.config.step_fraction * rows))
    sizes = step * np.asarray(problem.config.step_multipliers)  # larger moves too: the next rows by score
    counts = np.zeros((len(active), columns), np.int64)         # may already leave earlier

    stacked = np.stack(sorted_columns)

    def plan_of(counts: np.ndarray) -> Plan:
        return np.broadcast_to(_thresholds(counts, stacked), (len(active), classes)).copy()

    path = [(plan_of(counts), state.total_cost, state.risk)]
    priced: dict[int, tuple] = {}  # exit -> (thresholds, saved, added risk), kept current as rows move
    while True:
        best = None
        for k in np.flatnonzero(active):
            admitted = np.minimum(counts[k][:, None] + sizes[None, :], rows)  # [columns, sizes]
            if k not in priced:
                grid = np.broadcast_to(_threshold_grid(sorted_columns[k], admitted), (classes, len(sizes)))
                saved, added_risk = state.deltas([k], grid[None])
                priced[k] = (grid, saved[0], added_risk[0])
            _, saved, added_risk = priced[k]
            if columns == 1:  # every class moves together
                saved, added_risk = saved.sum(axis=0, keepdims=True), added_risk.sum(axis=0, keepdims=True)
            ratio = np.where(added_risk <= 0, np.inf, saved / np.where(added_risk <= 0, 1.0, added_risk))
            ratio[(saved <= 0) | (counts[k] == rows)[:, None]] = -np.inf
            # the first of the highest (ratio, saved), in (column, size) order
            candidates = np.flatnonzero(ratio.ravel() == ratio.max())
            flat = candidates[np.argmax(saved.ravel()[candidates])]
            column, size = divmod(int(flat), len(sizes))
            priority = (ratio[column, size], saved[column, size])
            if priority[0] > -np.inf and (best is None or priority > best[0]):
                best = (priority, k, column, int(admitted[column, size]))
        if best is None:
            return path
        _, k, column, q = best
        counts[k, column] = q
        plan = plan_of(counts)
        before = state.snapshot()
        for cls in (range(classes) if columns == 1 else [column]):
            state.lower(k, cls, plan[k, cls])
        own = priced.get(k)
        moved = _reprice(state, priced, k, before)
        if columns > 1 and own is not None:  # one class moved: exit k's others keep their grids
            priced[k] = own
            _reprice_column(state, priced, k, column, _threshold_grid(
                sorted_columns[k][:, [column]], np.minimum(counts[k, column] + sizes, rows)[None, :])[0], before, moved)
        if state.risk > problem.risk_cap():
            return path
        path.append((plan, state.total_cost, state.risk))


def _reprice(state: "_DesignState", priced: dict[int, tuple], lowered: int, before: tuple) -> np.ndarray:
    """Bring ``priced`` up to date after exit ``lowered``'s thresholds were lowered from routes
    ``before``: that exit is priced anew, every other one only on the rows that moved (the sums are
    over rows, and only the moved rows' routes changed; the thresholds priced are unchanged).
    Returns which rows moved (exit or class), a mask."""
    priced.pop(lowered, None)
    moved = (before[0] != state.exit_index) | (before[1] != state.exit_class)
    _reprice_rows(state, priced, list(priced), np.flatnonzero(moved), before)
    return moved


def _reprice_column(state: "_DesignState", priced: dict[int, tuple], k: int, column: int, grid: np.ndarray,
                    before: tuple, moved: np.ndarray) -> None:
    """After exit ``k``'s class ``column`` alone was lowered from routes ``before`` (rows ``moved``, a mask):
    its other classes keep their threshold grids, repriced on the rows that moved or now leave ``k`` with a
    larger margin (which changes what another class of ``k`` would take from them); ``column`` has the grid
    ``grid`` (``[m]``) now, priced on every row."""
    _reprice_rows(state, priced, [k], np.flatnonzero(moved | (before[2] != state.margin)), before)
    saved, added = state.deltas([k], grid[None, None], classes=[column])
    grids, saved_all, added_all = (values.copy() for values in priced[k])
    grids[column], saved_all[column], added_all[column] = grid, saved[0, 0], added[0, 0]
    priced[k] = (grids, saved_all, added_all)


def _reprice_rows(state: "_DesignState", priced: dict[int, tuple], exits: list[int], rows: np.ndarray,
                  before: tuple) -> None:
    """Reprice ``exits`` (in ``priced``) on ``rows``, whose routes were ``before``: each price loses those
    rows' old terms and gains their new ones."""
    if not len(rows) or not exits:
        return
    grids = np.stack([priced[k][0] for k in exits])
    old_saved, old_added = state.deltas(exits, grids, rows, before)
    new_saved, new_added = state.deltas(exits, grids, rows)
    for i, k in enumerate(exits):
        grid, saved, added = priced[k]
        priced[k] = (grid, saved - old_saved[i] + new_saved[i], added - old_added[i] + new_added[i])


_GREEDY_PATHS = {"per-cut": _per_cut_path, "per-class": _per_class_path}


def _patience_path(problem: DesignProblem, sorted_scores: list[np.ndarray], active: np.ndarray) -> Path:
    """The shared-threshold path of the ``active`` exits, routed with agreement."""
    return _shared_path(problem, sorted_scores, active, agreement=True)


def _shared_path(problem: DesignProblem, sorted_scores: list[np.ndarray], active: np.ndarray,
                 agreement: bool = False) -> Path:
    """One threshold for every class of every ``active`` exit, lowered step by step.

    A row leaves at the first open exit whose top score is above the threshold, so as the
    threshold falls it moves to an earlier exit exactly when it passes that exit's top score
    and that score beats every earlier exit's.  Those moves, sorted by score, price every step
    of the path with one cumulative sum.  With ``agreement`` an exit past the first where the
    row's top class is not the one it had at the open exit before never admits it, whatever the
    threshold: its top score there counts as -inf.
    """
    rows, classes = problem.design.scores[0].shape
    open_ = np.flatnonzero(active)
    costs, row_risk = problem.costs(active), problem.row_risk(problem.design)
    top = np.stack([problem.design.scores[k].max(axis=1) for k in open_], axis=1)  # [rows, open exits]
    top_class = np.stack([problem.design.scores[k].argmax(axis=1) for k in open_], axis=1)
    if agreement:
        top[:, 1:] = np.where(top_class[:, 1:] == top_class[:, :-1], top[:, 1:], -np.inf)
    earlier_best = np.concatenate([np.full((rows, 1), -np.inf, top.dtype),
                                   np.maximum.accumulate(top, axis=1)[:, :-1]], axis=1)
    row, column = np.nonzero(top > earlier_best)  # (row, exit) pairs the row ever leaves at; row-major
    # the move into (row, column) comes from the row's next such exit, or from the full network
    last = np.append(row[1:] != row[:-1], True)
    source = np.where(last, -1, np.roll(column, -1))
    source_stage = np.where(source < 0, len(costs) - 1, open_[source])
    source_risk = np.where(source < 0, 0.0, row_risk[row, top_class[row, np.maximum(source, 0)]])
    cost_change = costs[open_[column]] - costs[source_stage]
    risk_change = row_risk[row, top_class[row, column]] - source_risk
    order = np.argsort(-top[row, column], kind="stable")
    move_scores = top[row, column][order]  # descending
    cost_after = rows * costs[-1] + np.concatenate([[0.0], np.cumsum(cost_change[order])])
    risk_after = np.concatenate([[0.0], np.cumsum(risk_change[order])])

    off = np.full((len(active), classes), np.inf, np.float32)
    path = [(off, float(cost_after[0]), 0.0)]
    best = -np.sort(-top[np.isfinite(top)])
    stride = max(1, round(problem.config.shared_step_fraction * len(best)))
    counts = np.arange(stride, len(best) + 1, stride)
    thresholds = _threshold_grid(best[:, None], counts[None, :])[0].astype(np.float32)
    now_moved = np.searchsorted(-move_scores, -thresholds, side="left")  # moves with score > each threshold
    over = np.flatnonzero(risk_after[now_moved] > problem.risk_cap())
    steps = over[0] if len(over) else len(counts)
    moved = 0
    for threshold, now in zip(thresholds[:steps], now_moved[:steps]):
        if now != moved:  # a plan that moves no design row adds only a test
            path.append((np.where(active[:, None], threshold, off), float(cost_after[now]), float(risk_after[now])))
            moved = now
    return path


def _cheapest_within(path: Path, risk: float) -> tuple[Plan, float, float]:
    """The step of a path with the lowest design cost among plans whose design risk is at most ``risk``."""
    return min((step for step in path if step[2] <= risk), key=lambda step: step[1])


def _cost_within(path: Path, risk: float) -> float:
    """Lowest design cost on a path among plans whose design risk is at most ``risk``."""
    return _cheapest_within(path, risk)[1]


def _threshold_grid(descending: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[classes, m]`` thresholds admitting the top ``counts[c, j]`` of column c of ``descending``
    (each column sorted high to low; inf where the count is 0)."""
    rows = len(descending)
    columns = np.arange(descending.shape[1])[:, None]
    above = descending[np.maximum(counts - 1, 0), columns]
    below = np.where(counts < rows, descending[np.minimum(counts, rows - 1), columns], descending[-1][:, None] - 1.0)
    return np.where(counts == 0, np.inf, ((above + below) / 2).astype(np.float64))


def _thresholds(counts: np.ndarray, sorted_scores: np.ndarray) -> Plan:
    """Per (cut, column) thresholds admitting the top ``counts[k, c]`` of ``sorted_scores[k, :, c]``
    (``[cuts, rows, columns]``, each column sorted high to low), as :func:`_threshold_grid` places them."""
    rows = sorted_scores.shape[1]
    cut, column = np.arange(len(counts))[:, None], np.arange(counts.shape[1])[None, :]
    above = sorted_scores[cut, np.maximum(counts - 1, 0), column]
    below = np.where(counts < rows, sorted_scores[cut, np.minimum(counts, rows - 1), column],
                     sorted_scores[cut, -1, column] - 1.0)
    return np.where(counts == 0, np.inf, (above + below) / 2).astype(np.float32)


class _DesignState:
    """Where each design row exits under the current thresholds, what it costs and risks.

    Every row reaching an ``active`` exit pays that exit's planning cost.  ``deltas``
    prices lowering one threshold in O(rows), so the greedy search can try every
    (cut, class) move at each step; it keeps each exit's prices and, after a move,
    reprices the other exits on the moved rows only (``_reprice``).
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

    def lower(self, k: int, cls: int, threshold: np.float32) -> None:
        """Lower threshold (k, cls) to ``threshold``, the only change since the last update: only
        rows reaching exit k whose margin for ``cls`` there becomes positive (or beats the margin
        they leave k with) move, to k with class ``cls``.  O(rows), where ``update`` routes anew."""
        margin = self.scores[k][:, cls] - np.float32(threshold)
        waiting = (self.exit_index < 0) | (self.exit_index > k)
        at_k = self.exit_index == k
        moved = (waiting & (margin > 0)) | (at_k & (self.exit_class != cls) & (margin > self.margin))
        raised = at_k & (self.exit_class == cls)
        self.margin[raised] = margin[raised]
        self.exit_index[moved], self.exit_class[moved], self.margin[moved] = k, cls, margin[moved]
        self.cost[moved] = self.costs[k]
        self.current_risk[moved] = self.row_risk[moved, cls]
        self.risk = float(self.current_risk.sum())
        self.total_cost = float(self.cost.sum())

    def snapshot(self) -> tuple[np.ndarray, ...]:
        """The routes as they are now, for :meth:`deltas` to price later: (exit, class, margin, cost,
        risk) per row."""
        return (self.exit_index.copy(), self.exit_class.copy(), self.margin.copy(), self.cost.copy(),
                self.current_risk.copy())

    def deltas(self, exits: Sequence[int], thresholds: np.ndarray, rows: np.ndarray | None = None,
               routes: tuple[np.ndarray, ...] | None = None,
               classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cost saved, risk added) on the design rows (only ``rows``, indices, when given), each
        ``[exits, classes, m]``: entry (i, c, j) if threshold (``exits[i]``, c) alone became
        ``thresholds[i, c, j]``; on the current routes, or on ``routes`` (a :meth:`snapshot`); for
        the ``classes`` given only (``thresholds`` then holds theirs).  Every exit in one call: after
        a move the greedy search reprices them all on the few rows that moved."""
        exit_index, exit_class, margin, cost, current_risk = routes if routes is not None else \
            (self.exit_index, self.exit_class, self.margin, self.cost, self.current_risk)
        exits = np.asarray(exits)
        rows = slice(None) if rows is None else rows
        labels = np.arange(self.scores[0].shape[1]) if classes is None else np.asarray(classes)
        columns = slice(None) if classes is None else labels
        scores = np.stack([self.scores[k][rows][:, columns] for k in exits])  # [exits, rows, classes]
        row_risk = self.row_risk[rows][:, columns]
        exit_index, exit_class, margin, cost, current_risk = (
            values[rows] for values in (exit_index, exit_class, margin, cost, current_risk))
        above = scores[..., None] - thresholds.astype(np.float32)[:, None]  # as the plan will hold them
        at_k = exit_index[None, :] == exits[:, None]
        waiting = (exit_index[None, :] < 0) | (exit_index[None, :] > exits[:, None])  # reach k, do not leave yet
        risk = row_risk - current_risk[:, None]
        # rows that would newly leave at k: they save what they cost now minus the cost of leaving at k
        newly = (above > 0) & waiting[:, :, None, None]
        saved = np.einsum("kncm,kn->kcm", newly, cost[None, :] - self.costs[exits][:, None])
        added = np.einsum("kncm,nc->kcm", newly, risk)
        # rows leaving at k with another class whose margin for this class would become larger
        other = labels[None, :] != exit_class[:, None]
        switched = (above > margin[None, :, None, None]) & (at_k[:, :, None] & other[None])[..., None]
        added += np.einsum("kncm,nc->kcm", switched, risk)
        return saved, added


def exit_overhead(elements: np.ndarray, config: PlannerConfig) -> np.ndarray:
    """Planning cost, per row reaching it, of each exit besides its rule, given its cut's ``elements``
    per row: ``boundary_cost`` per element plus ``exit_fixed_cost`` (see :class:`PlannerConfig`)."""
    return config.boundary_cost * np.asarray(elements, np.float64) + config.exit_fixed_cost


def cut_elements(shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """Elements per row of each cut tensor (what the boundary cost is charged per)."""
    return np.array([math.prod(shape[1:]) for shape in shapes], np.float64)
