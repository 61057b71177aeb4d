"""Out-of-distribution guard: a distance check at an exit that sends unfamiliar rows on.

The certificate holds for traffic exchangeable with the calibration rows.  Rows
unlike them (noise, another data set) may score high on an exit's rule and leave
with a wrong class: on uniform-noise images the reference CNN's exits took 93% of
the rows and 8.7% of them left with another class than the full model's
(``benchmarks/RESULTS.md``, "Out-of-distribution guard").  The
guard is opt-in (``compile(ood_guard=level)``, ``moco compile --ood-guard LEVEL``).

At each exit it scores a row by the Mahalanobis distance of the exit's pooled
features to the nearest class mean, with one covariance shared by the classes
(Lee et al. 2018, "A simple unified framework for detecting out-of-distribution
samples"), all fitted on the rule-fitting rows only, classes being the full
model's predictions:

1. standardise the features (as the rules do, :data:`~moco_compile.passes.calibration.rules.MIN_RELATIVE_SPREAD`);
2. the within-class covariance, shrunk towards a multiple of the identity
   (Ledoit-Wolf), is whitened: ``w = x @ weight + bias`` (standardisation folded in);
3. ``distance = min_c ||w - m_c||^2 = |w|^2 + min_c (m_c . m_c - 2 w . m_c)``:
   one ``[D, D]`` MatMul, one ``[D, C]`` MatMul and two reductions in the graph
   (features wider than ``max_width``: only their ``max_width`` principal
   within-class directions are checked, a ``[D, max_width]`` MatMul, so that a
   4 x 2048-wide pooled cut needs neither a 2048^2 x 16 matrix nor its eigenproblem);
4. the threshold is the ``1 - level`` quantile of the fitting rows' distances,
   each from a guard fitted without that row (cross-fitted: in-sample distances
   are biased low, and an in-sample threshold turned 3-5 times ``level`` of new
   calibration-like rows away on the reference CNN).

A row whose distance exceeds the threshold cannot leave at that exit; it
continues (and may leave at a later one).  Planning, certification and
verification route rows with the guard exactly as the graph does
(:class:`~moco_compile.passes.planning.routing.GuardVerdicts`); rows whose distance sits
within float rounding of the threshold (``Rounding.guard``, relative) may go
either way and count as such.  :func:`guard_nodes` and :meth:`OODGuard.distances`
compute the same float32 formula in the same order.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from sklearn.covariance import ledoit_wolf
from sklearn.utils.extmath import randomized_svd

from moco_compile.passes.calibration.pooling import reduce_nodes
from moco_compile.passes.calibration.rules import MIN_RELATIVE_SPREAD


@dataclass
class OODGuard:
    """A fitted guard: ``distance(x) = min_c ||x @ weight + bias - means[c]||^2``; rows with a
    distance above ``threshold`` may not leave at the exit.

    ``weight`` ``[D, R]`` and ``bias`` ``[R]`` whiten the pooled features (``R = D``, or the
    fitter's ``max_width`` principal directions), ``means`` ``[K, R]``
    holds the whitened class means (classes the fitting rows predicted), ``level`` the share
    of calibration-like rows the threshold was set to turn away.
    """

    weight: np.ndarray
    bias: np.ndarray
    means: np.ndarray
    threshold: float
    level: float

    def distances(self, features: np.ndarray) -> np.ndarray:
        """``[N]`` float32 distances, computed as :func:`guard_nodes` computes them in the graph."""
        whitened = features.astype(np.float32) @ self.weight + self.bias
        squared = (whitened * whitened).sum(axis=1, keepdims=True, dtype=np.float32)
        return (whitened @ self.cross_weight + self.cross_bias + squared).min(axis=1)

    def verdicts(self, features: np.ndarray, relative_rounding: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Per row: whether the guard sends it on, and whether float rounding of its distance
        (``relative_rounding`` times the threshold) could change that."""
        distances = self.distances(features)
        return distances > self.threshold, np.abs(distances - self.threshold) <= relative_rounding * self.threshold

    @property
    def cross_weight(self) -> np.ndarray:
        """``[D, K]``: ``-2 m_c`` per class, so ``w @ cross_weight + cross_bias = |m_c|^2 - 2 w . m_c``."""
        return (-2 * self.means.T).astype(np.float32)

    @property
    def cross_bias(self) -> np.ndarray:
        """``[K]``: ``|m_c|^2`` per class."""
        return (self.means * self.means).sum(axis=1).astype(np.float32)

    @property
    def flops(self) -> float:
        """FLOPs per row of computing the distance and comparing it."""
        width, classes = self.weight.shape[1], len(self.means)
        return 2.0 * self.weight.size + width + 2 * width + 2.0 * width * classes + 3 * classes + 1

    def to_dict(self) -> dict:
        return {"weight": self.weight.tolist(), "bias": self.bias.tolist(), "means": self.means.tolist(),
                "threshold": self.threshold, "level": self.level}

    @classmethod
    def from_dict(cls, data: Mapping) -> "OODGuard":
        return cls(np.asarray(data["weight"], np.float32), np.asarray(data["bias"], np.float32),
                   np.asarray(data["means"], np.float32), float(data["threshold"]), float(data["level"]))


class GuardFitter:
    """Fit an :class:`OODGuard` on an exit's pooled features of the rule-fitting rows.

    Parameters
    ----------
    level:
        Share of calibration-like rows the guard may turn away, in (0, 1); e.g. 0.01.
    folds:
        The threshold is a quantile of distances each computed by a guard fitted
        without the row (``folds``-fold cross-fitting).
    max_width:
        Features wider than this are checked along their ``max_width`` principal
        within-class directions only (randomised SVD, seeded).

    Attributes (after ``fit``)
    --------------------------
    out_of_fold_distances_:
        ``[N]`` cross-fitted distance of each fitting row (what the threshold is a quantile of).
    """

    def __init__(self, level: float = 0.01, folds: int = 3, max_width: int = 512) -> None:
        self.level = level
        self.folds = folds
        self.max_width = max_width

    def fit(self, features: np.ndarray, targets: np.ndarray) -> OODGuard:
        """The guard for ``features`` (``[N, D]``) whose rows the full model assigned ``targets``."""
        if not 0 < self.level < 1:
            raise ValueError(f"the guard's level must be in (0, 1), got {self.level}; e.g. 0.01 turns away "
                             "about 1% of calibration-like rows at each exit")
        if self.folds < 2 or self.max_width < 1:
            raise ValueError(f"folds must be at least 2 and max_width at least 1, got {self.folds} and "
                             f"{self.max_width}")
        if features.ndim != 2 or len(features) != len(targets) or len(features) < 2 * self.folds:
            raise ValueError(f"features must be [N, D] with N = len(targets) >= {2 * self.folds}; got "
                             f"{features.shape} and {len(targets)} targets")
        fold_of_row = np.arange(len(targets)) % self.folds
        self.out_of_fold_distances_ = np.empty(len(targets), np.float32)
        for fold in range(self.folds):
            held = fold_of_row == fold
            self.out_of_fold_distances_[held] = self._statistics(features[~held], targets[~held]).distances(
                features[held])
        guard = self._statistics(features, targets)
        guard.threshold = float(np.quantile(self.out_of_fold_distances_, 1 - self.level, method="higher"))
        return guard

    def _statistics(self, features: np.ndarray, targets: np.ndarray) -> OODGuard:
        """Whitening and class means fitted on these rows (threshold not set yet)."""
        features = features.astype(np.float64)
        mean = features.mean(axis=0)
        scale = np.maximum(features.std(axis=0), MIN_RELATIVE_SPREAD * np.abs(mean))
        scale = np.where(scale > 0, scale, 1.0)
        standard = (features - mean) / scale
        classes = np.unique(targets)
        class_means = np.stack([standard[targets == c].mean(axis=0) for c in classes])
        residuals = standard - class_means[np.searchsorted(classes, targets)]
        basis = np.eye(residuals.shape[1])
        if residuals.shape[1] > self.max_width:
            basis = randomized_svd(residuals, self.max_width, random_state=0)[2].T  # [D, max_width]
        covariance, _ = ledoit_wolf(residuals @ basis, assume_centered=True)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        floor = max(float(eigenvalues.max()), 1.0) * 1e-9  # constant features: no direction divides by 0
        whitening = basis @ (eigenvectors / np.sqrt(np.maximum(eigenvalues, floor)))
        weight = whitening / scale[:, None]
        return OODGuard(weight.astype(np.float32), (-(mean / scale) @ whitening).astype(np.float32),
                        (class_means @ whitening).astype(np.float32), np.inf, self.level)


def guard_nodes(guard: OODGuard, pooled: str, unfamiliar: str, prefix: str, opset: int,
                initializers: list) -> list[onnx.NodeProto]:
    """Nodes writing ``unfamiliar`` (bool ``[N]``: the guard sends the row on) from the float32
    ``[N, D]`` features ``pooled``; its constants are appended to ``initializers``."""
    p = prefix
    initializers.extend([
        numpy_helper.from_array(guard.weight.astype(np.float32), f"{p}/weight"),
        numpy_helper.from_array(guard.bias.astype(np.float32), f"{p}/bias"),
        numpy_helper.from_array(guard.cross_weight, f"{p}/cross_weight"),
        numpy_helper.from_array(guard.cross_bias, f"{p}/cross_bias"),
        numpy_helper.from_array(np.array(guard.threshold, np.float32), f"{p}/threshold"),
    ])
    return [
        helper.make_node("MatMul", [pooled, f"{p}/weight"], [f"{p}/linear"], name=f"{p}/whiten"),
        helper.make_node("Add", [f"{p}/linear", f"{p}/bias"], [f"{p}/whitened"], name=f"{p}/whitened"),
        *reduce_nodes("ReduceSumSquare", f"{p}/whitened", [1], f"{p}/squared", f"{p}/squared", opset, keepdims=1),
        helper.make_node("MatMul", [f"{p}/whitened", f"{p}/cross_weight"], [f"{p}/cross"], name=f"{p}/cross"),
        helper.make_node("Add", [f"{p}/cross", f"{p}/cross_bias"], [f"{p}/cross_biased"], name=f"{p}/cross_biased"),
        helper.make_node("Add", [f"{p}/cross_biased", f"{p}/squared"], [f"{p}/to_means"], name=f"{p}/to_means"),
        *reduce_nodes("ReduceMin", f"{p}/to_means", [1], f"{p}/distance", f"{p}/distance", opset),
        helper.make_node("Greater", [f"{p}/distance", f"{p}/threshold"], [unfamiliar], name=f"{p}/unfamiliar"),
    ]
