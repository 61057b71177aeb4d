"""Sufficient rules: per cut, one linear score per class on the pooled features.

``scores = features @ weight + bias`` (one MatMul + Add for all classes of a
cut).  Each class's score is a one-vs-rest logistic regression of "the full
model predicts this class", so it reads as log-odds; the plan later turns it
into a rule by a per-class threshold.  Feature standardisation is folded into
``weight`` and ``bias``, so the compiled graph needs nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


@dataclass
class LinearScores:
    """Per-class linear scores at one cut: ``x @ weight + bias``, ``weight`` is ``[D, C]``."""

    weight: np.ndarray
    bias: np.ndarray

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return features.astype(np.float32) @ self.weight + self.bias

    @property
    def flops(self) -> float:
        """FLOPs per row of evaluating the scores."""
        return 2.0 * self.weight.size + self.bias.size


class OneVsRestRuleFitter:
    """Fit :class:`LinearScores` with one L2-regularised logistic regression per class.

    Parameters
    ----------
    regularization:
        Inverse regularisation strength ``C`` of each logistic regression.
    max_iter:
        Iteration cap for the lbfgs solver.
    """

    def __init__(self, regularization: float = 1.0, max_iter: int = 500) -> None:
        self.regularization = regularization
        self.max_iter = max_iter

    def fit(self, features: np.ndarray, targets: np.ndarray, num_classes: int) -> LinearScores:
        """Fit scores so that class ``c``'s score is high where ``targets == c``.

        Classes absent from ``targets`` get a score that never fires.
        """
        if features.ndim != 2 or len(features) != len(targets):
            raise ValueError(f"features must be [N, D] with N = len(targets); got {features.shape} "
                             f"and {len(targets)} targets")
        if not np.isfinite(features).all():
            raise ValueError("features contain NaN or Inf; check the model's activations at this cut")
        scaler = StandardScaler().fit(features)
        standardized = scaler.transform(features)
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        weight = np.zeros((features.shape[1], num_classes), np.float64)
        bias = np.full(num_classes, -1e4)
        for cls in np.unique(targets):
            binary = (targets == cls).astype(int)
            if binary.min() == binary.max():  # every row is this class: the score is a constant
                bias[cls] = 1e4
                continue
            regression = LogisticRegression(C=self.regularization, max_iter=self.max_iter)
            regression.fit(standardized, binary)
            coef = regression.coef_[0] / scale
            weight[:, cls] = coef
            bias[cls] = regression.intercept_[0] - float(scaler.mean_ @ coef)
        return LinearScores(weight.astype(np.float32), bias.astype(np.float32))
