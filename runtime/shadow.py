"""Shadow evaluation: the original and the compiled model side by side on a sample of real traffic.

Three jobs, one function each: :func:`shadow_run` serves the traffic through
both sessions batch by batch (alternating which runs first, so drift in machine
load hits both alike); :func:`stream_drift` cuts the stream into windows and
flags where exits fall or disagreement rises past the certified budget beyond
what binomial noise explains; :func:`project_savings` turns the measured time per
row into device-hours and money over a period at a given request rate.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom, fisher_exact

from moco_compile.constants import EXIT_OUTPUT
from moco_compile.runtime.session import ExitSession


@dataclass
class ShadowRun:
    """Per row: the original's class, the compiled model's class and the exit taken; and the
    seconds each model spent on all batches."""

    original_classes: np.ndarray
    compiled_classes: np.ndarray
    exits: np.ndarray
    original_seconds: float
    compiled_seconds: float

    @property
    def rows(self) -> int:
        return len(self.exits)

    @property
    def disagrees(self) -> np.ndarray:
        return self.original_classes != self.compiled_classes


def shadow_run(original: ExitSession, compiled: ExitSession, batches: Iterable[Mapping[str, np.ndarray]],
               output: str, on_batch: Callable[[int], None] | None = None,
               classes: Callable[[np.ndarray], np.ndarray] | None = None) -> ShadowRun:
    """Run every batch through both sessions; classes are ``classes(values of output)``, by default
    their argmax over axis 1 (a one-column binary output: ``BinaryOutput.classes``).

    ``on_batch(rows)`` is called after each batch (progress).
    """
    classes = classes or (lambda values: np.argmax(values, axis=1))
    parts: dict[str, list[np.ndarray]] = {"original": [], "compiled": [], "exits": []}
    seconds = {"original": 0.0, "compiled": 0.0}
    sessions = {"original": original, "compiled": compiled}
    for index, batch in enumerate(batches):
        order = ("original", "compiled") if index % 2 == 0 else ("compiled", "original")
        results = {}
        for name in order:
            started = time.perf_counter()
            results[name] = sessions[name].run(batch)
            seconds[name] += time.perf_counter() - started
        parts["original"].append(classes(results["original"][output]))
        parts["compiled"].append(classes(results["compiled"][output]))
        parts["exits"].append(results["compiled"][EXIT_OUTPUT])
        if on_batch is not None:
            on_batch(len(parts["exits"][-1]))
    joined = {name: np.concatenate(values) if values else np.zeros(0, np.int64) for name, values in parts.items()}
    return ShadowRun(joined["original"], joined["compiled"], joined["exits"], seconds["original"],
                     seconds["compiled"])


@dataclass
class Window:
    """One stretch of the traffic stream and what was flagged there."""

    start: int
    rows: int
    exit_rate: float
    disagreement: float
    exits_fell: bool
    disagreement_above_budget: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def stream_drift(exits: np.ndarray, disagrees: np.ndarray, expected_exit_rate: float, budget: float,
                 windows: int = 20, confidence: float = 0.95, min_window_rows: int = 200,
                 compile_rows: int | None = None) -> list[Window]:
    """Split the stream into at most ``windows`` consecutive windows of at least ``min_window_rows``
    rows and flag, at ``confidence`` over all windows together (Bonferroni), a window whose exit rate
    is below ``expected_exit_rate`` or whose disagreement is above ``budget`` by more than binomial
    noise explains.  (Small windows would flag the short runs of hard rows any real stream has.)

    ``compile_rows``: the rows the compile measured ``expected_exit_rate`` on.  That rate is an estimate
    too, so a window's exits are compared with those rows' by Fisher's exact test; taking it as exact
    (``None``: a binomial test) raises false alarms well past the stated level when it was measured on
    few rows (400: 15% of streams like the calibration data flagged, at a stated 5%)."""
    count = max(1, min(windows, len(exits) // min_window_rows))
    alpha = (1 - confidence) / count
    compile_exited = None if compile_rows is None else round(expected_exit_rate * compile_rows)
    result = []
    for rows in np.array_split(np.arange(len(exits)), min(count, len(exits))):
        exited = int((exits[rows] >= 0).sum())
        disagreed = int(disagrees[rows].sum())
        if compile_exited is None:
            exits_low = binom.cdf(exited, len(rows), expected_exit_rate)
        else:
            exits_low = fisher_exact([[exited, len(rows) - exited], [compile_exited, compile_rows - compile_exited]],
                                     alternative="less").pvalue
        result.append(Window(
            start=int(rows[0]), rows=len(rows), exit_rate=exited / len(rows), disagreement=disagreed / len(rows),
            exits_fell=bool(exits_low < alpha),
            disagreement_above_budget=bool(binom.sf(disagreed - 1, len(rows), budget) < alpha)))
    return result


def project_savings(seconds_per_row_original: float, seconds_per_row_compiled: float, qps: float,
                    days: float, utilisation: float, device_hour_price: float | None = None) -> dict:
    """Device-hours (and cost) to serve ``qps`` requests per second for ``days`` days with each model.

    Assumes the serving devices run at the measured time per row (the same batch size as measured)
    and are busy ``utilisation`` of the time they are paid for.
    """
    rows = qps * 86_400 * days
    hours = {name: rows * seconds / 3_600 / utilisation
             for name, seconds in (("original", seconds_per_row_original), ("compiled", seconds_per_row_compiled))}
    saved = hours["original"] - hours["compiled"]
    return {"requests": rows, "device_hours_original": hours["original"], "device_hours_compiled": hours["compiled"],
            "device_hours_saved": saved, "fraction_saved": saved / hours["original"] if hours["original"] else 0.0,
            "device_hour_price": device_hour_price,
            "cost_saved": None if device_hour_price is None else saved * device_hour_price}
