"""Exit planning: which cuts get an exit, and each class's threshold there.

A plan is judged as a whole (routing and cost: :mod:`moco_compile.passes.routing`).
:class:`ExitPlanner` selects it in three steps, each its own module:

1. design (:mod:`~moco_compile.passes.design`): nested families of plans built on
   the design rows' cross-fitted scores; one family is chosen there, by
   cross-validation on the design rows (or every family is kept, see
   ``PlannerConfig.family_selection``);
2. certify (:mod:`~moco_compile.passes.certify`): a fixed-sequence test of the
   family on the test rows, at the full confidence when one family was chosen
   on the design rows, at a Bonferroni share each otherwise;
3. select (here): the certified plan that saves most, with its certificate.

This module also holds the data types the steps share: :class:`Exit`,
:class:`ExitPlan`, :class:`Split`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from moco_compile.passes.bounds import clopper_pearson_upper
from moco_compile.passes.certify import CertifiedFamily, PlanCounts, certify_family, count_plans, tally
from moco_compile.passes.config import Budget, PlannerConfig
from moco_compile.passes.cut_points import CutPoint
from moco_compile.passes.design import DesignProblem, build_families, choose_family, cut_elements
from moco_compile.passes.exit_confidence import ExitedConfidence, exited_confidence, exited_logits
from moco_compile.passes.guard import OODGuard
from moco_compile.passes.routing import GuardVerdicts, Rounding, Routing, route_scores, stage_costs
from moco_compile.passes.rules import LinearScores


@dataclass
class Exit:
    """One exit: linear scores on a cut's pooled features and per-class thresholds (inf = off),
    optionally guarded (rows its :class:`~moco_compile.passes.guard.OODGuard` finds unfamiliar
    never leave here; ``rule_flops`` then includes the guard's).  ``confidence_scale``: exited rows
    carry calibrated log-probabilities (:mod:`~moco_compile.passes.exit_confidence`); None: margins."""

    cut: CutPoint
    column: str
    pooling: str
    scores: LinearScores
    thresholds: np.ndarray
    rule_flops: float
    guard: OODGuard | None = None
    confidence_scale: float | None = None

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
                "thresholds": [None if not np.isfinite(t) else float(t) for t in self.thresholds],
                "guard": None if self.guard is None else self.guard.to_dict(),
                "confidence_scale": self.confidence_scale}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Exit":
        cut = CutPoint(data["cut"], data["module"], tuple(data["shape"]), data["flops_before"],
                       data["flops_after"])
        scores = LinearScores(np.asarray(data["weight"], np.float32), np.asarray(data["bias"], np.float32),
                              data.get("normalize", "none"))
        thresholds = np.asarray([np.inf if t is None else t for t in data["thresholds"]], np.float32)
        guard = OODGuard.from_dict(data["guard"]) if data.get("guard") else None
        return cls(cut, data["column"], data["pooling"], scores, thresholds, data["rule_flops"], guard,
                   data.get("confidence_scale"))


@dataclass
class PlanEvaluation:
    """What a plan does on a set of rows (per row only when evaluated on rows in memory)."""

    compute_reduction: float
    exit_rates: list[float]
    disagreement: float
    disagreement_among_exited: float
    accuracy_before: float | None
    accuracy_after: float | None
    exit_index: np.ndarray | None = None
    compiled_predictions: np.ndarray | None = None

    @classmethod
    def from_counts(cls, counts: PlanCounts, plan: int, built: np.ndarray, costs: np.ndarray,
                    total_flops: float) -> "PlanEvaluation":
        """Plan ``plan`` of ``counts`` (rows summed over any shards): ``built``, the indices of the
        exits it builds among the counted exits; ``costs``, the FLOPs of leaving at each counted
        exit (last: the full network)."""
        rows = max(counts.rows, 1)
        exited = counts.rows - int(counts.exits[plan, -1])
        changed = int(counts.changed[plan])
        return cls(
            compute_reduction=1 - counts.mean_cost(plan, costs) / total_flops if counts.rows else 0.0,
            exit_rates=[float(counts.exits[plan, k] / rows) for k in built],
            disagreement=changed / rows, disagreement_among_exited=changed / exited if exited else 0.0,
            accuracy_before=None if counts.correct_before is None else counts.correct_before / rows,
            accuracy_after=None if counts.correct_after is None else float(counts.correct_after[plan] / rows))

    def to_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items()
                if key not in ("exit_index", "compiled_predictions")}


@dataclass
class ExitPlan:
    """The exits to build, in graph order, and the certificate that justified them."""

    exits: list[Exit]
    total_flops: float
    certificate: dict = field(default_factory=dict)

    def stage_flops(self) -> np.ndarray:
        """FLOPs of a row leaving at each exit (last: the full network), rules included."""
        return stage_costs(np.array([e.cut.flops_before for e in self.exits]),
                           np.array([e.rule_flops for e in self.exits]), self.total_flops)

    def row_flops(self, exit_index: np.ndarray) -> np.ndarray:
        """FLOPs each row costs in the compiled graph, rules included."""
        return self.stage_flops()[exit_index]  # index -1 selects the full-network entry

    def routing(self, features: Sequence[np.ndarray], rows: int, rounding: Rounding = Rounding(),
                full_predictions: np.ndarray | None = None) -> Routing:
        """Route ``rows`` rows given their pooled features per exit (in exit order); ``rounding``
        marks the rows float rounding could send elsewhere (with ``full_predictions``: those it could
        send out with another class)."""
        thresholds = np.array([e.thresholds for e in self.exits], np.float32)
        scores = [e.scores(f) for e, f in zip(self.exits, features)]
        return route_scores(scores, thresholds, self.stage_flops(), rounding, rows, full_predictions,
                            guard_verdicts([e.guard for e in self.exits], features, rows, rounding))

    def evaluate(self, features: Sequence[np.ndarray], predictions: np.ndarray,
                 labels: np.ndarray | None = None) -> PlanEvaluation:
        """Route rows given their pooled features per exit (in exit order) and the full model's
        predictions: the figures (from :func:`~moco_compile.passes.certify.tally`, as for rows
        counted shard by shard) and each row's exit and class."""
        routing = self.routing(features, len(predictions), full_predictions=predictions)
        counts = tally([routing], Split([], predictions, labels), len(self.exits))
        evaluation = PlanEvaluation.from_counts(counts, 0, np.arange(len(self.exits)), self.stage_flops(),
                                                self.total_flops)
        return replace(evaluation, exit_index=routing.exit_index, compiled_predictions=routing.predictions(predictions))

    def confidence(self, features: Sequence[np.ndarray], full_probabilities: np.ndarray,
                   labels: np.ndarray | None = None) -> ExitedConfidence:
        """How confident exited rows are as compiled vs the full model on the same rows (estimates),
        given pooled features per exit and the full model's ``[N, C]`` probabilities."""
        exit_index = self.routing(features, len(full_probabilities)).exit_index
        exited = np.flatnonzero(exit_index >= 0)
        log_probs = np.zeros((len(exited), full_probabilities.shape[1]), np.float32)
        margins, carried = log_probs.copy(), log_probs.copy()
        for k, exit_ in enumerate(self.exits):
            here = exit_index[exited] == k
            log_probs[here] = exit_.scores(features[k][exited[here]])
            margins[here] = log_probs[here] - exit_.thresholds
            carried[here] = margins[here] if exit_.confidence_scale is None else \
                exited_logits(log_probs[here], margins[here], exit_.confidence_scale)
        return exited_confidence(carried, margins, full_probabilities[exited],
                                 None if labels is None else labels[exited])

    def to_dict(self) -> dict:
        return {"total_flops": self.total_flops, "certificate": self.certificate,
                "exits": [e.to_dict() for e in self.exits]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ExitPlan":
        return cls([Exit.from_dict(e) for e in data["exits"]], data["total_flops"], data.get("certificate", {}))


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


class NoPlanError(Exception):
    """Not even the plan with no exits passed the test (too few test rows)."""


RETRY_NOTE = ("retrying on these calibration rows with another budget, confidence or seed voids the stated "
              "confidence (the test has seen them): a valid retry needs new calibration rows")


CERTIFIED_STATEMENT = ("with probability >= confidence (over the draw of the calibration rows), the rate at which "
                       "the compiled model's class differs from the full model's is at most max_disagreement (and, "
                       "when set, the rate of inputs right before and wrong after is at most max_accuracy_drop), "
                       "for traffic exchangeable with the calibration rows. A rate is a population figure, the "
                       "chance that such an input changes class: the fraction on any particular stretch of "
                       "traffic varies around it and can exceed it (binomial noise, larger on fewer inputs)")
ESTIMATE_NOTE = ("Clopper-Pearson bound on the chosen plan's test disagreements: the plan was chosen on "
                 "these rows, so this is an estimate, not part of the certificate")


class ExitPlanner:
    """Choose exits and thresholds jointly under a certified global risk budget.

    Parameters
    ----------
    budget:
        What is certified (:class:`~moco_compile.passes.config.Budget`).
    config:
        How plans are designed and certified (:class:`~moco_compile.passes.config.PlannerConfig`).
    seed:
        Seed of the design-row halves used to choose a family.

    ``fit`` designs and certifies on rows in memory; :meth:`design` then :meth:`certify` do the
    same in two steps, the test rows counted in between wherever they are (shard by shard).

    Attributes (after ``design``: ``candidates_``, ``problem_``, ``families_``, ``family_scores_``;
    after ``certify`` or ``fit``: all)
    ------------------------------------------------------------------------------------------------
    candidates_, problem_:
        The candidate exits and the design problem built on the design rows.
    families_:
        Each built family's plans (``[exits, classes]`` thresholds over the candidates).
    family_scores_:
        Cross-validated held-out saving of each family on the design rows (cross-validated
        selection) or test compute reduction of each certified family (Bonferroni).
    certified_:
        Each tested family's :class:`~moco_compile.passes.certify.CertifiedFamily`.
    chosen_:
        (family, plan index) of the certified plan.
    """

    def __init__(self, budget: Budget = Budget(), config: PlannerConfig = PlannerConfig(), seed: int = 0) -> None:
        self.budget = budget
        self.config = config
        self.seed = seed

    def fit(self, candidates: Sequence[Exit], design: Split, test: Split, total_flops: float) -> ExitPlan:
        """Return the certified plan (possibly with no exits if only that passes).

        ``candidates`` are exits with fitted scores (their thresholds are ignored);
        ``design`` and ``test`` hold each candidate's scores on those splits.
        Raises :class:`NoPlanError` when not even the plan with no exits certifies
        (too few test rows).  The same as :meth:`design`, then :meth:`certify` on the test
        rows counted in memory as one shard.
        """
        if self.budget.max_accuracy_drop is not None and test.labels is None:
            raise ValueError("max_accuracy_drop needs labels on the design and test rows")
        families = self.design(candidates, design, len(test), total_flops)
        return self.certify({name: count_plans(family, test, self.config.rounding)
                             for name, family in families.items()})

    def design(self, candidates: Sequence[Exit], design: Split, test_rows: int,
               total_flops: float) -> dict[str, list[np.ndarray]]:
        """Build the families to certify on the ``design`` rows (``test_rows``: how many rows will
        certify); returns them (``families_``), each a list of ``[candidates, classes]`` thresholds.

        What certifies them is their counts on the test rows (:func:`count_plans`), wherever counted.
        """
        budget, config = self.budget, self.config
        if budget.max_accuracy_drop is not None and design.labels is None:
            raise ValueError("max_accuracy_drop needs labels on the design and test rows")
        design = design.without_guard()
        self.candidates_, self.total_flops_ = list(candidates), total_flops
        self.flops_before_ = np.array([c.cut.flops_before for c in candidates], np.float64)
        self.rule_flops_ = np.array([c.rule_flops for c in candidates], np.float64)
        self.problem_ = DesignProblem.build(design, self.flops_before_, self.rule_flops_,
                                            cut_elements([c.cut.shape for c in candidates]), total_flops, budget,
                                            config)
        if config.family_selection == "cross-validated" and len(config.families) > 1:
            chosen, self.family_scores_ = choose_family(self.problem_, test_rows, self.seed)
            names = [chosen]
        else:
            names, self.family_scores_ = list(config.families), {}
        self.families_ = build_families(names, self.problem_)
        return self.families_

    def stage_flops(self, open_exits: np.ndarray) -> np.ndarray:
        """FLOPs of leaving at each candidate exit (last: the full network) for a plan that builds
        ``open_exits``, rules included (what reports and certificates count); after :meth:`design`."""
        return stage_costs(self.flops_before_, np.where(open_exits, self.rule_flops_, 0.0), self.total_flops_)

    def certify(self, test: Mapping[str, PlanCounts]) -> ExitPlan:
        """The certified plan of the designed families, from each family's counts on the test rows
        (:func:`count_plans` of ``families_[name]``, summed over shards); after :meth:`design`.

        Raises :class:`NoPlanError` when not even the plan with no exits certifies.
        """
        budget, config = self.budget, self.config
        names = list(self.families_)
        if budget.max_accuracy_drop is not None and any(test[name].correct_before is None for name in names):
            raise ValueError("max_accuracy_drop needs labels on the design and test rows")
        delta = config.family_delta(budget)
        self.certified_ = {name: certify_family(family, test[name], self.stage_flops, self.problem_.costs,
                                                self.total_flops_, budget, delta)
                           for name, family in self.families_.items()}
        passed = {name: result for name, result in self.certified_.items() if result.chosen >= 0}
        if config.family_selection == "bonferroni":
            self.family_scores_ = {name: result.compute_reductions[result.chosen] if result.chosen >= 0 else None
                                   for name, result in self.certified_.items()}
        test_rows = test[names[0]].rows
        if not passed:
            raise NoPlanError(f"even the plan with no exits fails the test on {test_rows} rows; {RETRY_NOTE}")
        name = max(passed, key=lambda n: (passed[n].compute_reductions[passed[n].chosen], -names.index(n)))
        result = passed[name]
        self.chosen_ = (name, result.chosen)
        thresholds = self.families_[name][result.chosen]
        exits = [replace(candidate, thresholds=thresholds[k])
                 for k, candidate in enumerate(self.candidates_) if np.isfinite(thresholds[k]).any()]
        return ExitPlan(exits, self.total_flops_, self._certificate(name, result, test_rows, delta))

    def evaluation(self, counts: Mapping[str, PlanCounts]) -> PlanEvaluation:
        """The certified plan's figures on other rows (e.g. the report split), from the families'
        counts there; after :meth:`certify`."""
        name, plan = self.chosen_
        open_exits = np.isfinite(self.families_[name][plan]).any(axis=1)
        return PlanEvaluation.from_counts(counts[name], plan, np.flatnonzero(open_exits), self.stage_flops(open_exits),
                                          self.total_flops_)

    def _certificate(self, family: str, result: CertifiedFamily, test_rows: int, delta: float) -> dict:
        """What was certified, and how; estimates are labelled as such."""
        chosen = result.chosen
        failures = result.failures[chosen]
        stopped = result.certified + 1 < len(result.p_values)
        curve = [{"plan": number, "compute_reduction": reduction, "disagreement": f.disagreements / test_rows,
                  "p_value": p_value, "accuracy": accuracy, "certified": number <= result.certified}
                 for number, (reduction, f, p_value, accuracy) in enumerate(
                     zip(result.compute_reductions, result.failures, result.p_values, result.accuracies))]
        return {
            "certified": CERTIFIED_STATEMENT,
            "method": "Learn-then-Test fixed-sequence testing of one nested family of exit plans (ordered on "
                      "separate design rows) with exact binomial p-values on held-out test rows",
            "max_disagreement": self.budget.max_disagreement, "max_accuracy_drop": self.budget.max_accuracy_drop,
            "confidence": self.budget.confidence, "family": family,
            "family_selection": self.config.family_selection, "families": dict(self.family_scores_),
            "family_confidence": 1 - delta, "test_rows": test_rows, "family_size": len(result.p_values),
            "plans_tested": result.certified + 1 + stopped, "plans_certified": result.certified + 1,
            "chosen_plan": chosen,
            "disagreements": failures.disagreements, "near_threshold_rows": failures.near_threshold,
            "rounding_tolerance": self.config.rounding_tolerance, "rounding_floor": self.config.rounding_floor,
            "accuracy_harm": failures.accuracy_harm, "p_value": result.p_values[chosen],
            "test_compute_reduction": result.compute_reductions[chosen],
            "estimated_disagreement_upper_bound": clopper_pearson_upper(failures.disagreements, test_rows,
                                                                        self.budget.confidence),
            "estimate_note": ESTIMATE_NOTE,
            "curve": _thin(curve, keep=chosen)}


def _thin(curve: list[dict], keep: int, points: int = 100) -> list[dict]:
    """At most about ``points`` evenly spaced entries of ``curve``, always with entry ``keep``."""
    stride = max(1, len(curve) // points)
    chosen = set(range(0, len(curve), stride)) | {keep, len(curve) - 1}
    return [curve[i] for i in sorted(chosen)]
