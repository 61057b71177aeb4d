"""Exit planning: which cuts get an exit, and each class's threshold there.

A plan is judged as a whole.  Rows leave at the first exit where some class's
margin ``score - threshold`` is positive, taking the class with the largest
margin.  The planner

1. builds a nested family of plans on a *design* split: starting from no exits,
   it repeatedly lowers the one (cut, class) threshold that buys the most FLOPs
   saved per extra disagreement with the full model (rule cost included, rows
   that left earlier no longer available), so cheap early exits and precise
   classes are preferred where they pay;
2. certifies a plan on a separate *test* split with Learn-then-Test style
   fixed-sequence testing: plans are tested in family order with exact
   binomial p-values for H0 "disagreement rate >= budget"; the last plan
   rejected before the first failure is kept.  With probability >= confidence
   the kept plan's disagreement rate (and, when asked, its accuracy harm) is
   within budget.  One test covers the whole plan, not each rule.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from moco_compile.passes.bounds import binomial_p_value, clopper_pearson_upper
from moco_compile.passes.cut_points import CutPoint
from moco_compile.passes.rules import LinearScores


@dataclass
class Exit:
    """One exit: linear scores on a cut's pooled features and per-class thresholds (inf = off)."""

    cut: CutPoint
    column: str
    pooling: str
    scores: LinearScores
    thresholds: np.ndarray
    rule_flops: float

    def margins(self, features: np.ndarray) -> np.ndarray:
        """``[N, C]`` margins; a row exits here when its largest margin is positive."""
        return self.scores(features) - self.thresholds

    def to_dict(self) -> dict:
        return {"cut": self.cut.tensor, "module": self.cut.module, "column": self.column,
                "pooling": self.pooling,
                "shape": list(self.cut.shape), "flops_before": self.cut.flops_before,
                "flops_after": self.cut.flops_after, "rule_flops": self.rule_flops,
                "weight": self.scores.weight.tolist(), "bias": self.scores.bias.tolist(),
                "normalize": self.scores.normalize,
                "thresholds": [None if not np.isfinite(t) else float(t) for t in self.thresholds]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Exit":
        cut = CutPoint(data["cut"], data["module"], tuple(data["shape"]), data["flops_before"],
                       data["flops_after"])
        scores = LinearScores(np.asarray(data["weight"], np.float32), np.asarray(data["bias"], np.float32),
                              data.get("normalize", "none"))
        thresholds = np.asarray([np.inf if t is None else t for t in data["thresholds"]], np.float32)
        return cls(cut, data["column"], data["pooling"], scores, thresholds, data["rule_flops"])


def route(margins: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Exit index (-1: none) and exit class (-1: none) of each row, given margins per exit."""
    rows = len(margins[0]) if margins else 0
    exit_index = np.full(rows, -1, np.int64)
    exit_class = np.full(rows, -1, np.int64)
    remaining = np.ones(rows, bool)
    for position, margin in enumerate(margins):
        best = margin.argmax(axis=1)
        fired = remaining & (margin[np.arange(rows), best] > 0)
        exit_index[fired] = position
        exit_class[fired] = best[fired]
        remaining &= ~fired
    return exit_index, exit_class


@dataclass
class PlanEvaluation:
    """What a plan does on a set of rows."""

    exit_index: np.ndarray
    compiled_predictions: np.ndarray
    compute_reduction: float
    exit_rates: list[float]
    disagreement: float
    disagreement_among_exited: float
    accuracy_before: float | None
    accuracy_after: float | None

    def to_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items()
                if key not in ("exit_index", "compiled_predictions")}


@dataclass
class ExitPlan:
    """The exits to build, in graph order, and the certificate that justified them."""

    exits: list[Exit]
    total_flops: float
    certificate: dict = field(default_factory=dict)

    def row_flops(self, exit_index: np.ndarray) -> np.ndarray:
        """FLOPs each row costs in the compiled graph, rules included."""
        rule_cost = np.cumsum([e.rule_flops for e in self.exits]) if self.exits else np.zeros(0)
        before = np.array([e.cut.flops_before for e in self.exits] + [self.total_flops])
        paid_rules = np.append(rule_cost, rule_cost[-1] if len(rule_cost) else 0.0)
        return (before + paid_rules)[exit_index]  # index -1 selects the full-network entry

    def evaluate(self, features: Sequence[np.ndarray], predictions: np.ndarray,
                 labels: np.ndarray | None = None) -> PlanEvaluation:
        """Route rows given their pooled features per exit (in exit order) and the full model's predictions."""
        exit_index, exit_class = route([e.margins(f) for e, f in zip(self.exits, features)]) \
            if self.exits else (np.full(len(predictions), -1), np.full(len(predictions), -1))
        compiled = np.where(exit_index >= 0, exit_class, predictions)
        exited = exit_index >= 0
        rows = max(len(predictions), 1)
        return PlanEvaluation(
            exit_index=exit_index, compiled_predictions=compiled,
            compute_reduction=float(1 - self.row_flops(exit_index).mean() / self.total_flops) if len(predictions) else 0.0,
            exit_rates=[float((exit_index == k).sum() / rows) for k in range(len(self.exits))],
            disagreement=float((compiled != predictions).sum() / rows),
            disagreement_among_exited=float((compiled[exited] != predictions[exited]).mean()) if exited.any() else 0.0,
            accuracy_before=None if labels is None else float((predictions == labels).mean()),
            accuracy_after=None if labels is None else float((compiled == labels).mean()))

    def to_dict(self) -> dict:
        return {"total_flops": self.total_flops, "certificate": self.certificate,
                "exits": [e.to_dict() for e in self.exits]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ExitPlan":
        return cls([Exit.from_dict(e) for e in data["exits"]], data["total_flops"], data.get("certificate", {}))


@dataclass
class Split:
    """Scores of every candidate exit on a set of rows, with the full model's predictions."""

    scores: list[np.ndarray]
    predictions: np.ndarray
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.predictions)


_FAMILIES = ("per-class", "shared")


class _PlanningContext(NamedTuple):
    """What every path search over the design rows reads."""

    design: Split
    sorted_scores: list[np.ndarray]  # per exit, design scores sorted descending per class
    before: np.ndarray  # FLOPs before each exit
    exit_cost: np.ndarray  # planning cost of each exit per row reaching it
    total_flops: float


class NoPlanError(Exception):
    """No plan in the family passed the test; carries what the smallest plan measured."""


class ExitPlanner:
    """Choose exits and thresholds jointly under a certified global risk budget.

    Parameters
    ----------
    max_disagreement:
        Budget for the fraction of inputs whose class differs from the full model's.
    confidence:
        Probability with which the certified budget holds (1 - delta).
    max_accuracy_drop:
        Optional budget for the fraction of inputs the full model gets right and
        the compiled model gets wrong (needs labels on the test split).
    step_fraction:
        Threshold moves add this fraction of design rows to a rule (and 4x that).
    boundary_cost:
        Planning cost, in FLOP-equivalents per element of the cut tensor per row
        reaching an exit, of what an exit adds besides its rule's FLOPs: the copy
        of the continuing rows (Compress), layout reorders around the If boundary
        and the loss of fusions across it.  Measured with onnxruntime 1.32 on CPU
        (reference CNN, batch 64): an exit that no row takes costs about 100-200
        FLOP-equivalents per cut-tensor element.  It steers the plan away from
        exits that rarely fire; reported FLOPs never include it.
    design_risk_factor:
        The family grows until its design risk is this multiple of the budget.
    families:
        Which nested plan families to build: ``"per-class"`` (greedy over every
        (cut, class) threshold) and ``"shared"`` (one threshold for every class at
        every open exit, i.e. a max-score rule; meaningful for scores comparable
        across cuts, such as log-probabilities).  Each family is certified at
        ``(1 - confidence) / len(families)`` (Bonferroni), so the certified plan
        with the lowest test cost may be chosen and the budget still holds at
        ``confidence``.  The greedy family fits the design rows best; the shared
        one has one degree of freedom and often generalises better.
    """

    def __init__(self, max_disagreement: float = 0.01, confidence: float = 0.95,
                 max_accuracy_drop: float | None = None, step_fraction: float = 0.005,
                 design_risk_factor: float = 3.0, boundary_cost: float = 100.0,
                 families: Sequence[str] = ("per-class", "shared")) -> None:
        unknown = [f for f in families if f not in _FAMILIES]
        if not families or unknown:
            raise ValueError(f"families must be a non-empty subset of {_FAMILIES}, got {tuple(families)}")
        self.max_disagreement = max_disagreement
        self.confidence = confidence
        self.max_accuracy_drop = max_accuracy_drop
        self.step_fraction = step_fraction
        self.design_risk_factor = design_risk_factor
        self.boundary_cost = boundary_cost
        self.families = tuple(families)

    def fit(self, candidates: Sequence[Exit], design: Split, test: Split, total_flops: float) -> ExitPlan:
        """Return the certified plan (possibly with no exits if only that passes).

        ``candidates`` are exits with fitted scores (their thresholds are ignored);
        ``design`` and ``test`` hold each candidate's scores on those splits.
        """
        before = np.array([c.cut.flops_before for c in candidates])
        exit_cost = np.array([c.rule_flops + self.boundary_cost * math.prod(c.cut.shape[1:])
                              for c in candidates])
        rule_flops = np.array([c.rule_flops for c in candidates])
        sorted_scores = [-np.sort(-s, axis=0) for s in design.scores]
        context = _PlanningContext(design, sorted_scores, before, exit_cost, total_flops)
        paths = {"per-class": self._path, "shared": self._shared_path}
        delta = (1 - self.confidence) / len(self.families)
        certified, outcomes = [], {}
        for name in self.families:
            family = self._family(paths[name], context)
            try:
                chosen, certificate = self._certify(family, test, before, rule_flops, total_flops, delta)
            except NoPlanError:
                outcomes[name] = None
                continue
            certificate["family_size"] = len(family)
            outcomes[name] = certificate["test_compute_reduction"]
            certified.append((-outcomes[name], len(certified), name, chosen, certificate))
        if not certified:
            raise NoPlanError(f"even the plan with no exits fails the test on {len(test)} rows")
        _, _, name, thresholds, certificate = min(certified)
        certificate.update(family=name, families=outcomes, family_confidence=1 - delta)
        exits = [replace(candidate, thresholds=thresholds[k])
                 for k, candidate in enumerate(candidates) if np.isfinite(thresholds[k]).any()]
        return ExitPlan(exits, total_flops, certificate)

    def _row_risk(self, split: Split, classes: int) -> np.ndarray:
        """``[N, C]``: risk (in budgets) a row adds if it leaves with class c."""
        wrong = (np.arange(classes)[None, :] != split.predictions[:, None]) / self.max_disagreement
        if self.max_accuracy_drop is not None and split.labels is not None:
            harmed = (split.predictions == split.labels)[:, None] & \
                (np.arange(classes)[None, :] != split.labels[:, None])
            wrong = wrong + harmed / self.max_accuracy_drop
        return wrong

    def _family(self, path_of, context: "_PlanningContext") -> list[np.ndarray]:
        """Nested plans as threshold matrices ``[exits, classes]`` along ``path_of``'s path.

        Which exits to open is chosen by backward elimination: starting from all,
        drop the exit whose removal lowers the design cost most at 70% of the
        budget, while one does.  Opening an exit charges its cost to every row
        reaching it, which a one-threshold-at-a-time search could never pay for.
        """
        active = np.ones(len(context.before), bool)
        path = path_of(context, active)
        value = _cost_within(path, 0.7 * len(context.design))
        while active.sum() > 1:
            trials = []
            for k in np.flatnonzero(active):
                trial = active.copy()
                trial[k] = False
                trial_path = path_of(context, trial)
                trials.append((_cost_within(trial_path, 0.7 * len(context.design)), k, trial_path))
            trial_value, k, trial_path = min(trials, key=lambda t: t[:2])
            if trial_value >= value:
                break
            active[k], value, path = False, trial_value, trial_path
        return [thresholds for thresholds, _, _ in path]

    def _path(self, context: "_PlanningContext", active: np.ndarray) -> list[tuple[np.ndarray, float, float]]:
        """Greedy path over the ``active`` exits' (cut, class) thresholds: (thresholds, design
        cost, design risk) per step, each step admitting more design rows to one rule."""
        sorted_scores = context.sorted_scores
        rows, classes = context.design.scores[0].shape
        step = max(1, round(self.step_fraction * rows))
        state = self._design_state(context, active)
        counts = np.zeros((len(active), classes), np.int64)
        path = [(_thresholds(counts, sorted_scores), state.total_cost, state.risk)]
        while True:
            best = None
            for k in np.flatnonzero(active):
                for cls in range(classes):
                    # larger moves too: the next rows by score may already leave earlier
                    for size in (step, 4 * step, 16 * step, 64 * step):
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
            if state.risk > self._risk_cap(rows):
                return path
            path.append((thresholds, state.total_cost, state.risk))

    def _shared_path(self, context: "_PlanningContext",
                     active: np.ndarray) -> list[tuple[np.ndarray, float, float]]:
        """One threshold for every class of every ``active`` exit, lowered step by step:
        (thresholds, design cost, design risk) per step."""
        rows, classes = context.design.scores[0].shape
        state = self._design_state(context, active)
        off = np.full((len(active), classes), np.inf, np.float32)
        path = [(off, state.total_cost, state.risk)]
        best = np.concatenate([s[:, 0] for s, on in zip(context.sorted_scores, active) if on])
        levels = -np.sort(-np.unique(best))
        stride = max(1, round(self.step_fraction * len(levels)))
        for level in levels[stride - 1::stride]:
            thresholds = np.where(active[:, None], np.float32(level) - np.float32(1e-6), off)
            state.update(thresholds)
            if state.risk > self._risk_cap(rows):
                break
            path.append((thresholds, state.total_cost, state.risk))
        return path

    def _risk_cap(self, rows: int) -> float:
        """Design risk (in budgets) at which a path stops growing."""
        return self.design_risk_factor * rows * (1 + (self.max_accuracy_drop is not None))

    def _design_state(self, context: "_PlanningContext", active: np.ndarray) -> "_DesignState":
        design = context.design
        return _DesignState(design.scores, self._row_risk(design, design.scores[0].shape[1]), context.before,
                            context.exit_cost, context.total_flops, active)

    def _certify(self, family: list[np.ndarray], test: Split, before: np.ndarray, rule_flops: np.ndarray,
                 total_flops: float, delta: float) -> tuple[np.ndarray, dict]:
        """Fixed-sequence test of the family at level ``delta`` on the test split; also trace the whole curve."""
        chosen, record, failed, curve = None, None, False, []
        for number, thresholds in enumerate(family):
            exit_index, exit_class = route([test.scores[k] - thresholds[k] for k in range(len(thresholds))])
            compiled = np.where(exit_class >= 0, exit_class, test.predictions)
            disagreements = int((compiled != test.predictions).sum())
            p_value = binomial_p_value(disagreements, len(test), self.max_disagreement)
            harm = None
            if self.max_accuracy_drop is not None and test.labels is not None:
                harm = int(((test.predictions == test.labels) & (compiled != test.labels)).sum())
                p_value = max(p_value, binomial_p_value(harm, len(test), self.max_accuracy_drop))
            failed = failed or p_value > delta
            paid = np.cumsum(np.where(np.isfinite(thresholds).any(axis=1), rule_flops, 0.0))
            cost = np.append(before + paid, total_flops + paid[-1])[exit_index]
            curve.append({"plan": number, "compute_reduction": float(1 - cost.mean() / total_flops),
                          "disagreement": disagreements / len(test), "p_value": p_value,
                          "accuracy": None if test.labels is None else float((compiled == test.labels).mean()),
                          "certified": not failed})
            if not failed:
                chosen = thresholds
                record = {"plans_tested": number + 1, "disagreements": disagreements,
                          "accuracy_harm": harm, "p_value": p_value,
                          "test_compute_reduction": curve[-1]["compute_reduction"]}
        if chosen is None:
            raise NoPlanError(f"even the plan with no exits fails the test on {len(test)} rows")
        certificate = {
            "method": "Learn-then-Test fixed-sequence testing of nested exit plans (ordered on a "
                      "separate design split) with exact binomial p-values on held-out rows",
            "max_disagreement": self.max_disagreement, "max_accuracy_drop": self.max_accuracy_drop,
            "confidence": self.confidence, "test_rows": len(test), **record,
            "disagreement_upper_bound": clopper_pearson_upper(record["disagreements"], len(test),
                                                              self.confidence),
            "chosen_plan": record["plans_tested"] - 1,
            "curve": _thin(curve, keep=record["plans_tested"] - 1)}
        return chosen, certificate


def _thin(curve: list[dict], keep: int, points: int = 100) -> list[dict]:
    """At most about ``points`` evenly spaced entries of ``curve``, always with entry ``keep``."""
    stride = max(1, len(curve) // points)
    chosen = set(range(0, len(curve), stride)) | {keep, len(curve) - 1}
    return [curve[i] for i in sorted(chosen)]


def _cost_within(path: list[tuple[np.ndarray, float, float]], risk: float) -> float:
    """Lowest design cost on a path among plans whose design risk is at most ``risk``."""
    return min(cost for _, cost, plan_risk in path if plan_risk <= risk)


def _threshold(descending: np.ndarray, count: int) -> float:
    """Threshold between the ``count``-th and the next highest score (inf for count 0)."""
    if count == 0:
        return np.inf
    lower = descending[count] if count < len(descending) else descending[-1] - 1.0
    return float((descending[count - 1] + lower) / 2)


def _thresholds(counts: np.ndarray, sorted_scores: list[np.ndarray]) -> np.ndarray:
    """Per (cut, class) thresholds admitting the top ``counts[k, c]`` design scores."""
    return np.array([[_threshold(scores[:, cls], counts[k, cls]) for cls in range(counts.shape[1])]
                     for k, scores in enumerate(sorted_scores)], np.float32).reshape(counts.shape)


class _DesignState:
    """Where each design row exits under the current thresholds, what it costs and risks.

    ``exit_cost`` is each exit's full planning cost per row reaching it, paid by
    every row that reaches an ``active`` exit.

    ``delta`` prices lowering one threshold in O(rows), so the greedy search can
    try every (cut, class) move at each step.
    """

    def __init__(self, scores: list[np.ndarray], row_risk: np.ndarray, before: np.ndarray,
                 exit_cost: np.ndarray, total_flops: float, active: np.ndarray) -> None:
        self.scores, self.row_risk, self.active = scores, row_risk, active
        self.before, self.total_flops = before, total_flops
        self.paid_before = np.concatenate([[0.0], np.cumsum(np.where(active, exit_cost, 0.0))])
        self.update(np.full((len(scores), scores[0].shape[1]), np.inf, np.float32))

    def update(self, thresholds: np.ndarray) -> None:
        margins = [s - t for s, t in zip(self.scores, thresholds)]
        self.exit_index, self.exit_class = route(margins)
        rows = np.arange(len(self.exit_index))
        exited = self.exit_index >= 0
        self.margin = np.full(len(rows), -np.inf)
        self.margin[exited] = np.stack(margins)[self.exit_index[exited], rows[exited], self.exit_class[exited]]
        exit_cost = np.append(self.before + self.paid_before[1:], self.total_flops + self.paid_before[-1])
        self.cost = exit_cost[self.exit_index]
        self.current_risk = np.where(exited, self.row_risk[rows, np.maximum(self.exit_class, 0)], 0.0)
        self.risk = float(self.current_risk.sum())
        self.total_cost = float(self.cost.sum())

    def delta(self, k: int, cls: int, threshold: float) -> tuple[float, float]:
        """(FLOPs saved, risk added) on the design rows if threshold (k, cls) became ``threshold``."""
        reach = (self.exit_index < 0) | (self.exit_index >= k)
        margin = self.scores[k][:, cls] - threshold
        at_k = self.exit_index == k
        newly = reach & ~at_k & (margin > 0)
        switched = at_k & (self.exit_class != cls) & (margin > self.margin)
        added_cost = (self.before[k] + self.paid_before[k + 1] - self.cost[newly]).sum()
        moved = newly | switched
        added_risk = (self.row_risk[moved, cls] - self.current_risk[moved]).sum()
        return float(-added_cost), float(added_risk)
