"""Run compiled (or any) ONNX classifiers with onnxruntime: provider choice, I/O binding, exit statistics.

:class:`ExitSession` picks the CUDA execution provider when this onnxruntime
build and this machine have it and CPU otherwise, logs one line saying which
(and why, when a GPU was asked for and is missing), binds inputs and outputs
explicitly on CUDA (one host-to-device copy per input, no per-call allocation
of outputs on the device), and keeps running statistics of the rows it served
(rows per exit, exit rates, mean FLOPs per row from the compiled graph's cost
metadata).  ``run`` is safe to call from several threads at once.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from moco_compile.constants import EXIT_OUTPUT, FLOPS_ORIGINAL_KEY, STAGE_FLOPS_KEY
from moco_compile.errors import MocoError

log = logging.getLogger("moco")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA, "tensorrt": TENSORRT, "trt": TENSORRT}
# Measured on an H100 (RESULTS.md "GPU (CUDA)"): TF32 matrix products, onnxruntime's CUDA default, moved
# 2 of 2,048 CNN rows and 17 of 2,000 text rows to another exit than the float32 run that certified the
# plan; cuDNN's default exhaustive search re-runs whenever a Conv's input shape changes, which the rows
# continuing past an exit do at every batch (compiled CNN, batch 64: 194 ms; no search: 14.5 ms).
CUDA_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}
GPU_INSTALL_HINT = ("install the GPU build alone: pip uninstall -y onnxruntime && "
                    "pip install 'moco-compile[gpu]' (onnxruntime-gpu needs CUDA 12/13 and cuDNN 9)")


class ProviderError(MocoError):
    """The execution provider the user demanded is not available."""


def provider_names(providers: Sequence[str] | None) -> list[str] | None:
    """Full onnxruntime provider names; accepts the aliases ``cpu``, ``cuda``/``gpu``, ``tensorrt``/``trt``."""
    if providers is None:
        return None
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    unknown = [p for p in names if not p.endswith("ExecutionProvider")]
    if unknown:
        raise ProviderError(f"unknown execution provider {unknown[0]!r}; use cpu, cuda, tensorrt or a full "
                            f"onnxruntime name such as {CUDA}")
    return names


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, then CPU."""
    available = ort.get_available_providers()
    return [p for p in (CUDA, CPU) if p in available]


def make_session(model: str | os.PathLike | onnx.ModelProto | bytes, providers: Sequence[str] | None = None,
                 threads: int | None = None, cuda_options: Mapping[str, str] | None = None,
                 spinning: bool = True) -> ort.InferenceSession:
    """An onnxruntime session with full graph optimisation and quiet logging; on CUDA with
    :data:`CUDA_OPTIONS`, updated by ``cuda_options`` (e.g. ``{"use_tf32": "1"}``: faster, not what
    was certified).  ``spinning=False`` stops its idle threads from spin-waiting: sessions that run
    one after another (the stage runner's) would otherwise take the cores from each other (reference
    CNN staged on 2 cores, batch 64: 96 ms spinning, 20 ms not)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif not isinstance(model, bytes):
        model = os.fspath(model)
    cuda = {**CUDA_OPTIONS, **(cuda_options or {})}
    chosen = [(name, cuda) if name == CUDA else name for name in providers or default_providers()]
    return ort.InferenceSession(model, options, providers=chosen)


def open_session(model: str | os.PathLike | onnx.ModelProto | bytes, providers: Sequence[str] | None = None,
                 threads: int | None = None, require_gpu: bool = False,
                 cuda_options: Mapping[str, str] | None = None) -> ort.InferenceSession:
    """A session on the requested providers (default: CUDA if present, else CPU), with one log line
    naming the provider it runs on and, when a GPU provider was asked for but is missing, why.

    A missing GPU provider falls back to CPU, or raises :class:`ProviderError` with ``require_gpu``.
    """
    requested = provider_names(providers) or [CUDA, CPU]
    available = ort.get_available_providers()
    usable = [p for p in requested if p in available]
    missing_gpu = [p for p in requested if p in GPU_PROVIDERS and p not in available]
    if require_gpu and not any(p in GPU_PROVIDERS for p in usable):
        raise ProviderError(f"a GPU was required but this onnxruntime ({_distribution()}) offers only "
                            f"{', '.join(available)}; {GPU_INSTALL_HINT}")
    if CPU not in usable:
        usable.append(CPU)
    try:
        session = make_session(model, usable, threads, cuda_options)
    except Exception as error:  # onnxruntime raises its own exception types
        raise MocoError(f"onnxruntime cannot load the model: {error}") from error
    running = session.get_providers()[0]
    if require_gpu and running not in GPU_PROVIDERS:
        raise ProviderError(f"a GPU was required but onnxruntime fell back to {running}: this machine has "
                            "no usable CUDA device or its CUDA/cuDNN libraries are missing")
    gpu_usable = [p for p in usable if p in GPU_PROVIDERS]
    if missing_gpu and providers is not None:
        log.warning("running on %s: %s was asked for, but this onnxruntime (%s) offers only %s; %s",
                    running, " and ".join(missing_gpu), _distribution(), ", ".join(available), GPU_INSTALL_HINT)
    elif gpu_usable and running not in GPU_PROVIDERS:
        log.warning("running on %s: onnxruntime offers %s but could not start it (no CUDA device, or its "
                    "CUDA/cuDNN libraries are missing)", running, " and ".join(gpu_usable))
    elif running not in GPU_PROVIDERS and providers is None:
        log.info("running on %s (this onnxruntime, %s, has no CUDA provider)", running, _distribution())
    else:
        log.info("running on %s", running)
    return session


def _distribution() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return "onnxruntime"


@dataclass
class ExitStatistics:
    """Rows served so far and where they left; ``stage_flops[k]`` is the cost of a row leaving at
    exit ``k`` (last entry: the full network), when the graph carries moco's cost metadata."""

    exit_counts: dict[int, int] = field(default_factory=dict)
    stage_flops: list[float] | None = None
    original_flops: float | None = None

    @property
    def rows(self) -> int:
        return sum(self.exit_counts.values())

    def add(self, exits: np.ndarray) -> None:
        """Count rows by the exit they took (``moco_exit`` values, -1: the full network)."""
        taken, counts = np.unique(exits, return_counts=True)
        for exit_index, count in zip(taken.tolist(), counts.tolist()):
            self.exit_counts[exit_index] = self.exit_counts.get(exit_index, 0) + count

    @property
    def exit_rates(self) -> dict[int, float]:
        """Fraction of rows that took each exit (key -1: the full network)."""
        rows = self.rows or 1
        return {k: v / rows for k, v in sorted(self.exit_counts.items())}

    @property
    def mean_flops(self) -> float | None:
        """Mean FLOPs per row served, rules included (None without cost metadata or rows)."""
        if self.stage_flops is None or not self.rows:
            return None
        return sum(self.stage_flops[k] * n for k, n in self.exit_counts.items()) / self.rows

    @property
    def compute_reduction(self) -> float | None:
        """1 - mean FLOPs per row / the original model's FLOPs per row."""
        mean = self.mean_flops
        return None if mean is None or not self.original_flops else 1 - mean / self.original_flops

    def to_dict(self) -> dict:
        return {"rows": self.rows, "exit_counts": {str(k): v for k, v in sorted(self.exit_counts.items())},
                "exit_rates": {str(k): v for k, v in self.exit_rates.items()},
                "mean_flops_per_row": self.mean_flops, "compute_reduction": self.compute_reduction}


class ExitSession:
    """Run a compiled classifier; outputs keep the original names plus ``moco_exit``.

    Parameters
    ----------
    model:
        The compiled ONNX file (or any ONNX model: then no exit statistics are kept).
    providers:
        Execution providers in order of preference (``cuda``, ``cpu``, ``tensorrt`` or full
        names).  Default: CUDA when available, else CPU.
    threads:
        onnxruntime's intra-op threads (default: onnxruntime's choice).
    require_gpu:
        Raise :class:`ProviderError` instead of falling back to CPU.
    io_binding:
        Bind inputs and outputs explicitly (default: on CUDA only).
    cuda_options:
        CUDA execution provider options over :data:`CUDA_OPTIONS` (TF32 off, no cuDNN search).
    """

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, providers: Sequence[str] | None = None,
                 threads: int | None = None, require_gpu: bool = False, io_binding: bool | None = None,
                 cuda_options: Mapping[str, str] | None = None) -> None:
        self.session = open_session(model, providers, threads, require_gpu, cuda_options)
        self.provider = self.session.get_providers()[0]
        self.io_binding = self.provider in GPU_PROVIDERS if io_binding is None else io_binding
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.statistics = ExitStatistics(
            stage_flops=json.loads(metadata[STAGE_FLOPS_KEY]) if STAGE_FLOPS_KEY in metadata else None,
            original_flops=float(metadata[FLOPS_ORIGINAL_KEY]) if FLOPS_ORIGINAL_KEY in metadata else None)
        self._lock = threading.Lock()

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output by name."""
        missing = [name for name in self.input_names if name not in feed]
        if missing:
            raise MocoError(f"the feed lacks the model input(s) {missing}; the model takes {self.input_names}")
        inputs = {name: np.ascontiguousarray(feed[name]) for name in self.input_names}
        try:
            values = self._run_bound(inputs) if self.io_binding else self.session.run(self.output_names, inputs)
        except Exception as error:  # onnxruntime raises its own exception types
            raise MocoError(f"onnxruntime could not run the batch: {error}; check the inputs' dtypes and "
                            f"shapes against the model's ({self.input_names})") from error
        outputs = dict(zip(self.output_names, values))
        if EXIT_OUTPUT in outputs:
            self._count(outputs[EXIT_OUTPUT])
        return outputs

    def _run_bound(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        binding = self.session.io_binding()  # one binding per call: calls may run in parallel
        for name, values in inputs.items():
            binding.bind_cpu_input(name, values)
        for name in self.output_names:
            binding.bind_output(name)  # onnxruntime allocates each output once, at its real shape
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _count(self, exits: np.ndarray) -> None:
        with self._lock:
            self.statistics.add(exits)

    @property
    def exit_counts(self) -> dict[int, int]:
        """Rows that took each exit so far (key -1: full network)."""
        return dict(self.statistics.exit_counts)

    @property
    def exit_rates(self) -> dict[int, float]:
        """Fraction of rows seen so far that took each exit."""
        return self.statistics.exit_rates
