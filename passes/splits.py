"""Which calibration rows fit rules, which certify, which report: sizes that adapt to the row count.

* ``rules``: fit the rules and design the plan families (cross-fitted scores);
* ``test``: certify one fixed sequence of plans (nothing else reads these rows
  before certification);
* ``report``: untouched rows for an unbiased report, set aside only when the
  calibration set is large (``PlannerConfig.report_min_rows``); small sets need
  every row for fitting and certifying.

Fixed fractions waste rows when n is small: the test split gets
``test_fraction`` of the rows, but never fewer than the fewest rows that can
certify a perfect plan, as long as ``min_design_rows`` remain for the rules.
"""
from __future__ import annotations

import math

import numpy as np

from moco_compile.errors import CalibrationDataError
from moco_compile.passes.bounds import rows_needed
from moco_compile.passes.config import Budget, PlannerConfig

SPLITS = ("rules", "test", "report")
SPLIT_COLUMN = "split"  # frame column: index into SPLITS


def split_sizes(rows: int, budget: Budget, config: PlannerConfig) -> dict[str, int]:
    """Rows per split for a calibration set of ``rows`` rows."""
    report = min(round(config.report_fraction * rows), config.max_report_rows) \
        if rows >= config.report_min_rows else 0
    usable = rows - report
    needed = min_test_rows(budget, config)
    test = max(math.ceil(config.test_fraction * usable), min(needed, usable - config.min_design_rows))
    return {"rules": usable - test, "test": test, "report": report}


def min_test_rows(budget: Budget, config: PlannerConfig) -> int:
    """Fewest test rows on which a plan with no disagreement at all certifies the budget."""
    confidence = 1 - config.family_delta(budget)
    needed = rows_needed(budget.max_disagreement, confidence)
    if budget.max_accuracy_drop is not None:
        needed = max(needed, rows_needed(budget.max_accuracy_drop, confidence))
    return needed


def min_calibration_rows(budget: Budget, config: PlannerConfig) -> int:
    """Fewest calibration rows that can certify any plan with exits."""
    return min_test_rows(budget, config) + config.min_design_rows


def assign_splits(rows: int, seed: int, budget: Budget, config: PlannerConfig) -> np.ndarray:
    """Index into :data:`SPLITS` for each of ``rows`` rows, at random (seeded).

    Raises :class:`CalibrationDataError` naming how many rows are needed when the
    test split cannot certify even a perfect plan.
    """
    sizes = split_sizes(rows, budget, config)
    if sizes["test"] < min_test_rows(budget, config) or sizes["rules"] < config.min_design_rows:
        raise CalibrationDataError(too_few_rows_message(rows, budget, config))
    labels = np.repeat(np.arange(len(SPLITS)), [sizes[name] for name in SPLITS])
    return np.random.default_rng(seed).permutation(labels)


def too_few_rows_message(rows: int, budget: Budget, config: PlannerConfig) -> str:
    """What is missing when ``rows`` calibration rows cannot certify the budget."""
    needed = min_test_rows(budget, config)
    accuracy = "" if budget.max_accuracy_drop is None else f" and --max-accuracy-drop {budget.max_accuracy_drop:g}"
    return (f"too few calibration rows: {rows} given, at least {min_calibration_rows(budget, config)} needed. "
            f"Certifying --max-disagreement {budget.max_disagreement:g}{accuracy} at --confidence "
            f"{budget.confidence:g} needs {needed} test rows even if the plan never disagrees, plus "
            f"{config.min_design_rows} rows to fit the rules on. Give more rows, raise the budget, or lower "
            "the confidence (--allow-no-exit emits the unchanged graph instead)")
