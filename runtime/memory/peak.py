"""Measured peak memory of one onnxruntime run, in a fresh process.

The process's peak resident set (Linux ``VmHWM``) is reset through ``/proc/self/clear_refs``
after the session is built and the inputs are in memory, so the peak read after ``run`` is
what the run itself added: activations, kernel workspaces and the outputs.  glibc's mmap
threshold is fixed at 64 KiB in that process, so a freed tensor goes back to the kernel at
once instead of being kept for reuse, and every run adds the same bytes.  A fresh process
(a new interpreter, not a fork) keeps freed pages of earlier work from hiding new allocations,
and works whatever the caller's ``__main__`` looks like.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moco_compile.errors import MocoError

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK = "5"


class MemoryMeasurementError(MocoError):
    """The peak could not be measured on this platform or the run failed."""


@dataclass(frozen=True)
class MeasuredPeak:
    """Bytes one run added to the process's resident memory, and how the session was set up."""

    run_bytes: int
    default_session: bool


def can_measure() -> bool:
    """True where the kernel lets a process reset its own peak resident set (Linux)."""
    return _STATUS.exists() and _CLEAR_REFS.exists()


def measure_peak(model_bytes: bytes, feed: Mapping[str, np.ndarray], *, default_session: bool = False,
                 timeout_s: float = 300.0) -> MeasuredPeak:
    """Peak resident bytes one ``session.run`` on ``feed`` adds, measured in a spawned process.

    ``default_session=False`` runs the graph as written (graph optimisations and the CPU memory
    arena off) and measures a second run: what the graph's tensors and kernels need, the figure
    a liveness estimate predicts.  ``default_session=True`` measures the first run of a session
    with onnxruntime's defaults (fusions on; the arena rounds allocations up and keeps them):
    what a deployment pays.
    The session runs on one intra-op thread, so kernel workspaces are counted once.
    """
    if not can_measure():
        raise MemoryMeasurementError("measuring peak memory needs Linux's /proc/self/clear_refs")
    with tempfile.TemporaryDirectory(prefix="moco-memory-") as scratch:
        Path(scratch, "model.onnx").write_bytes(model_bytes)
        np.savez(Path(scratch, "feed.npz"), **feed)
        # run this file as a script: a package directory in the caller's cwd must not shadow the installed one
        command = [sys.executable, __file__, scratch, "default" if default_session else "as-written"]
        try:
            finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                      env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        except subprocess.TimeoutExpired as error:
            raise MemoryMeasurementError(f"the measuring run took more than {timeout_s:.0f} s") from error
    if finished.returncode != 0:
        reason = (finished.stderr.strip().splitlines() or ["no message"])[-1]
        raise MemoryMeasurementError(f"the measuring run failed: {reason}")
    return MeasuredPeak(run_bytes=json.loads(finished.stdout.strip().splitlines()[-1]),
                        default_session=default_session)


def _child(scratch: str, default_session: bool) -> None:
    """Entry point of the measuring process: prints the bytes the run added as JSON."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not default_session:
        options.enable_cpu_mem_arena = False
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(Path(scratch, "model.onnx")), options, providers=["CPUExecutionProvider"])
    with np.load(Path(scratch, "feed.npz")) as stored:
        feed = {name: np.ascontiguousarray(stored[name]) for name in stored.files}
    if not default_session:
        session.run(None, feed)
    before = _resident_kib()["VmRSS"]
    _CLEAR_REFS.write_text(_RESET_PEAK)
    outputs = session.run(None, feed)
    peak = _resident_kib()["VmHWM"]
    del outputs
    print(json.dumps(max(0, peak - before) * 1024))


def _resident_kib() -> dict[str, int]:
    values = {}
    for line in _STATUS.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2] == "default")
