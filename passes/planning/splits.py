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
Large sets waste them too: the rules split holds at most ``max_design_rows`` (the
driver fits and designs on them in memory), every other row certifies.

Which row goes where (:class:`RowSplit`) is a uniformly random assignment with
exactly these sizes, drawn block by block so that any range of rows can be
labelled on its own, in memory bounded by one block, whatever the row count:
the rows are cut into blocks of :data:`SPLIT_BLOCK_ROWS`; how many rows of each
split fall into each block is drawn first (a chain of multivariate
hypergeometric draws, the counts a uniform permutation would give), then each
block's labels are a seeded permutation of its counts.  A set of at most one
block is one seeded permutation of the labels.  Labels depend only on the row
count, the sizes and the seed, never on how the rows are sharded, so the
single-process and the Ray path split the same rows the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moco_compile.errors import CalibrationDataError
from moco_compile.passes.planning.bounds import rows_needed
from moco_compile.passes.planning.config import Budget, PlannerConfig

SPLITS = ("rules", "test", "report")
SPLIT_BLOCK_ROWS = 1 << 16  # rows labelled together (memory per labelled range: one block)


def split_sizes(rows: int, budget: Budget, config: PlannerConfig) -> dict[str, int]:
    """Rows per split for a calibration set of ``rows`` rows."""
    report = min(round(config.report_fraction * rows), config.max_report_rows) \
        if rows >= config.report_min_rows else 0
    usable = rows - report
    needed = min_test_rows(budget, config)
    test = max(math.ceil(config.test_fraction * usable), min(needed, usable - config.min_design_rows),
               usable - config.max_design_rows)
    return {"rules": usable - test, "test": test, "report": report}


def min_test_rows(budget: Budget, config: PlannerConfig, head_sets: int = 1) -> int:
    """Fewest test rows on which a plan with no disagreement at all certifies the budget, when ``head_sets``
    sets of exit heads are certified on them (each at that share of the error rate)."""
    confidence = 1 - config.family_delta(budget) / head_sets
    needed = rows_needed(budget.max_disagreement, confidence)
    if budget.max_accuracy_drop is not None:
        needed = max(needed, rows_needed(budget.max_accuracy_drop, confidence))
    return needed


def min_calibration_rows(budget: Budget, config: PlannerConfig) -> int:
    """Fewest calibration rows that can certify any plan with exits."""
    return min_test_rows(budget, config) + config.min_design_rows


def check_split_sizes(rows: int, budget: Budget, config: PlannerConfig) -> dict[str, int]:
    """:func:`split_sizes`, or a :class:`CalibrationDataError` naming how many rows are needed when
    the test split cannot certify even a perfect plan."""
    sizes = split_sizes(rows, budget, config)
    if sizes["test"] < min_test_rows(budget, config) or sizes["rules"] < config.min_design_rows:
        raise CalibrationDataError(too_few_rows_message(rows, budget, config))
    return sizes


def assign_splits(rows: int, seed: int, budget: Budget, config: PlannerConfig) -> np.ndarray:
    """Index into :data:`SPLITS` for each of ``rows`` rows, at random (seeded; see :class:`RowSplit`).

    Raises :class:`CalibrationDataError` naming how many rows are needed when the
    test split cannot certify even a perfect plan.
    """
    return RowSplit.draw(rows, seed, check_split_sizes(rows, budget, config)).labels(0, rows)


@dataclass(frozen=True)
class RowSplit:
    """Which of ``rows`` rows fit rules, certify or report: ``block_counts[b, s]`` rows of split ``s``
    in block ``b`` (blocks of :data:`SPLIT_BLOCK_ROWS` rows), arranged in each block by a permutation
    seeded with ``seed`` and the block.  Small (a few integers per block), so it travels to workers."""

    rows: int
    seed: int
    block_counts: np.ndarray

    @classmethod
    def draw(cls, rows: int, seed: int, sizes: dict[str, int]) -> "RowSplit":
        """The split of ``rows`` rows into ``sizes`` (per name in :data:`SPLITS`), seeded."""
        totals = np.array([sizes[name] for name in SPLITS], np.int64)
        if totals.sum() != rows:
            raise ValueError(f"split sizes {sizes} do not add up to {rows} rows")
        blocks = max(1, math.ceil(rows / SPLIT_BLOCK_ROWS))
        counts = np.zeros((blocks, len(SPLITS)), np.int64)
        rng = np.random.default_rng([seed, 0])  # block b's permutation draws from [seed, b] (b > 0)
        remaining = totals.copy()
        for block in range(blocks - 1):
            counts[block] = rng.multivariate_hypergeometric(remaining, SPLIT_BLOCK_ROWS)
            remaining -= counts[block]
        counts[-1] = remaining
        return cls(rows, seed, counts)

    def labels(self, start: int, stop: int) -> np.ndarray:
        """Index into :data:`SPLITS` of rows ``start`` to ``stop`` (exclusive)."""
        return self.labels_at(np.arange(start, stop))

    def labels_at(self, positions: np.ndarray) -> np.ndarray:
        """Index into :data:`SPLITS` of the rows at ``positions``, one block in memory at a time."""
        positions = np.asarray(positions, np.int64)
        if len(positions) and not (0 <= positions.min() and positions.max() < self.rows):
            raise ValueError(f"row positions {positions.min()}..{positions.max()} are not within the {self.rows} "
                             "split rows")
        labels = np.empty(len(positions), np.int64)
        blocks = positions // SPLIT_BLOCK_ROWS
        for block in np.unique(blocks):
            here = blocks == block
            labels[here] = self._block(int(block))[positions[here] - block * SPLIT_BLOCK_ROWS]
        return labels

    @property
    def sizes(self) -> dict[str, int]:
        """Rows per split name."""
        return {name: int(count) for name, count in zip(SPLITS, self.block_counts.sum(axis=0))}

    def positions(self, name: str) -> np.ndarray:
        """Sorted indices of the rows of split ``name``, one block in memory at a time."""
        split = SPLITS.index(name)
        return np.concatenate([np.flatnonzero(self._block(block) == split) + block * SPLIT_BLOCK_ROWS
                               for block in range(len(self.block_counts))])

    def _block(self, block: int) -> np.ndarray:
        labels = np.repeat(np.arange(len(SPLITS)), self.block_counts[block])
        return np.random.default_rng(self.seed if block == 0 else [self.seed, block]).permutation(labels)


def too_few_rows_message(rows: int, budget: Budget, config: PlannerConfig) -> str:
    """What is missing when ``rows`` calibration rows cannot certify the budget."""
    needed = min_test_rows(budget, config)
    accuracy = "" if budget.max_accuracy_drop is None else f" and --max-accuracy-drop {budget.max_accuracy_drop:g}"
    return (f"too few calibration rows: {rows} given, at least {min_calibration_rows(budget, config)} needed. "
            f"Certifying --max-disagreement {budget.max_disagreement:g}{accuracy} at --confidence "
            f"{budget.confidence:g} needs {needed} test rows even if the plan never disagrees, plus "
            f"{config.min_design_rows} rows to fit the rules on. Give more rows, raise the budget, or lower "
            "the confidence (--allow-no-exit emits the unchanged graph instead)")
