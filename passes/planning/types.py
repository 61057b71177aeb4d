"""The plan's data types, shared by the planner, the rewrite, the runtime's readers and reports.

:class:`Exit` is one exit (cut, pooling, linear scores, thresholds, guard, confidence scale);
:class:`ExitPlan` the exits to build in graph order with their certificate (``plan.json``);
:class:`PlanEvaluation` what a plan does on a set of rows.  Importing them does not import
the planner (design, certification), so rewriting a graph does not pull in the planner.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from moco_compile.passes.calibration.exit_confidence import ExitedConfidence, exited_confidence, exited_logits
from moco_compile.passes.calibration.guard import OODGuard
from moco_compile.passes.calibration.mlp_head import MLPScores
from moco_compile.passes.calibration.rules import LinearScores
from moco_compile.passes.graph.cut_points import CutPoint
from moco_compile.passes.planning.counts import PlanCounts, Split, tally
from moco_compile.passes.planning.routing import Rounding, Routing, guard_verdicts, route_scores, stage_costs


@dataclass
class Exit:
    """One exit: scores on a cut's pooled features (linear, or :class:`MLPScores` with a hidden layer) and
    per-class thresholds (inf = off), optionally guarded (rows its
    :class:`~moco_compile.passes.calibration.guard.OODGuard` finds unfamiliar never leave here; ``rule_flops``
    then includes the guard's).  ``confidence_scale``: exited rows carry calibrated log-probabilities
    (:mod:`~moco_compile.passes.calibration.exit_confidence`); None: margins."""

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
                **({"hidden_weight": self.scores.hidden_weight.tolist(), "hidden_bias": self.scores.hidden_bias.tolist()}
                   if isinstance(self.scores, MLPScores) else {}),
                "thresholds": [None if not np.isfinite(t) else float(t) for t in self.thresholds],
                "guard": None if self.guard is None else self.guard.to_dict(),
                "confidence_scale": self.confidence_scale}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Exit":
        cut = CutPoint(data["cut"], data["module"], tuple(data["shape"]), data["flops_before"],
                       data["flops_after"])
        weight, bias = np.asarray(data["weight"], np.float32), np.asarray(data["bias"], np.float32)
        scores = LinearScores(weight, bias, data.get("normalize", "none")) if data.get("hidden_weight") is None else \
            MLPScores(weight, bias, data.get("normalize", "none"), np.asarray(data["hidden_weight"], np.float32),
                      np.asarray(data["hidden_bias"], np.float32))
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
    """The exits to build, in graph order, and the certificate that justified them; ``agreement``: rows
    are routed with the agreement condition (past the first exit a row leaves only with the class it had
    at the exit before: :func:`~moco_compile.passes.planning.routing.route`)."""

    exits: list[Exit]
    total_flops: float
    certificate: dict = field(default_factory=dict)
    agreement: bool = False

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
                            guard_verdicts([e.guard for e in self.exits], features, rows, rounding), self.agreement)

    def evaluate(self, features: Sequence[np.ndarray], predictions: np.ndarray,
                 labels: np.ndarray | None = None) -> PlanEvaluation:
        """Route rows given their pooled features per exit (in exit order) and the full model's
        predictions: the figures (from :func:`~moco_compile.passes.planning.certify.tally`, as for rows
        counted shard by shard) and each row's exit and class."""
        routing = self.routing(features, len(predictions), full_predictions=predictions)
        counts = tally([routing], Split([], predictions, labels), len(self.exits))
        evaluation = PlanEvaluation.from_counts(counts, 0, np.arange(len(self.exits)), self.stage_flops(),
                                                self.total_flops)
        return replace(evaluation, exit_index=routing.exit_index, compiled_predictions=routing.predictions(predictions))

    def confidence(self, features: Sequence[np.ndarray], full_probabilities: np.ndarray,
                   labels: np.ndarray | None = None, exit_index: np.ndarray | None = None) -> ExitedConfidence:
        """How confident exited rows are as compiled vs the full model on the same rows (estimates),
        given pooled features per exit and the full model's ``[N, C]`` probabilities (and, when the
        rows were routed already, their ``exit_index``)."""
        if exit_index is None:
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
        return {"total_flops": self.total_flops, "certificate": self.certificate, "agreement": self.agreement,
                "exits": [e.to_dict() for e in self.exits]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ExitPlan":
        return cls([Exit.from_dict(e) for e in data["exits"]], data["total_flops"], data.get("certificate", {}),
                   bool(data.get("agreement", False)))
