"""Exit heads with one hidden layer, distilled from the full model (issue 28 item 1).

``scores = log_softmax(relu(features @ hidden_weight + hidden_bias) @ weight + bias)``: the pooled
features of a cut go through ``width`` ReLU units before the per-class scores, so an exit can
draw a class boundary a linear probe cannot (internal classifiers on a frozen backbone, Kaya et al.
2019).  The backbone is untouched; only the head is fitted.

:class:`DistilledMLPFitter` fits it on the rule-fitting rows to the full model's class
probabilities (soft cross-entropy: rows the full model itself is unsure of get an unsure head, so
they do not leave), with L2 weight decay, by L-BFGS on an analytic gradient (numpy, one thread: the
same solver as the linear rules, no training framework).  Standardisation is folded into the
hidden layer, so the compiled graph needs three nodes more than a linear head (MatMul, Add, Relu).
Fitting is seeded: the same rows give the same head.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from moco_compile.passes.calibration.rules import LinearScores, log_softmax_and_softmax, standardized

HIDDEN_WIDTH = 64  # ReLU units: 2 * D * 64 FLOPs per row, a rounding error beside any stage of a real network
# Weight decay and iteration cap, measured on the reference CNN at 1% (certified compute reduction on moco's own
# test rows; official test split): 32 units, C = 1, 200 iterations 54.8% (54.5%, -0.46 pp); 64 units 57.5%
# (57.2%); 64 units, C = 0.1 59.8% (59.3%, -0.46 pp); the same at 100 iterations 60.2% (59.7%, -0.40 pp), as
# fast to fit as 32 units at 200; 128 units, C = 0.1 60.3% (59.5%, -0.31 pp) at twice the fitting time.
# Stronger decay gives smoother, better calibrated heads, which one shared threshold treats alike.
REGULARIZATION = 0.1
MAX_ITER = 100
# Wide features (a text model's 384-768) are fitted on their 128 leading principal components, which makes the
# fit 3-6x cheaper (minilm6_rt: rules 26.3 -> 12.5 s, the same plan).  Not below 257 features: the reference
# CNN's cuts (80-256) projected to 128 lost 0.8 pp of certified compute (60.2 -> 59.4%), to 64 2.2 pp.
PROJECT_ABOVE = 256
PROJECTED_FEATURES = 128


@dataclass
class MLPScores(LinearScores):
    """Log-probabilities from one hidden ReLU layer (``hidden_weight`` is ``[D, H]``), then the
    final layer ``weight`` (``[H, C]``) and ``bias`` as :class:`LinearScores`."""

    hidden_weight: np.ndarray | None = None
    hidden_bias: np.ndarray | None = None

    def hidden(self, features: np.ndarray) -> np.ndarray:
        """``[N, H]`` hidden activations."""
        return np.maximum(features.astype(np.float32) @ self.hidden_weight + self.hidden_bias, 0)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return super().__call__(self.hidden(features))

    @property
    def flops(self) -> float:
        """FLOPs per row: the hidden layer (product, bias, ReLU) and the final scores."""
        return 2.0 * self.hidden_weight.size + 2 * self.hidden_bias.size + super().flops


class DistilledMLPFitter:
    """Fit :class:`MLPScores` to the full model's probabilities.

    Parameters
    ----------
    width:
        Hidden ReLU units.
    regularization:
        Inverse weight-decay strength on standardised features (as the linear fitters' ``C``).
    max_iter:
        Iteration cap for L-BFGS.
    seed:
        Seed of the initial hidden weights.
    project_above, projected_features:
        Features wider than ``project_above`` are fitted on their ``projected_features`` leading principal
        components (of the standardised rule-fitting rows); the projection is folded into ``hidden_weight``,
        so the head still reads every feature.  ``project_above=None`` fits on every feature.
    """

    def __init__(self, width: int = HIDDEN_WIDTH, regularization: float = REGULARIZATION, max_iter: int = MAX_ITER,
                 seed: int = 0, project_above: int | None = PROJECT_ABOVE,
                 projected_features: int = PROJECTED_FEATURES) -> None:
        self.width = width
        self.regularization = regularization
        self.max_iter = max_iter
        self.seed = seed
        self.project_above = project_above
        self.projected_features = projected_features

    def fit(self, features: np.ndarray, targets: np.ndarray, num_classes: int) -> MLPScores:
        """Fit the head so that it predicts ``targets``: ``[N, C]`` class probabilities (the full
        model's; distillation) or ``[N]`` classes (one-hot)."""
        x, mean, scale = standardized(features, targets)
        basis = None
        if self.project_above is not None and x.shape[1] > self.project_above:
            basis = _principal_basis(x, self.projected_features)
            x = x @ basis
        soft = _soft_targets(targets, num_classes)
        rows, width, hidden = len(x), x.shape[1], self.width
        alpha = 1.0 / (self.regularization * rows)
        sizes = (width * hidden, hidden, hidden * num_classes, num_classes)
        bounds = np.cumsum(sizes)[:-1]

        def unpack(theta: np.ndarray) -> list[np.ndarray]:
            w1, b1, w2, b2 = np.split(theta.astype(np.float32), bounds)
            return [w1.reshape(width, hidden), b1, w2.reshape(hidden, num_classes), b2]

        def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w1, b1, w2, b2 = unpack(theta)
            pre = x @ w1 + b1
            act = np.maximum(pre, 0)
            logits = act @ w2 + b2
            log_probabilities, probabilities = log_softmax_and_softmax(logits)
            loss = -(soft * log_probabilities).sum() / rows
            residual = (probabilities - soft) / rows
            back = (residual @ w2.T) * (pre > 0)
            decay = alpha / 2 * ((w1 ** 2).sum() + (w2 ** 2).sum())
            gradient = [x.T @ back + alpha * w1, back.sum(axis=0), act.T @ residual + alpha * w2, residual.sum(axis=0)]
            return float(loss + decay), np.concatenate([g.ravel() for g in gradient]).astype(np.float64)

        rng = np.random.default_rng(self.seed)
        start = np.concatenate([rng.normal(0, 1 / np.sqrt(width), width * hidden), np.full(hidden, 0.1),
                                rng.normal(0, 1 / np.sqrt(hidden), hidden * num_classes), np.zeros(num_classes)])
        with threadpool_limits(1):  # small BLAS calls: threads only contend
            result = minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B",
                              options={"maxiter": self.max_iter})
        w1, b1, w2, b2 = unpack(result.x)
        if basis is not None:
            w1 = basis @ w1
        hidden_weight = w1 / scale[:, None]
        hidden_bias = b1 - mean @ hidden_weight
        absent = np.flatnonzero(soft.sum(axis=0) == 0)
        w2, b2 = w2.copy(), b2.copy()
        w2[:, absent], b2[absent] = 0.0, -1e4
        return MLPScores(w2.astype(np.float32), b2.astype(np.float32), "log_softmax",
                         hidden_weight.astype(np.float32), hidden_bias.astype(np.float32))

    def coarse(self) -> "DistilledMLPFitter":
        """The same fitter with a small iteration cap, for comparing candidates quickly."""
        return type(self)(self.width, self.regularization, max_iter=60, seed=self.seed,
                          project_above=self.project_above, projected_features=self.projected_features)


def _principal_basis(x: np.ndarray, components: int) -> np.ndarray:
    """``[D, components]`` orthonormal leading principal directions of the centred ``x`` (orthonormal: the
    weight decay on the projected weights is the decay on the folded ones)."""
    with threadpool_limits(1):
        _, _, directions = np.linalg.svd(x, full_matrices=False)
    return np.ascontiguousarray(directions[:components].T)


def _soft_targets(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """``[N, C]`` float32 target distributions from probabilities or class indices."""
    if targets.ndim == 2:
        if targets.shape[1] != num_classes:
            raise ValueError(f"target probabilities must have {num_classes} columns, got {targets.shape[1]}")
        return targets.astype(np.float32)
    onehot = np.zeros((len(targets), num_classes), np.float32)
    onehot[np.arange(len(targets)), targets] = 1
    return onehot

