"""Latency of onnxruntime sessions, measured side by side in one process."""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort


def batches_of(inputs: Mapping[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Split inputs into full batches of ``batch_size`` rows (rows are reused cyclically if too few)."""
    rows = len(next(iter(inputs.values())))
    count = max(1, rows // batch_size)
    order = np.resize(np.arange(rows), count * batch_size)
    return [{name: values[order[i * batch_size:(i + 1) * batch_size]] for name, values in inputs.items()}
            for i in range(count)]


def _one_pass(session: ort.InferenceSession, batches: Sequence[Mapping[str, np.ndarray]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        session.run(None, batch)
    return time.perf_counter() - started


def compare_passes(sessions: Mapping[str, ort.InferenceSession], batches: Sequence[Mapping[str, np.ndarray]],
                   rounds: int = 3, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each pass over ``batches`` (batches may differ in shape), ``rounds`` passes per session.

    Sessions alternate within each round so drift in machine load hits all alike.
    """
    for session in sessions.values():
        _one_pass(session, batches[:warmup])
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            timings[name].append(_one_pass(session, batches))
    return timings


@dataclass(frozen=True)
class Timing:
    """Median seconds per batch of each session, and how many batches each session ran while timed."""

    seconds: dict[str, float]
    batches_timed: int


def time_sessions(sessions: Mapping[str, ort.InferenceSession], inputs: Mapping[str, np.ndarray],
                  batch_size: int, seconds: float = 1.0, rounds: int = 5) -> Timing:
    """Time ``sessions`` on the same batches of ``batch_size`` rows for about ``seconds`` per session
    (a three-batch probe included): fewer batches than ``inputs`` holds when a pass over all of them
    would take longer, the same batches repeated when it would be shorter; ``rounds`` passes each,
    alternating sessions, and the median pass."""
    batches = batches_of(inputs, batch_size)
    started = time.perf_counter()
    slowest = max(_one_pass(session, batches[:3]) / min(3, len(batches)) for session in sessions.values())
    seconds -= (time.perf_counter() - started) / len(sessions)  # the probe is part of the time
    wanted = max(1, int(seconds / rounds / max(slowest, 1e-9)))  # batches per timed pass
    batches = batches[:wanted] * max(1, math.ceil(wanted / len(batches)))
    timings = compare_passes(sessions, batches, rounds, warmup=0)
    return Timing({name: float(np.median(values)) / len(batches) for name, values in timings.items()},
                  rounds * len(batches))


def compare_latency(sessions: Mapping[str, ort.InferenceSession], inputs: Mapping[str, np.ndarray],
                    batch_size: int, min_seconds: float = 1.0, rounds: int = 5) -> dict[str, float]:
    """Median seconds per batch of each session over the same batches of ``batch_size`` rows,
    measuring for about ``min_seconds`` per session in all (:func:`time_sessions`)."""
    return time_sessions(sessions, inputs, batch_size, min_seconds, rounds).seconds
