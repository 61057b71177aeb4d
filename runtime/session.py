"""ExitSession: run a compiled (or any) ONNX classifier with onnxruntime and count exits."""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from moco_compile.constants import EXIT_OUTPUT


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build and machine have it, CPU otherwise."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def make_session(model: str | os.PathLike | onnx.ModelProto | bytes,
                 providers: list[str] | None = None, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session with full graph optimisation and quiet logging."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    return ort.InferenceSession(model, options, providers=providers or default_providers())


class ExitSession:
    """Run a compiled classifier; outputs keep the original names plus ``moco_exit``.

    ``exit_counts`` accumulates how many rows took each exit (key -1: full network).
    """

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        self.session = make_session(model, providers, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.exit_counts: dict[int, int] = {}

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output by name."""
        values = self.session.run(self.output_names, {name: feed[name] for name in self.input_names})
        outputs = dict(zip(self.output_names, values))
        if EXIT_OUTPUT in outputs:
            taken, counts = np.unique(outputs[EXIT_OUTPUT], return_counts=True)
            for exit_index, count in zip(taken.tolist(), counts.tolist()):
                self.exit_counts[exit_index] = self.exit_counts.get(exit_index, 0) + count
        return outputs

    @property
    def exit_rates(self) -> dict[int, float]:
        """Fraction of rows seen so far that took each exit."""
        total = sum(self.exit_counts.values()) or 1
        return {k: v / total for k, v in sorted(self.exit_counts.items())}
