"""Latency of onnxruntime sessions, measured side by side in one process."""
from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort


def batches_of(inputs: Mapping[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Split inputs into full batches of ``batch_size`` rows (rows are reused cyclically if too few)."""
    rows = len(next(iter(inputs.values())))
    count = max(1, rows // batch_size)
    order = np.resize(np.arange(rows), count * batch_size)
    return [{name: values[order[i * batch_size:(i + 1) * batch_size]] for name, values in inputs.items()}
            for i in range(count)]


def compare_latency(sessions: Mapping[str, ort.InferenceSession], inputs: Mapping[str, np.ndarray],
                    batch_size: int, min_seconds: float = 1.0, rounds: int = 5) -> dict[str, float]:
    """Median seconds per batch of each session over the same batches.

    Sessions alternate within each round so drift in machine load hits all alike.
    """
    batches = batches_of(inputs, batch_size)
    for session in sessions.values():  # warm-up
        for batch in batches[:3]:
            session.run(None, batch)
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            started, runs = time.perf_counter(), 0
            while True:
                for batch in batches:
                    session.run(None, batch)
                runs += len(batches)
                elapsed = time.perf_counter() - started
                if elapsed >= min_seconds / rounds:
                    break
            timings[name].append(elapsed / runs)
    return {name: float(np.median(values)) for name, values in timings.items()}
