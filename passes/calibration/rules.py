"""Sufficient rules: per cut, one linear score per class on the pooled features.

``scores = features @ weight + bias`` (one MatMul + Add for all classes of a
cut), optionally normalised to log-probabilities (``log_softmax``, one more
node); the plan turns scores into rules with a per-class threshold.

* :class:`SoftmaxRuleFitter` (the compiler's default): a multinomial logistic
  regression of the full model's class; a row's score for class c is
  ``log p(c | x)``, so a class only scores high where it beats every other
  class.  On the reference CNN this admits more rows at equal risk than
  one-vs-rest scores (see benchmarks/RESULTS.md, "Rule quality").
* :class:`OneVsRestRuleFitter`: one logistic regression per class ("full model
  predicts c" vs not); scores are log-odds, usable alone as a single-class rule.

Feature standardisation is folded into ``weight`` and ``bias``, so the compiled
graph needs nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_softmax
from threadpoolctl import threadpool_limits

NORMALIZATIONS = ("none", "log_softmax")
# A feature spread less than this fraction of its magnitude is standardised by this fraction
# instead: its variation is at the float32 noise of the model's own activations, and dividing
# by its tiny spread gives weights of 1e6 whose logits cancel catastrophically in float32
# (measured: a text model's CLS embedding, spread 7e-9 at magnitude 1: logits off by 2e-2
# between batch sizes, so the compiled graph routed a row another way than certified).
MIN_RELATIVE_SPREAD = 1e-3


@dataclass
class LinearScores:
    """Per-class scores at one cut: ``x @ weight + bias`` (``weight`` is ``[D, C]``),
    then ``log_softmax`` over classes when ``normalize == "log_softmax"``."""

    weight: np.ndarray
    bias: np.ndarray
    normalize: str = "none"

    def __call__(self, features: np.ndarray) -> np.ndarray:
        scores = features.astype(np.float32) @ self.weight + self.bias
        return log_softmax(scores, axis=1).astype(np.float32) if self.normalize == "log_softmax" else scores

    @property
    def flops(self) -> float:
        """FLOPs per row of evaluating the scores."""
        return 2.0 * self.weight.size + self.bias.size * (5 if self.normalize == "log_softmax" else 1)


def standardized(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, mean, scale)``: ``features`` (``[N, D]``, one row per target) checked and standardised to
    float32 ``x = (features - mean) / scale``, each feature's spread floored (:data:`MIN_RELATIVE_SPREAD`)."""
    if features.ndim != 2 or len(features) != len(targets):
        raise ValueError(f"features must be [N, D] with N = len(targets); got {features.shape} "
                         f"and {len(targets)} targets")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or Inf; check the model's activations at this cut")
    mean = features.mean(axis=0)
    scale = np.maximum(features.std(axis=0), MIN_RELATIVE_SPREAD * np.abs(mean))
    scale = np.where(scale > 0, scale, 1.0)
    return ((features - mean) / scale).astype(np.float32), mean, scale


class RuleFitter(Protocol):
    """What fits an exit's scores: ``fit(features, targets, num_classes)`` and a quicker ``coarse()``."""

    def fit(self, features: np.ndarray, targets: np.ndarray, num_classes: int) -> LinearScores: ...

    def coarse(self) -> "RuleFitter": ...


class LinearRuleFitter:
    """Shared fitting: standardise, then minimise an L2-regularised loss with L-BFGS.

    Parameters
    ----------
    regularization:
        Inverse regularisation strength (scikit-learn's ``C``) on standardised features.
    max_iter:
        Iteration cap for L-BFGS.
    """

    normalize = "none"

    def __init__(self, regularization: float = 0.1, max_iter: int = 500) -> None:
        self.regularization = regularization
        self.max_iter = max_iter

    def _loss(self, logits: np.ndarray, onehot: np.ndarray) -> tuple[float, np.ndarray]:
        """Summed loss and its gradient with respect to the logits."""
        raise NotImplementedError

    def fit(self, features: np.ndarray, targets: np.ndarray, num_classes: int) -> LinearScores:
        """Fit scores so that class ``c`` scores high where ``targets == c``.

        Classes absent from ``targets`` get a score that never fires.
        """
        x, mean, scale = standardized(features, targets)
        rows, width = x.shape
        onehot = np.zeros((rows, num_classes), np.float32)
        onehot[np.arange(rows), targets] = 1
        alpha = 1.0 / (self.regularization * rows)

        def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
            weight = theta[:-num_classes].reshape(width, num_classes).astype(np.float32)
            loss, residual = self._loss(x @ weight + theta[-num_classes:].astype(np.float32), onehot)
            residual /= rows
            gradient = np.concatenate([(x.T @ residual + alpha * weight).ravel(), residual.sum(axis=0)])
            return float(loss / rows + alpha / 2 * (weight ** 2).sum()), gradient.astype(np.float64)

        with threadpool_limits(1):  # small BLAS calls: threads only contend (6x slower on 2 cores)
            result = minimize(loss_and_gradient, np.zeros(width * num_classes + num_classes), jac=True,
                              method="L-BFGS-B", options={"maxiter": self.max_iter})
        weight = result.x[:-num_classes].reshape(width, num_classes) / scale[:, None]
        bias = result.x[-num_classes:] - mean @ weight
        absent = np.setdiff1d(np.arange(num_classes), targets)
        weight[:, absent], bias[absent] = 0.0, -1e4
        return LinearScores(weight.astype(np.float32), bias.astype(np.float32), self.normalize)

    def coarse(self) -> "LinearRuleFitter":
        """The same fitter with a small iteration cap, for comparing candidates quickly."""
        return type(self)(self.regularization, max_iter=60)


class SoftmaxRuleFitter(LinearRuleFitter):
    """Multinomial logistic regression; scores are log-probabilities of each class."""

    normalize = "log_softmax"

    def _loss(self, logits: np.ndarray, onehot: np.ndarray) -> tuple[float, np.ndarray]:
        log_probabilities, probabilities = log_softmax_and_softmax(logits)
        return float(-(onehot * log_probabilities).sum()), probabilities - onehot


class OneVsRestRuleFitter(LinearRuleFitter):
    """One L2-regularised logistic regression per class, solved as one L-BFGS problem.

    The per-class problems are independent; solving them jointly costs one
    ``[N, D] x [D, C]`` product per iteration instead of C solver runs.
    """

    def _loss(self, logits: np.ndarray, onehot: np.ndarray) -> tuple[float, np.ndarray]:
        loss = (np.logaddexp(0, logits) - onehot * logits).sum()
        return float(loss), expit(logits) - onehot


def log_softmax_and_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise log-probabilities and probabilities of ``[N, C]`` ``logits``, from one exponential (the
    fitters' losses need both at every solver step; scipy's functions compute it twice)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    total = exponentials.sum(axis=1, keepdims=True)
    return shifted - np.log(total), exponentials / total


def high_precision_coverage(scores: np.ndarray, targets: np.ndarray, precision: float) -> float:
    """Fraction of rows that per-class thresholds could admit while each class keeps ``precision``."""
    admitted = 0
    for cls in range(scores.shape[1]):
        order = np.argsort(-scores[:, cls], kind="stable")
        hits = np.cumsum(targets[order] == cls)
        ok = np.flatnonzero(hits >= precision * np.arange(1, len(order) + 1))
        admitted += ok[-1] + 1 if len(ok) else 0
    return admitted / max(len(targets), 1)


def select_variant(features: dict[str, np.ndarray], targets: np.ndarray, num_classes: int,
                   fitter: RuleFitter, precision: float = 0.995, held_out: float = 0.25, min_gain: float = 0.01,
                   fit_to: np.ndarray | None = None) -> str:
    """The pooling variant whose rules admit the most rows (whose class is ``targets``) at ``precision``.

    Variants are fitted (to ``fit_to``, default ``targets``) on the first ``1 - held_out`` of the
    rows, with ``fitter.coarse()``, and compared on the rest; a costlier variant (later in
    ``features``) must win by ``min_gain``.
    """
    if len(features) == 1:
        return next(iter(features))
    fit_to = targets if fit_to is None else fit_to
    split = int(len(targets) * (1 - held_out))
    coarse = fitter.coarse()
    best_variant, best_coverage = None, -1.0
    for variant, values in features.items():
        scores = coarse.fit(values[:split], fit_to[:split], num_classes)
        coverage = high_precision_coverage(scores(values[split:]), targets[split:], precision)
        if best_variant is None or coverage > best_coverage + min_gain:
            best_variant, best_coverage = variant, coverage
    return best_variant


def out_of_fold_scores(fitter: RuleFitter, features: np.ndarray, targets: np.ndarray,
                       num_classes: int, folds: int = 3) -> np.ndarray:
    """Scores of every row from rules fitted without it (``folds``-fold cross-fitting); ``targets``:
    whatever ``fitter`` fits to, one entry per row.

    Lets the same rows both fit the rules and plan the thresholds without the
    optimism of scoring rows a rule was fitted on.
    """
    scores = np.empty((len(targets), num_classes), np.float32)
    fold_of_row = np.arange(len(targets)) % folds
    for fold in range(folds):
        held = fold_of_row == fold
        scores[held] = fitter.fit(features[~held], targets[~held], num_classes)(features[held])
    return scores
