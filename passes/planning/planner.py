"""Exit planning: which cuts get an exit, and each class's threshold there.

A plan is judged as a whole (routing and cost: :mod:`moco_compile.passes.planning.routing`).
:class:`ExitPlanner` selects it in three steps, each its own module:

1. design (:mod:`~moco_compile.passes.planning.design`): nested families of plans built on
   the design rows' cross-fitted scores; one family is chosen there, by
   cross-validation on the design rows (or every family is kept, see
   ``PlannerConfig.family_selection``);
2. certify (:mod:`~moco_compile.passes.planning.certify`): a fixed-sequence test of the
   family on the test rows, at the full confidence when one family was chosen
   on the design rows, at a Bonferroni share each otherwise;
3. select (here): the certified plan that saves most, with its certificate.

The data types the steps share live in :mod:`~moco_compile.passes.planning.types`
(:class:`Exit`, :class:`ExitPlan`) and :mod:`~moco_compile.passes.planning.counts`
(:class:`Split`, :class:`PlanCounts`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from moco_compile.passes.planning.bounds import clopper_pearson_upper
from moco_compile.passes.planning.certify import CertifiedFamily, certify_family
from moco_compile.passes.planning.config import Budget, PlannerConfig, routes_with_agreement
from moco_compile.passes.planning.counts import PlanCounts, Split, count_plans
from moco_compile.passes.planning.design import DesignProblem, build_families, choose_family, cut_elements
from moco_compile.passes.planning.routing import stage_costs
from moco_compile.passes.planning.types import Exit, ExitPlan, PlanEvaluation


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
        What is certified (:class:`~moco_compile.passes.planning.config.Budget`).
    config:
        How plans are designed and certified (:class:`~moco_compile.passes.planning.config.PlannerConfig`).
    seed:
        Seed of the design-row halves used to choose a family.

    ``fit`` designs and certifies on rows in memory; :meth:`design` then :meth:`certify` do the
    same in two steps, the test rows counted in between wherever they are (shard by shard).

    Attributes (after ``design``: ``candidates_``, ``problem_``, ``families_``, ``family_scores_``,
    ``family_savings_``;
    after ``certify`` or ``fit``: all)
    ------------------------------------------------------------------------------------------------
    candidates_, problem_:
        The candidate exits and the design problem built on the design rows.
    families_:
        Each built family's plans (``[exits, classes]`` thresholds over the candidates).
    family_scores_:
        Cross-validated held-out saving of each family on the design rows (cross-validated
        selection) or test compute reduction of each certified family (Bonferroni).
    family_savings_:
        Cross-validated selection: each family's held-out saving per fold (empty otherwise).
    certified_:
        Each tested family's :class:`~moco_compile.passes.planning.certify.CertifiedFamily`.
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
        return self.certify({name: count_plans(family, test, self.config.rounding, routes_with_agreement(name))
                             for name, family in families.items()})

    def design(self, candidates: Sequence[Exit], design: Split, test_rows: int, total_flops: float,
               among: Sequence[str] | None = None) -> dict[str, list[np.ndarray]]:
        """Build the families to certify on the ``design`` rows (``test_rows``: how many rows will
        certify); returns them (``families_``), each a list of ``[candidates, classes]`` thresholds.
        ``among``: the families cross-validated (default: ``PlannerConfig.families``), e.g. one
        family already chosen on the same rows, whose fold savings are then the only ones computed.

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
        if config.cross_validates_families:
            chosen, self.family_savings_ = choose_family(self.problem_, test_rows, self.seed, among)
            self.family_scores_ = {name: float(np.mean(values)) for name, values in self.family_savings_.items()}
            names = [chosen]
        else:
            names, self.family_scores_, self.family_savings_ = list(config.families), {}, {}
        self.families_ = build_families(names, self.problem_)
        return self.families_

    def stage_flops(self, open_exits: np.ndarray) -> np.ndarray:
        """FLOPs of leaving at each candidate exit (last: the full network) for a plan that builds
        ``open_exits``, rules included (what reports and certificates count); after :meth:`design`."""
        return stage_costs(self.flops_before_, np.where(open_exits, self.rule_flops_, 0.0), self.total_flops_)

    def certify(self, test: Mapping[str, PlanCounts], head_sets: int = 1) -> ExitPlan:
        """The certified plan of the designed families, from each family's counts on the test rows
        (:func:`count_plans` of ``families_[name]``, summed over shards); after :meth:`design`.
        ``head_sets``: how many sets of exit heads are certified on the same test rows, of which one is
        kept; each family is tested at that share of its error rate.

        Raises :class:`NoPlanError` when not even the plan with no exits certifies.
        """
        budget, config = self.budget, self.config
        names = list(self.families_)
        if budget.max_accuracy_drop is not None and any(test[name].correct_before is None for name in names):
            raise ValueError("max_accuracy_drop needs labels on the design and test rows")
        delta = config.family_delta(budget) / head_sets
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
        return ExitPlan(exits, self.total_flops_, self._certificate(name, result, test_rows, delta, head_sets),
                        routes_with_agreement(name))

    def evaluation(self, counts: Mapping[str, PlanCounts]) -> PlanEvaluation:
        """The certified plan's figures on other rows (e.g. the report split), from the families'
        counts there; after :meth:`certify`."""
        name, plan = self.chosen_
        open_exits = np.isfinite(self.families_[name][plan]).any(axis=1)
        return PlanEvaluation.from_counts(counts[name], plan, np.flatnonzero(open_exits), self.stage_flops(open_exits),
                                          self.total_flops_)

    def _certificate(self, family: str, result: CertifiedFamily, test_rows: int, delta: float,
                     head_sets: int) -> dict:
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
            "confidence": self.budget.confidence, "family": family, "agreement": routes_with_agreement(family),
            "family_selection": self.config.family_selection, "families": dict(self.family_scores_),
            "family_confidence": 1 - delta, "head_sets": head_sets, "test_rows": test_rows,
            "family_size": len(result.p_values),
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
