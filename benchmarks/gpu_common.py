"""Sessions for the GPU benchmarks (``gpu_check.py``, ``bench_served_shapes.py``): which provider, how a
session starts, and runners that time like ``session.run`` with host arrays in and out.

``MOCO_GPU_CHECK_PROVIDER=CPUExecutionProvider`` makes every benchmark a dry run on this machine.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from moco_compile.runtime.session import CPU, CUDA

ACCELERATOR = os.environ.get("MOCO_GPU_CHECK_PROVIDER", CUDA)  # CPUExecutionProvider: a dry run here
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}


def session(model: str | bytes, provider: str = ACCELERATOR, **options) -> ort.InferenceSession:
    """An onnxruntime session on ``provider`` (with these provider ``options``), CPU as the fallback for
    nodes it lacks; raises when ``provider`` did not start."""
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    providers = [(provider, options), CPU] if provider != CPU else [CPU]
    created = ort.InferenceSession(model, session_options, providers=providers)
    if created.get_providers()[0] != provider:
        raise RuntimeError(f"{provider} did not start: the session runs on {created.get_providers()}")
    return created


class BoundRunner:
    """A session bound once to fixed device buffers for one batch shape, with CUDA Graph capture on CUDA
    (``enable_cuda_graph``: the first run captures, later runs replay): ``run`` copies the host rows into
    the bound inputs, replays, and copies the outputs back, so it times like ``session.run`` does.
    On the CPU provider it is the same I/O binding without a graph (a dry run of the code path)."""

    def __init__(self, model: str | bytes, example: Mapping[str, np.ndarray], provider: str = ACCELERATOR,
                 **options) -> None:
        self.cuda_graph = provider == CUDA
        device = "cuda" if self.cuda_graph else "cpu"
        self.session = session(model, provider, **options, **({"enable_cuda_graph": "1"} if self.cuda_graph else {}))
        self.binding = self.session.io_binding()
        self.inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0)
                       for name, value in example.items()}
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        rows = len(next(iter(example.values())))
        for output in self.session.get_outputs():
            shape = [dim if isinstance(dim, int) else rows for dim in output.shape]
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, _NUMPY_TYPES[output.type], device, 0)
            self.binding.bind_ortvalue_output(output.name, value)
        self.session.run_with_iobinding(self.binding)  # the capture

    def run(self, _names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for ``feed`` (rows of the bound shape), as ``InferenceSession.run(None, feed)`` gives them."""
        for name, value in feed.items():
            self.inputs[name].update_inplace(np.ascontiguousarray(value))
        self.session.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()


class RunAdapter:
    """Anything with ``run(feeds) -> {output: array}`` in the graph's output order (moco's stage runner),
    timed like a session."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def run(self, _names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """``runner.run(feed)``'s outputs in order, called as ``InferenceSession.run(None, feed)``."""
        return list(self.runner.run(dict(feed)).values())
