"""A linear rule's thresholds, strictest first: rows fired and errors at each, and where to stop
(the last precise threshold, or the last one a fixed-sequence test certifies)."""
from __future__ import annotations

import numpy as np

from moco_compile.passes.planning.bounds import clopper_pearson_upper, rows_needed


def threshold_table(scores: np.ndarray, hits: np.ndarray) -> dict[str, np.ndarray]:
    """For each distinct score, the rule ``score > threshold`` firing on that score and all
    higher ones: ``thresholds`` (between that score and the next lower), ``fired``, ``errors``."""
    order = np.argsort(-scores, kind="stable")
    ranked, ranked_hits = scores[order], hits[order]
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # last row of each tie group
    fired = ends + 1
    correct = np.cumsum(ranked_hits)[ends]
    upper = ranked[ends]
    lower = np.r_[ranked[ends[:-1] + 1], -np.inf]
    with np.errstate(invalid="ignore", over="ignore"):
        thresholds = lower + (upper - lower) / 2
    thresholds = np.where(np.isfinite(lower), thresholds, upper - np.maximum(1.0, np.abs(upper)) * 1e-6)
    thresholds = np.where(thresholds >= upper, lower, thresholds)  # adjacent floats: keep upper > threshold
    return {"thresholds": thresholds, "fired": fired, "errors": fired - correct}


def last_precise(fired: np.ndarray, errors: np.ndarray, precision: float) -> int:
    """Index of the last threshold of the first run (strictest first) whose precision among
    fired rows, ``(fired - errors) / fired``, is at least ``precision``; -1 when none is."""
    reached = (fired - errors) / fired >= precision
    if not reached.any():
        return -1
    first = int(np.argmax(reached))
    failed = np.flatnonzero(~reached[first:])
    return first + int(failed[0]) - 1 if len(failed) else len(reached) - 1


def last_certified(fired: np.ndarray, errors: np.ndarray, precision: float, confidence: float) -> int:
    """Fixed-sequence test of "precision among fired rows >= ``precision``": index of the last
    threshold before the first whose one-sided Clopper-Pearson upper bound of the error rate at
    ``confidence`` exceeds ``1 - precision``, starting at the first threshold firing on enough
    rows for the bound to be reachable; -1 when the first tested threshold fails.  Why the
    thresholds, taken from the held-out scores themselves, still give a valid certificate, and
    the monotone-precision assumption the data-dependent start needs: see
    :meth:`~moco_compile.analytics.AnalyticsEngine.compute_linear_sufficient_rule`."""
    start = int(np.searchsorted(fired, rows_needed(1 - precision, confidence)))
    failed = np.flatnonzero(clopper_pearson_upper(errors[start:], fired[start:], confidence) > 1 - precision)
    passed = int(failed[0]) if len(failed) else len(fired) - start
    return start + passed - 1 if passed else -1

