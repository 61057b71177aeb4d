"""Latency of onnxruntime sessions, measured side by side in one process."""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

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


def compare_latency(sessions: Mapping[str, ort.InferenceSession], inputs: Mapping[str, np.ndarray],
                    batch_size: int, min_seconds: float = 1.0, rounds: int = 5) -> dict[str, float]:
    """Median seconds per batch of each session over the same batches of ``batch_size`` rows,
    measuring for about ``min_seconds`` per session in all."""
    batches = batches_of(inputs, batch_size)
    slowest = max(_one_pass(session, batches[:3]) / min(3, len(batches)) for session in sessions.values())
    repeats = max(1, math.ceil(min_seconds / rounds / max(slowest * len(batches), 1e-9)))
    timings = compare_passes(sessions, batches * repeats, rounds, warmup=0)
    return {name: float(np.median(values)) / (len(batches) * repeats) for name, values in timings.items()}
