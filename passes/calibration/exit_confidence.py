"""Calibrated probabilities for exited rows: one temperature per exit, fitted to the full model's confidence.

An exit's rule is a softmax probe trained to predict the full model's class, and
the rows that leave are those it is surest about: the softmax of its margins is
overconfident (a mean top probability of 0.97 where the full model gives 0.50 on
the same rows was measured on a softmax-ending model).  Downstream code that
thresholds the model's probabilities needs the full model's scale, so each exit
carries a ``scale`` (an inverse temperature) and exited rows carry

    logits = scale * log p_rule(x),  with the exit's class swapped into the top place

(:func:`exited_logits`), through the model's final Softmax/LogSoftmax when it has
one.  For a model whose output is raw logits, these are logits on the full
model's scale in the only sense logits have one: their softmax is calibrated to
the full model's (logits are defined up to a per-row constant).

Fitting (:class:`TemperatureFitter`): on the rule-fitting rows that leave at the
exit under the certified plan (cross-fitted scores, as planning used; never the
certifying test rows), ``scale`` minimises the binary cross-entropy between the
exited row's top probability and the full model's probability of that class.
Why the emitted class's probability rather than the full distribution or the
labels: it is what a downstream threshold reads and what expected calibration
error (ECE) measures; the full distribution is undefined where a rule gives a
class no mass (classes absent from the fitting rows); and labels are often
missing from calibration data, while "the full model's confidence" is what a
drop-in replacement must reproduce.

The swap: per-class thresholds can let a row leave with a class that is not the
rule's most probable one (its threshold far lower than the others').  The exit's
class must stay the argmax (certification counted that class), so its scaled
log-probability and the largest one trade places: the row keeps the calibrated
confidence, assigned to the class it leaves with.  When the two classes agree
(always for a shared threshold) nothing moves.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from scipy.optimize import minimize_scalar
from scipy.special import softmax

MIN_ROWS = 20  # fewer exited fitting rows than this: fit on every fitting row's scores at the exit


def exited_logits(log_probs: np.ndarray, margins: np.ndarray, scale: float | np.ndarray) -> np.ndarray:
    """``[N, C]`` what exited rows carry: ``scale`` (one, or ``[N]``: each row's exit's) times
    ``log_probs``, with the column of each row's exit class (argmax of ``margins``) and its largest
    column swapped (:func:`exited_logits_nodes` in numpy)."""
    scale = np.asarray(scale, np.float32)
    scaled = ((scale[:, None] if scale.ndim else scale) * log_probs).astype(np.float32)
    rows = np.arange(len(scaled))
    top, cls = scaled.argmax(axis=1), margins.argmax(axis=1)
    swapped = scaled.copy()
    swapped[rows, top] = scaled[rows, cls]
    swapped[rows, cls] = scaled[rows, top]
    return swapped


def swap_is_identity(thresholds: np.ndarray, scale: float) -> bool:
    """True when :func:`exited_logits`' swap can never move a value that is read: every class shares
    one threshold, so the exit's class (argmax of ``log p - t``) is the argmax of ``log p`` and a
    positive ``scale`` keeps it on top (ties aside: both ArgMaxes then pick a tied column), or every
    class is off (``inf``) and no row leaves there."""
    thresholds = np.asarray(thresholds)
    return scale > 0 and thresholds.size > 0 and bool((thresholds == thresholds.flat[0]).all())


def exited_logits_nodes(log_probs: str, margins: str, scale: float, output: str, prefix: str,
                        initializers: list, swap: bool = True) -> list[onnx.NodeProto]:
    """Nodes writing :func:`exited_logits` of the float32 ``[N, C]`` tensors ``log_probs`` and ``margins``
    to ``output``; the scale is appended to ``initializers``.  ``swap=False`` (where
    :func:`swap_is_identity`) writes the scaled log-probabilities alone: one node instead of seven,
    run on every row reaching the exit."""
    p = prefix
    initializers.append(numpy_helper.from_array(np.array(scale, np.float32), f"{p}/scale"))
    if not swap:
        return [helper.make_node("Mul", [log_probs, f"{p}/scale"], [output], name=f"{p}/scaled")]
    return [
        helper.make_node("Mul", [log_probs, f"{p}/scale"], [f"{p}/scaled"], name=f"{p}/scaled"),
        helper.make_node("ArgMax", [f"{p}/scaled"], [f"{p}/top"], name=f"{p}/top", axis=1, keepdims=1),
        helper.make_node("ArgMax", [margins], [f"{p}/class"], name=f"{p}/class", axis=1, keepdims=1),
        helper.make_node("GatherElements", [f"{p}/scaled", f"{p}/top"], [f"{p}/at_top"], name=f"{p}/at_top",
                         axis=1),
        helper.make_node("GatherElements", [f"{p}/scaled", f"{p}/class"], [f"{p}/at_class"],
                         name=f"{p}/at_class", axis=1),
        helper.make_node("ScatterElements", [f"{p}/scaled", f"{p}/top", f"{p}/at_class"], [f"{p}/half_swapped"],
                         name=f"{p}/half_swapped", axis=1),
        helper.make_node("ScatterElements", [f"{p}/half_swapped", f"{p}/class", f"{p}/at_top"], [output],
                         name=f"{p}/swapped", axis=1),
    ]


class TemperatureFitter:
    """Fit an exit's ``scale`` so exited rows' top probability matches the full model's confidence.

    Parameters
    ----------
    bounds:
        Range of ``scale`` searched (inverse temperatures; 1 = the rule's own probabilities).
    """

    def __init__(self, bounds: tuple[float, float] = (0.01, 100.0)) -> None:
        self.bounds = bounds

    def fit(self, log_probs: np.ndarray, margins: np.ndarray, full_probabilities: np.ndarray) -> float:
        """The scale minimising the binary cross-entropy between each row's top probability under
        :func:`exited_logits` and ``full_probabilities`` (``[N, C]``) at the row's exit class."""
        low, high = self.bounds
        if not 0 < low < high:
            raise ValueError(f"bounds must satisfy 0 < low < high, got {self.bounds}")
        if not len(log_probs):
            return 1.0
        target = np.clip(full_probabilities[np.arange(len(margins)), margins.argmax(axis=1)], 1e-6, 1 - 1e-6)
        gaps = log_probs.astype(np.float64) - log_probs.max(axis=1, keepdims=True)  # <= 0, top class 0

        def loss(log_scale: float) -> float:
            others = np.exp(np.exp(log_scale) * gaps).sum(axis=1) - 1  # sum over the non-top classes
            log_top, log_rest = -np.log1p(others), np.log(np.maximum(others, 1e-300)) - np.log1p(others)
            return float(-(target * log_top + (1 - target) * log_rest).mean())

        result = minimize_scalar(loss, bounds=(np.log(low), np.log(high)), method="bounded",
                                 options={"xatol": 1e-4})
        return float(np.exp(result.x))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE: the row-weighted mean over ``bins`` equal-width confidence bins of |accuracy - mean confidence|."""
    if not len(confidence):
        return 0.0
    edges = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    error = 0.0
    for b in np.unique(edges):
        in_bin = edges == b
        error += in_bin.sum() * abs(float(correct[in_bin].mean()) - float(confidence[in_bin].mean()))
    return error / len(confidence)


@dataclass
class ExitedConfidence:
    """How confident exited rows are, as compiled and as the full model is on the same rows (estimates).

    ``ece_*`` are against the labels (None without labels); ``gap`` is the mean |compiled top
    probability - the full model's probability of that class|.
    """

    rows: int
    mean_top_probability: float
    mean_top_probability_uncalibrated: float
    mean_top_probability_full_model: float
    gap: float
    ece: float | None
    ece_uncalibrated: float | None
    ece_full_model: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def exited_confidence(carried: np.ndarray, margins: np.ndarray, full_probabilities: np.ndarray,
                      labels: np.ndarray | None) -> ExitedConfidence:
    """Compare exited rows' probabilities with the full model's on the same rows.

    Per exited row: the logits it ``carried`` (e.g. :func:`exited_logits`) and the ``margins`` at the
    exit it took; uncalibrated = the softmax of the margins (what exited rows carried before scales).
    """
    calibrated = softmax(carried.astype(np.float64), axis=1)
    margins_finite = np.where(np.isfinite(margins), margins, np.finfo(np.float32).min)
    uncalibrated = softmax(margins_finite.astype(np.float64), axis=1)
    cls = margins.argmax(axis=1)
    rows = np.arange(len(cls))
    full_top, full_class = full_probabilities.max(axis=1), full_probabilities.argmax(axis=1)
    top, raw_top = calibrated.max(axis=1), uncalibrated.max(axis=1)

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if len(values) else 0.0

    def ece(confidence: np.ndarray, predicted: np.ndarray) -> float | None:
        return None if labels is None else expected_calibration_error(confidence, predicted == labels)

    return ExitedConfidence(len(cls), mean(top), mean(raw_top), mean(full_top),
                            mean(np.abs(top - full_probabilities[rows, cls])),
                            ece(top, cls), ece(raw_top, cls), ece(full_top, full_class))
