"""Baseline early-exit policies and richer one-MatMul rules, for ``bench_rule_quality.py``.

Everything here works on the pooled features moco's calibration pass records per
cut, so every method sees exactly the same inputs.

Probes and scores (all are ``features @ weight + bias`` followed by cheap per-row
ops, so each costs one MatMul at run time):

* :class:`SoftmaxProbeFitter`: a multinomial logistic regression (the linear
  "internal classifier" of BranchyNet / SDN / PABEE, trained post hoc on the
  frozen model's predictions).
* :class:`PairMargin`: class-pair margins of that probe, ``z_c - max_{c' != c} z_c'``:
  class ``c`` is admitted when all ``C - 1`` pair differences clear one threshold.
* :class:`OneVsOneFitter`: ``C (C-1) / 2`` independent class-pair logistic
  regressions, solved as one L-BFGS problem; class ``c``'s score is the minimum of
  its pair log-odds (one MatMul to the pair columns, a Min, a threshold).
* :class:`PolytopeFitter`: ``J`` half-spaces per class fitted jointly; class ``c``'s
  score is the minimum over its ``J`` linear scores (a polytope instead of
  moco's single half-space; one MatMul to ``C * J`` columns, a Min, a threshold).

Policies (threshold families over the probes' softmax outputs):

* max-softmax or entropy with one shared threshold (BranchyNet / SDN style);
* the same statistic with one threshold per cut, the path chosen greedily on a
  design split (cheap early exits first);
* patience across consecutive exits (PABEE), optionally with a confidence floor.

Every family is an ordered list of configurations, conservative to aggressive,
certified with the same fixed-sequence binomial test moco uses
(:func:`certify_sequence`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, softmax
from threadpoolctl import threadpool_limits

from moco_compile.passes.calibration.rules import SoftmaxRuleFitter
from moco_compile.passes.planning.bounds import binomial_p_value
from moco_compile.passes.planning.routing import route, stage_costs

NEVER = -1e4  # bias of a score that must never fire (class absent from the fit rows)


def _standardize(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return ((features - mean) / scale).astype(np.float32), mean, scale


def _fold(weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, scale: np.ndarray):
    """Fold feature standardisation into ``weight`` [D, K] and ``bias`` [K]."""
    weight = weight / scale[:, None]
    return weight.astype(np.float32), (bias - mean @ weight).astype(np.float32)


# ----------------------------------------------------------------------------- probes


@dataclass
class LinearProbe:
    """``x @ weight + bias``: logits of a multinomial probe."""

    weight: np.ndarray
    bias: np.ndarray

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return features.astype(np.float32) @ self.weight + self.bias

    @property
    def flops(self) -> float:
        return 2.0 * self.weight.size + self.bias.size


class SoftmaxProbeFitter:
    """Multinomial logistic probe predicting the full model's class: moco's own
    :class:`SoftmaxRuleFitter`, read as raw logits (softmax is shift-invariant per row)."""

    def __init__(self, regularization: float = 0.1, max_iter: int = 500) -> None:
        self.fitter = SoftmaxRuleFitter(regularization, max_iter)

    def fit(self, features: np.ndarray, targets: np.ndarray, num_classes: int) -> LinearProbe:
        scores = self.fitter.fit(features, targets, num_classes)
        return LinearProbe(scores.weight, scores.bias)


def pair_margins(scores: np.ndarray) -> np.ndarray:
    """``s_c - max_{c' != c} s_c'`` per class: positive for the top class only."""
    top2 = -np.partition(-scores, 1, axis=1)[:, :2]
    best_other = np.where(scores >= top2[:, :1], top2[:, 1:2], top2[:, :1])
    return scores - best_other


@dataclass
class PairMargin:
    """Class-pair margins of linear scores: ``z_c - max_{c' != c} z_c'`` per class.

    Thresholding class ``c``'s margin at ``t_c`` admits the intersection of the
    ``C - 1`` half-spaces ``(w_c - w_c') x + b_c - b_c' > t_c``: a class-pair rule
    that still costs one MatMul (to the ``C`` scores) plus a top-2.
    """

    probe: LinearProbe

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return pair_margins(self.probe(features))

    @property
    def flops(self) -> float:
        classes = self.probe.bias.size
        return self.probe.flops + 2.0 * classes  # top-2 and one subtraction per class


class PairMarginFitter:
    def __init__(self, regularization: float = 0.1) -> None:
        self.probe_fitter = SoftmaxProbeFitter(regularization)

    def fit(self, features: np.ndarray, targets: np.ndarray, num_classes: int) -> PairMargin:
        return PairMargin(self.probe_fitter.fit(features, targets, num_classes))


@dataclass
class MinOfColumns:
    """``min`` over each class's columns of ``x @ weight + bias``.

    ``signs[c, j]`` and ``columns[c, j]`` say which column (and with which sign)
    is class ``c``'s ``j``-th half-space.  One MatMul, then a gather + Min.
    """

    weight: np.ndarray
    bias: np.ndarray
    columns: np.ndarray
    signs: np.ndarray

    def __call__(self, features: np.ndarray) -> np.ndarray:
        values = features.astype(np.float32) @ self.weight + self.bias
        return (values[:, self.columns] * self.signs).min(axis=2)

    @property
    def flops(self) -> float:
        return 2.0 * self.weight.size + self.bias.size + 2.0 * self.columns.size


class OneVsOneFitter:
    """One logistic regression per class pair (rows the full model assigns to either class).

    Class ``c``'s score is ``min_{c'} log-odds(c over c')``: it fires only where
    ``c`` beats every other class in its own pair rule (an intersection of ``C-1``
    half-spaces, each fitted on the rows that matter for it).  The pair problems
    are independent and solved as one L-BFGS problem.
    """

    def __init__(self, regularization: float = 0.1, max_iter: int = 500) -> None:
        self.regularization = regularization
        self.max_iter = max_iter

    def fit(self, features: np.ndarray, targets: np.ndarray, num_classes: int) -> MinOfColumns:
        x, mean, scale = _standardize(features)
        rows, width = x.shape
        pairs = [(i, j) for i in range(num_classes) for j in range(i + 1, num_classes)]
        count = len(pairs)
        first = np.array([i for i, _ in pairs])
        second = np.array([j for _, j in pairs])
        mask = ((targets[:, None] == first) | (targets[:, None] == second)).astype(np.float32)
        positive = (targets[:, None] == first).astype(np.float32)
        per_pair = np.maximum(mask.sum(axis=0), 1.0)
        alpha = 1.0 / (self.regularization * per_pair)  # each pair penalised as if fitted alone
        row_weight = mask / per_pair

        def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
            weight = theta[:-count].reshape(width, count).astype(np.float32)
            logits = x @ weight + theta[-count:].astype(np.float32)
            loss = (row_weight * (np.logaddexp(0, logits) - positive * logits)).sum() + \
                (alpha / 2 * (weight ** 2).sum(axis=0)).sum()
            residual = row_weight * (expit(logits) - positive)
            gradient = np.concatenate([(x.T @ residual + alpha * weight).ravel(), residual.sum(axis=0)])
            return float(loss), gradient.astype(np.float64)

        with threadpool_limits(1):
            result = minimize(loss_and_gradient, np.zeros(width * count + count), jac=True,
                              method="L-BFGS-B", options={"maxiter": self.max_iter})
        weight, bias = _fold(result.x[:-count].reshape(width, count), result.x[-count:], mean, scale)
        present = np.isin(np.arange(num_classes), targets)
        for p, (i, j) in enumerate(pairs):  # a class absent from the rows never wins its pairs
            if not present[i] or not present[j]:
                weight[:, p] = 0.0
                bias[p] = NEVER if not present[i] else -NEVER
        columns = np.zeros((num_classes, num_classes - 1), np.int64)
        signs = np.zeros((num_classes, num_classes - 1), np.float32)
        for c in range(num_classes):
            others = [o for o in range(num_classes) if o != c]
            for k, o in enumerate(others):
                columns[c, k] = pairs.index((min(c, o), max(c, o)))
                signs[c, k] = 1.0 if c < o else -1.0
        return MinOfColumns(weight, bias, columns, signs)


class PolytopeFitter:
    """``halves`` half-spaces per class, fitted jointly: score_c = min_j (x @ w_cj + b_cj).

    Trained with the one-vs-rest logistic loss on a soft minimum
    (``-tau log sum exp(-z / tau)``, tau annealed 1 -> 0.1, L-BFGS), used with the
    hard minimum at run time.  Starts from the one-vs-rest solution (moco's rule)
    for the first half-space and, for the others, the one-vs-rest pair difference
    ``s_c - s_o`` against the class's ``j``-th most frequent confuser ``o``, so with
    ``halves = 1`` this is moco's rule.
    """

    def __init__(self, halves: int = 2, regularization: float = 0.1, max_iter: int = 100,
                 taus: Sequence[float] = (1.0, 0.3, 0.1)) -> None:
        self.halves = halves
        self.regularization = regularization
        self.max_iter = max_iter
        self.taus = taus

    def fit(self, features: np.ndarray, targets: np.ndarray, num_classes: int) -> MinOfColumns:
        x, mean, scale = _standardize(features)
        rows, width = x.shape
        classes, halves = num_classes, self.halves
        columns = classes * halves
        onehot = np.zeros((rows, classes), np.float32)
        onehot[np.arange(rows), targets] = 1
        alpha = np.float32(1.0 / (self.regularization * rows))

        def objective(tau: float) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
            def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
                weight = theta[:-columns].reshape(width, columns).astype(np.float32)
                z = (x @ weight + theta[-columns:].astype(np.float32)).reshape(rows, classes, halves)
                low = z.min(axis=2, keepdims=True)
                tail = np.exp(-(z - low) / tau)
                total = tail.sum(axis=2)
                score = low[:, :, 0] - tau * np.log(total)
                share = tail / total[:, :, None]
                loss = (np.logaddexp(0, score) - onehot * score).sum() / rows + alpha / 2 * (weight ** 2).sum()
                residual = (((expit(score) - onehot) / rows)[:, :, None] * share).reshape(rows, columns)
                gradient = np.concatenate([(x.T @ residual + alpha * weight).ravel(), residual.sum(axis=0)])
                return float(loss), gradient.astype(np.float64)
            return loss_and_gradient

        theta = self._start(x, targets, classes)
        with threadpool_limits(1):
            for tau in self.taus:
                theta = minimize(objective(tau), theta, jac=True, method="L-BFGS-B",
                                 options={"maxiter": self.max_iter}).x
        weight, bias = _fold(theta[:-columns].reshape(width, columns), theta[-columns:], mean, scale)
        absent = np.setdiff1d(np.arange(classes), targets)
        for c in absent:
            weight[:, c * halves:(c + 1) * halves], bias[c * halves:(c + 1) * halves] = 0.0, NEVER
        index = np.arange(columns).reshape(classes, halves)
        return MinOfColumns(weight, bias, index, np.ones((classes, halves), np.float32))

    def _start(self, x: np.ndarray, targets: np.ndarray, classes: int) -> np.ndarray:
        """Initial (standardised) parameters: one-vs-rest, then pair differences against top confusers."""
        from moco_compile.passes.calibration.rules import OneVsRestRuleFitter

        width = x.shape[1]
        ovr = OneVsRestRuleFitter(self.regularization).fit(x, targets, classes)
        weight = np.zeros((width, classes, self.halves), np.float32)
        bias = np.zeros((classes, self.halves), np.float32)
        weight[:, :, 0], bias[:, 0] = ovr.weight, ovr.bias
        scores = ovr(x)
        for c in range(classes):
            # confusers: other classes most frequent among the rows c's rule scores highest
            high = scores[:, c] > np.quantile(scores[:, c], 0.8)
            others = np.array([o for o in range(classes) if o != c])
            counts = np.array([((targets == o) & high).sum() for o in others])
            for j, o in enumerate(others[np.argsort(-counts, kind="stable")][:self.halves - 1], start=1):
                weight[:, c, j] = ovr.weight[:, c] - ovr.weight[:, o]
                bias[c, j] = ovr.bias[c] - ovr.bias[o]
        return np.concatenate([weight.reshape(width, -1).ravel(), bias.ravel()]).astype(np.float64)


# ----------------------------------------------------------------------------- policies


@dataclass
class ProbeOutputs:
    """Per cut, what the softmax probes say about each row."""

    probabilities: list[np.ndarray]  # [N, C] per cut

    @property
    def max_probability(self) -> list[np.ndarray]:
        return [p.max(axis=1) for p in self.probabilities]

    @property
    def neg_entropy(self) -> list[np.ndarray]:
        return [(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1) for p in self.probabilities]

    @property
    def argmax(self) -> list[np.ndarray]:
        return [p.argmax(axis=1) for p in self.probabilities]

    @property
    def patience(self) -> list[np.ndarray]:
        """Number of consecutive cuts, ending at each cut, whose probes agree with this cut's."""
        classes = self.argmax
        counts = [np.ones(len(classes[0]), np.int64)]
        for k in range(1, len(classes)):
            counts.append(np.where(classes[k] == classes[k - 1], counts[-1] + 1, 1))
        return counts

    @classmethod
    def from_logits(cls, logits: Sequence[np.ndarray]) -> "ProbeOutputs":
        return cls([softmax(z.astype(np.float64), axis=1) for z in logits])


@dataclass
class Outcome:
    """Where each row exits (cut index, -1: none) with which class, and which cuts are built."""

    exit_index: np.ndarray
    exit_class: np.ndarray
    open: np.ndarray  # [K] bool: exit built in the graph (its rule cost is paid by rows reaching it)


def first_firing(fire: Sequence[np.ndarray], classes: Sequence[np.ndarray], open_: np.ndarray) -> Outcome:
    """Each row leaves at the first built cut whose ``fire`` is set, with that cut's class.

    Routed by moco's own :func:`~moco_compile.passes.planning.routing.route`: at cut ``k`` the margin
    of class ``classes[k]`` is positive on the rows that fire there, every other margin negative.
    """
    open_ = np.asarray(open_, bool)
    rows = len(fire[0]) if len(fire) else 0
    width = 1 + max((int(c.max()) for c in classes if len(c)), default=0)
    margins = []
    for k, (f, c) in enumerate(zip(fire, classes)):
        margin = np.full((rows, max(width, 2)), -1.0, np.float32)
        if open_[k]:
            firing = np.flatnonzero(f)
            margin[firing, c[firing]] = 1.0
        margins.append(margin)
    routing = route(margins, rows=rows)
    return Outcome(routing.exit_index, routing.exit_class, open_)


def row_flops(outcome: Outcome, before: np.ndarray, rule_flops: np.ndarray, total_flops: float) -> np.ndarray:
    """Per-row FLOPs, counted by moco's :func:`~moco_compile.passes.planning.routing.stage_costs` (as
    ``ExitPlan.row_flops``): prefix up to the exit + the rules of every built exit reached."""
    return stage_costs(before, np.where(outcome.open, rule_flops, 0.0), total_flops)[outcome.exit_index]


def measure(outcome: Outcome, predictions: np.ndarray, labels: np.ndarray | None, before: np.ndarray,
            rule_flops: np.ndarray, total_flops: float) -> dict:
    compiled = np.where(outcome.exit_index >= 0, outcome.exit_class, predictions)
    return {
        "compute_reduction": float(1 - row_flops(outcome, before, rule_flops, total_flops).mean() / total_flops),
        "exit_rate": float((outcome.exit_index >= 0).mean()),
        "disagreement": float((compiled != predictions).mean()),
        "accuracy": None if labels is None else float((compiled == labels).mean()),
        "exits_built": int(outcome.open.sum()),
    }


class Policy:
    """A family of configurations, ordered conservative to aggressive, applied to probe outputs."""

    name: str
    rule_extra: float = 0.0  # FLOPs per class beyond the probe MatMul (softmax, statistic, compare)

    def family(self, design: ProbeOutputs, design_predictions: np.ndarray, budget: float,
               before: np.ndarray, rule_flops: np.ndarray, total_flops: float) -> list:
        raise NotImplementedError

    def apply(self, config, outputs: ProbeOutputs) -> Outcome:
        raise NotImplementedError


def _grid(values: np.ndarray, points: int = 400) -> np.ndarray:
    """Thresholds at evenly spaced quantiles of ``values``, descending, plus +inf first."""
    levels = np.quantile(values, np.linspace(1.0, 0.0, points))
    return np.concatenate([[np.inf], np.unique(levels)[::-1]])


def _statistic(outputs: ProbeOutputs, statistic: str) -> list[np.ndarray]:
    return outputs.max_probability if statistic == "max_probability" else outputs.neg_entropy


class SharedThreshold(Policy):
    """Exit at the first cut whose statistic (max-softmax or -entropy) is >= one shared t."""

    def __init__(self, statistic: str) -> None:
        self.statistic = statistic
        self.name = {"max_probability": "max-softmax, shared t", "neg_entropy": "entropy, shared t"}[statistic]
        self.rule_extra = 4.0 if statistic == "max_probability" else 7.0

    def family(self, design, design_predictions, budget, before, rule_flops, total_flops):
        return list(_grid(np.concatenate(_statistic(design, self.statistic))))

    def apply(self, config, outputs):
        stats = _statistic(outputs, self.statistic)
        open_ = np.full(len(stats), np.isfinite(config))
        return first_firing([s >= config for s in stats], outputs.argmax, open_)


class PerCutThreshold(Policy):
    """One threshold per cut (inf: no exit there), the path grown greedily on design rows.

    Like moco's planner: each step lowers the one cut's threshold so that ``step``
    (or 4 x ``step``) more design rows leave there, picking the move that saves the
    most FLOPs per extra disagreement (rule costs of built exits included), until
    the design disagreement reaches ``risk_factor`` x budget.
    """

    def __init__(self, statistic: str, step_fraction: float = 0.005, risk_factor: float = 3.0) -> None:
        self.statistic = statistic
        self.name = {"max_probability": "max-softmax, per-cut t",
                     "neg_entropy": "entropy, per-cut t"}[statistic]
        self.rule_extra = 4.0 if statistic == "max_probability" else 7.0
        self.step_fraction = step_fraction
        self.risk_factor = risk_factor

    def family(self, design, design_predictions, budget, before, rule_flops, total_flops):
        stats = _statistic(design, self.statistic)
        rows, cuts = len(design_predictions), len(stats)
        step = max(1, round(self.step_fraction * rows))

        def evaluate(thresholds):
            outcome = self.apply(thresholds, design)
            compiled = np.where(outcome.exit_index >= 0, outcome.exit_class, design_predictions)
            return (outcome, row_flops(outcome, before, rule_flops, total_flops).sum(),
                    int((compiled != design_predictions).sum()))

        thresholds = np.full(cuts, np.inf)
        outcome, cost, risk = evaluate(thresholds)
        path = [thresholds.copy()]
        while risk <= self.risk_factor * budget * rows:
            best = None
            for k in range(cuts):
                # rows that reach cut k and do not leave there yet, most confident first
                waiting = ((outcome.exit_index < 0) | (outcome.exit_index > k)) & (stats[k] < thresholds[k])
                values = -np.sort(-stats[k][waiting])
                for size in (step, 4 * step):
                    if size > len(values):
                        continue
                    trial = thresholds.copy()
                    trial[k] = (values[size - 1] + values[size]) / 2 if size < len(values) else values[-1] - 1.0
                    trial_outcome, trial_cost, trial_risk = evaluate(trial)
                    saved, added = cost - trial_cost, trial_risk - risk
                    if saved <= 0:
                        continue
                    priority = (np.inf, saved) if added <= 0 else (saved / added, saved)
                    if best is None or priority > best[0]:
                        best = (priority, trial, trial_outcome, trial_cost, trial_risk)
            if best is None:
                break
            _, thresholds, outcome, cost, risk = best
            path.append(thresholds.copy())
        return path

    def apply(self, config, outputs):
        stats = _statistic(outputs, self.statistic)
        return first_firing([s >= t for s, t in zip(stats, config)], outputs.argmax, np.isfinite(config))


class Patience(Policy):
    """PABEE: exit at the first cut where the probes' argmax has held for ``p`` consecutive cuts.

    With ``floors``, also require the exit cut's max-softmax >= a floor; the 2-D
    family (p, floor) is ordered by its design-split Pareto front (risk up, cost down).
    """

    def __init__(self, with_floor: bool) -> None:
        self.with_floor = with_floor
        self.name = "patience + confidence floor" if with_floor else "patience (PABEE)"
        self.rule_extra = 5.0

    def family(self, design, design_predictions, budget, before, rule_flops, total_flops):
        cuts = len(design.probabilities)
        if not self.with_floor:
            return [None] + [(p, 0.0) for p in range(cuts, 0, -1)]
        floors = [0.0] + list(np.quantile(np.concatenate(design.max_probability), np.linspace(0, 0.999, 200)))
        scored = []
        for p in range(1, cuts + 1):
            for floor in floors:
                outcome = self.apply((p, floor), design)
                compiled = np.where(outcome.exit_index >= 0, outcome.exit_class, design_predictions)
                scored.append(((compiled != design_predictions).sum(),
                               row_flops(outcome, before, rule_flops, total_flops).sum(), (p, floor)))
        scored.sort(key=lambda s: (s[0], s[1]))
        family, best_cost = [None], np.inf
        for risk, cost, config in scored:
            if cost < best_cost:
                family.append(config)
                best_cost = cost
        return family

    def apply(self, config, outputs):
        cuts = len(outputs.probabilities)
        if config is None:
            return first_firing([np.zeros(len(outputs.probabilities[0]), bool)] * cuts, outputs.argmax,
                                np.zeros(cuts, bool))
        p, floor = config
        fire = [(count >= p) & (m >= floor) for count, m in zip(outputs.patience, outputs.max_probability)]
        return first_firing(fire, outputs.argmax, np.ones(cuts, bool))


def certify_sequence(family: Sequence, evaluate: Callable[[object], tuple[int, int]], budget: float,
                     confidence: float) -> tuple[int, dict]:
    """Fixed-sequence test (Learn-then-Test) of ``family`` in order on held-out rows.

    ``evaluate(config)`` returns (disagreements, rows) on the test split.  Returns
    the index of the last configuration certified before the first failure
    (``-1`` when even the first fails) and its record.
    """
    delta = 1 - confidence
    chosen, record = -1, {"plans_tested": 0}
    for number, config in enumerate(family):
        disagreements, rows = evaluate(config)
        p_value = binomial_p_value(disagreements, rows, budget)
        if p_value > delta:
            break
        chosen, record = number, {"plans_tested": number + 1, "disagreements": disagreements,
                                  "p_value": p_value, "family_size": len(family)}
    return chosen, record
