"""Measure, on this machine, the constants that price an exit (``moco profile-target``).

Three measurements, each on a small graph built with ``onnx.helper``, inputs and outputs bound on
the device, the median of repeats within a time budget:

1. ``exit_fixed_seconds``: a MatMul with and without one exit-like block before it (a rule, ReduceMax,
   NonZero of the rows that continue, a Gather of them, an ``If`` on their count, a ScatterND back), every
   row continuing, at batch 1 and :data:`MID_BATCH`; the median paired difference, less the copy of the
   rows at the larger batch, averaged over the two.
2. ``flops_per_second`` at :data:`BATCHES`: a chain of square MatMuls whose FLOPs are known exactly.
3. ``copy_bytes_per_second``: a Gather of permuted rows (each element read and written once).

The result is a plain dict in the target profile format (:data:`moco_compile.constants.TARGET_PROFILE_FIELDS`):
the runtime never imports the planner that reads it.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from moco_compile.constants import TARGET_PROFILE_FORMAT, TARGET_PROFILE_VERSION
from moco_compile.runtime.session import CUDA, GPU_PROVIDERS, open_session, provider_names

BATCHES = (1, 8, 64, 256)  # batch sizes the compute rate is measured at
MID_BATCH = 64  # the exit's fixed time is measured at batch 1 and here
DEFAULT_SECONDS = 12.0  # the whole profile's time budget, sessions included
# graph sizes per kind of device: (dense width, dense depth, exit width, rows and width of the copied tensor)
SIZES = {"cpu": (256, 8, 64, 4096, 256), "cuda": (2048, 8, 256, 65536, 256)}
MIN_REPEATS = 3
OPSET = 17


def profile_target(providers: Sequence[str] | None = None, seconds: float = DEFAULT_SECONDS) -> dict:
    """The target profile of this machine on ``providers`` (aliases ``cpu``, ``cuda``; default CUDA when
    this onnxruntime has it, else CPU), measured within about ``seconds``; a GPU asked for but missing
    raises :class:`~moco_compile.runtime.session.ProviderError`."""
    if not seconds > 0:
        raise ValueError(f"the profile's time budget must be a positive number of seconds, got {seconds!r}")
    names = provider_names(providers)
    if names is None:
        gpu = CUDA in ort.get_available_providers()
    else:
        gpu = bool(set(names) & set(GPU_PROVIDERS))
    kind = "cuda" if gpu else "cpu"
    width, depth, exit_width, copy_rows, copy_width = SIZES[kind]
    session = _opener(names or ([CUDA] if gpu else ["cpu"]), gpu)
    dense = session(_dense_graph(width, depth))
    provider = dense.get_providers()[0]
    device = "cuda" if provider == CUDA else "cpu"
    share = seconds / 10  # 4 dense batches, 2 x 2 exit timings, 1 copy, and room for the sessions
    rng = np.random.default_rng(0)
    rates = {}
    for batch in BATCHES:
        run = _BoundRun(dense, {"x": rng.standard_normal((batch, width), np.float32)}, device)
        rates[str(batch)] = 2.0 * width * width * depth * batch / _median(_repeat({"run": run}, share)["run"])
    copy = session(_gather_graph())
    table = rng.standard_normal((copy_rows, copy_width), np.float32)
    order = rng.permutation(copy_rows).astype(np.int64)
    copied = _median(_repeat({"run": _BoundRun(copy, {"x": table, "rows": order}, device)}, share)["run"])
    bandwidth = 2 * table.nbytes / copied
    base, exit_ = session(_matmul_graph(exit_width, with_exit=False)), session(_matmul_graph(exit_width, True))
    fixed = []
    for batch in (1, MID_BATCH):
        feed = {"x": rng.standard_normal((batch, exit_width), np.float32)}
        times = _repeat({"base": _BoundRun(base, feed, device), "exit": _BoundRun(exit_, feed, device)}, share)
        moved = 2 * 2 * feed["x"].nbytes / bandwidth  # the gather and the scatter back
        fixed.append(_median(np.subtract(times["exit"], times["base"])) - moved)
    return {"format": TARGET_PROFILE_FORMAT, "version": TARGET_PROFILE_VERSION,
            "name": "cpu" if device == "cpu" else f"cuda:{_gpu_name()[1]}", "provider": provider,
            "exit_fixed_seconds": max(0.0, float(np.mean(fixed))), "flops_per_second": rates,
            "copy_bytes_per_second": bandwidth, "machine": cpu_name() if device == "cpu" else _gpu_name()[0],
            "onnxruntime": f"onnxruntime {ort.__version__}", "measured_on": datetime.date.today().isoformat()}


def _opener(providers: Sequence[str], gpu: bool) -> Callable[[onnx.ModelProto], ort.InferenceSession]:
    """Open sessions on ``providers`` (CUDA's options, TF32 off among them, from the session module)."""
    return lambda model: open_session(model, providers, require_gpu=gpu)


class _BoundRun:
    """One run of a session on fixed inputs: copied to the device once, outputs left there."""

    def __init__(self, session: ort.InferenceSession, feed: dict[str, np.ndarray], device: str) -> None:
        self._session = session
        self._feed = feed  # on CPU the device values below share these arrays' memory
        self._values = {name: ort.OrtValue.ortvalue_from_numpy(array, device, 0) for name, array in feed.items()}
        self._binding = session.io_binding()
        for name, value in self._values.items():
            self._binding.bind_ortvalue_input(name, value)
        for output in session.get_outputs():
            self._binding.bind_output(output.name, device)

    def __call__(self) -> None:
        self._session.run_with_iobinding(self._binding)


def _repeat(runs: dict[str, Callable[[], None]], seconds: float) -> dict[str, list[float]]:
    """Seconds of each run, alternating, after one warm-up each, for about ``seconds`` in all
    (at least :data:`MIN_REPEATS` rounds)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    started = time.perf_counter()
    while len(times[next(iter(runs))]) < MIN_REPEATS or time.perf_counter() - started < seconds:
        for name, run in runs.items():
            begun = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - begun)
    return times


def _median(values: Sequence[float]) -> float:
    return float(np.median(values))


def _model(nodes: list, inputs: list, outputs: list, weights: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "moco-profile", inputs, outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _rows(name: str, width: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width])


def _weight(name: str, rows: int, columns: int) -> onnx.TensorProto:
    rng = np.random.default_rng(len(name))
    return numpy_helper.from_array((rng.standard_normal((rows, columns)) / math.sqrt(rows)).astype(np.float32), name)


def _dense_graph(width: int, depth: int) -> onnx.ModelProto:
    """``depth`` MatMuls by ``[width, width]`` weights: ``2 * width**2 * depth`` FLOPs per row."""
    nodes = [helper.make_node("MatMul", ["x" if k == 0 else f"h{k - 1}", f"w{k}"], [f"h{k}"]) for k in range(depth)]
    return _model(nodes, [_rows("x", width)], [_rows(f"h{depth - 1}", width)],
                  [_weight(f"w{k}", width, width) for k in range(depth)])


def _gather_graph() -> onnx.ModelProto:
    """Rows of ``x`` in the order ``rows`` gives."""
    return _model([helper.make_node("Gather", ["x", "rows"], ["y"], axis=0)],
                  [_rows("x", "E"), helper.make_tensor_value_info("rows", TensorProto.INT64, ["R"])],
                  [_rows("y", "E")], [])


def _matmul_graph(width: int, with_exit: bool) -> onnx.ModelProto:
    """``x @ w``; ``with_exit``: behind an exit-like block every row passes (see the module docstring)."""
    weights = [_weight("w", width, width)]
    if not with_exit:
        return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_rows("x", width)], [_rows("y", width)],
                      weights)
    weights += [_weight("rule", width, 8), numpy_helper.from_array(np.array(np.inf, np.float32), "never"),
                numpy_helper.from_array(np.array([-1], np.int64), "flat"),
                numpy_helper.from_array(np.array(0, np.int64), "zero"),
                numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    remainder = helper.make_graph([helper.make_node("MatMul", ["kept", "w"], ["ran"])], "remainder", [],
                                  [_rows("ran", width)])
    nothing = helper.make_graph([helper.make_node("Identity", ["kept"], ["none"])], "nothing", [],
                                [_rows("none", width)])
    nodes = [helper.make_node("MatMul", ["x", "rule"], ["scores"]),
             helper.make_node("ReduceMax", ["scores"], ["top"], axes=[1], keepdims=0),
             helper.make_node("Less", ["top", "never"], ["stay"]),
             helper.make_node("NonZero", ["stay"], ["where"]),
             helper.make_node("Reshape", ["where", "flat"], ["rows"]),
             helper.make_node("Gather", ["x", "rows"], ["kept"], axis=0),
             helper.make_node("Size", ["rows"], ["count"]),
             helper.make_node("Greater", ["count", "zero"], ["any"]),
             helper.make_node("If", ["any"], ["later"], then_branch=remainder, else_branch=nothing),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("ConstantOfShape", ["shape"], ["blank"]),
             helper.make_node("Unsqueeze", ["rows", "axis1"], ["at"]),
             helper.make_node("ScatterND", ["blank", "at", "later"], ["y"])]
    return _model(nodes, [_rows("x", width)], [_rows("y", width)], weights)


def cpu_name() -> str:
    """This CPU's model name and core count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            found = re.search(r"^model name\s*:\s*(.+)$", info.read(), re.MULTILINE)
        name = found.group(1).strip() if found else name
    except OSError:  # not Linux
        pass
    return f"{name}, {os.cpu_count()} cores"


def _gpu_name() -> tuple[str, str]:
    """The first GPU's name as ``nvidia-smi`` gives it, and as a target's device (``h100-80gb-hbm3``)."""
    smi = shutil.which("nvidia-smi")
    name = ""
    if smi:
        try:
            name = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10, check=False).stdout.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            name = ""
    device = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return name or "CUDA device (nvidia-smi not found)", device or "device"
