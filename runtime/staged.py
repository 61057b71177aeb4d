"""Run a bucketed compiled graph stage by stage, for low latency on GPUs.

:class:`StagedSession` cuts the compiled graph back into one model per (stage, bucket)
(:mod:`~moco_compile.runtime.stage_graphs`, guided by plan.json) and runs them in turn: the rows
continuing past an exit are gathered on the device into the smallest bucket that holds them, each
stage's session runs with its inputs and outputs bound once, and the exit's ``keep`` flags are the
one tensor read back to the host per exit reached.  On CUDA each (stage, bucket) session captures
one CUDA graph (onnxruntime's ``enable_cuda_graph``; one graph per session, the default
``gpu_graph_id``) and replays it, so a stage costs one launch instead of one per node.  On CPU the
same stages run without capture.  Rows, exits and outputs equal the single graph's.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from moco_compile.constants import EXIT_OUTPUT
from moco_compile.errors import MocoError
from moco_compile.runtime.session import CUDA, default_providers, make_session, provider_names
from moco_compile.runtime.stage_graphs import PlanMismatchError, StageGraph, plan_buckets, stage_graphs

log = logging.getLogger("moco")


class StagedSession:
    """Run a bucketed compiled classifier (``moco compile --target cuda``) stage by stage.

    Parameters
    ----------
    model:
        The compiled model.onnx (path or ``onnx.ModelProto``), laid out bucketed.
    plan:
        Its plan.json (path, or the parsed mapping): the exits and batch buckets to cut it by.
    providers:
        Execution providers (``cuda``, ``cpu`` or full names); default CUDA when available, else CPU.
    cuda_graph:
        Capture one CUDA graph per (stage, bucket); default on CUDA, and refused elsewhere.
    """

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, plan: str | os.PathLike | Mapping,
                 providers: Sequence[str] | None = None, threads: int | None = None,
                 cuda_graph: bool | None = None) -> None:
        name = "the model" if isinstance(model, onnx.ModelProto) else str(model)
        compiled = model if isinstance(model, onnx.ModelProto) else _load_model(model)
        record = plan if isinstance(plan, Mapping) else _load_plan(plan)
        self.graphs = stage_graphs(compiled, record, name)
        self.exits, self.buckets = plan_buckets(record, name)
        self.input_names = [value.name for value in compiled.graph.input
                            if value.name not in {init.name for init in compiled.graph.initializer}]
        self._outputs = list(compiled.graph.output)
        self.output_names = [value.name for value in self._outputs]
        if self.output_names[-1:] != [EXIT_OUTPUT]:
            raise PlanMismatchError(f"{name} is not a graph moco compiled: its last output is not {EXIT_OUTPUT}")
        self.providers = provider_names(providers) or default_providers()
        self.device = "cuda" if self.providers[0] == CUDA and CUDA in ort.get_available_providers() else "cpu"
        if cuda_graph and self.device != "cuda":
            raise MocoError("CUDA graphs need the CUDA execution provider, and this session runs on the CPU: "
                            "pass cuda_graph=False, or install onnxruntime-gpu on a machine with a GPU")
        self.capture = self.device == "cuda" if cuda_graph is None else cuda_graph
        self.threads = threads
        self._stages: dict[tuple, _Stage] = {}
        self._gathers: dict[tuple[str, int], ort.InferenceSession] = {}
        self._lock = threading.Lock()  # bound buffers: one batch at a time

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output by name, ``moco_exit`` included (as the single graph would), in
        arrays of the caller's own."""
        missing = [name for name in self.input_names if name not in feed]
        if missing:
            raise MocoError(f"the feed lacks the model input(s) {missing}; the model takes {self.input_names}")
        rows = {len(feed[name]) for name in self.input_names}
        if len(rows) != 1:
            raise MocoError(f"the inputs {self.input_names} hold different numbers of rows ({sorted(rows)})")
        count = rows.pop()
        if not count:  # as the graph does: no stage runs on 0 rows
            return {value.name: np.zeros([0, *(d.dim_value for d in value.type.tensor_type.shape.dim[1:])],
                                         helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
                    for value in self._outputs}
        with self._lock:
            sources = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feed[name]), self.device, 0)
                       for name in self.input_names}
            results = self._level(0, sources, None, count)
            # copies: the arrays hold the stages' bound output buffers, which the next batch overwrites
            return {name: values[:count].copy() for name, values in zip(self.output_names, results)}

    def bucket_for(self, count: int) -> int | None:
        """The smallest bucket holding ``count`` rows; None for 0 rows or more than the largest bucket
        (then the stage runs on exactly its rows)."""
        return next((bucket for bucket in self.buckets if count <= bucket), None) if count else None

    def _level(self, stage: int, sources: dict[str, ort.OrtValue], order: np.ndarray | None,
               count: int) -> list[np.ndarray]:
        """Stage ``stage`` on the first ``count`` rows of ``order`` (None: the batch itself) and every
        stage after it: one array per output, then the exit ids, on this stage's rows."""
        bucket = self.bucket_for(count)
        if order is None:
            positions = None if bucket is None else np.minimum(np.arange(bucket), count - 1)
        else:
            positions = order[:bucket or count]
        outputs = self._stage(stage, bucket, sources).run(sources, positions, count, self._gather)
        names = self.output_names[:-1]
        if stage == self.exits:
            values = [outputs[f"out/{name}"].numpy() for name in names]
            return values + [np.full(len(values[0]), -1, np.int64)]
        keep = outputs["keep"].numpy()  # the exit's one read back to the host
        continuing = np.flatnonzero(keep)
        rest = None
        if len(continuing):
            carried = {role.split("/", 1)[1]: value for role, value in outputs.items() if role.startswith("carry/")}
            rest = self._level(stage + 1, carried, np.concatenate([continuing, np.flatnonzero(~keep)]),
                               len(continuing))
        values = [outputs[f"exited/{name}"].numpy() for name in names] + [np.full(len(keep), stage, np.int64)]
        for value, continued in zip(values, rest or []):
            value[continuing] = continued[:len(continuing)]
        return values

    def _stage(self, stage: int, bucket: int | None, sources: Mapping[str, ort.OrtValue]) -> "_Stage":
        graph = self.graphs[(stage, bucket)]
        signature = tuple(tuple(sources[tensor].shape()[1:]) for tensor in graph.gathers.values())
        key = (stage, bucket, signature if bucket is not None else None)
        if key not in self._stages:
            self._stages[key] = _Stage(graph, self.providers, self.threads, self.device,
                                       self.capture and bucket is not None)
        return self._stages[key]

    def _gather(self, source: ort.OrtValue, positions: ort.OrtValue, into: ort.OrtValue | None) -> ort.OrtValue:
        """``source``'s rows at ``positions``, on the device, written into ``into`` when given."""
        key = (source.data_type(), len(source.shape()))
        if key not in self._gathers:
            self._gathers[key] = make_session(_gather_model(*key), self.providers, self.threads, spinning=False)
        session = self._gathers[key]
        binding = session.io_binding()
        binding.bind_ortvalue_input("x", source)
        binding.bind_ortvalue_input("positions", positions)
        if into is None:
            binding.bind_output("y", self.device)
        else:
            binding.bind_ortvalue_output("y", into)
        session.run_with_iobinding(binding)
        return into if into is not None else binding.get_outputs()[0]


class _Stage:
    """One (stage, bucket) model's session; a bucket's inputs and outputs live in buffers bound once
    (what a captured CUDA graph needs), the exact-rows instance's are allocated per call."""

    def __init__(self, graph: StageGraph, providers: Sequence[str], threads: int | None, device: str,
                 capture: bool) -> None:
        self.graph, self.device = graph, device
        self.fixed = graph.bucket is not None
        self.captured = False
        if capture:
            try:
                self.session = make_session(graph.model, providers, threads, {"enable_cuda_graph": "1"}, spinning=False)
                self.captured = True
            except Exception as error:  # onnxruntime refuses capture when a node runs on the CPU
                log.warning("stage %d, bucket %s runs without a CUDA graph: %s", graph.stage, graph.bucket, error)
        if not self.captured:
            self.session = make_session(graph.model, providers, threads, spinning=False)
        self.inputs: dict[str, ort.OrtValue] = {}
        self.outputs: dict[str, ort.OrtValue] = {}
        self.binding: ort.IOBinding | None = None
        self.reuse = False  # the binding holds fixed buffers for every input and output

    def run(self, sources: Mapping[str, ort.OrtValue], positions: np.ndarray | None, count: int,
            gather) -> dict[str, ort.OrtValue]:
        """Gather the rows into the inputs, run, and return the outputs by role."""
        index = None if positions is None else ort.OrtValue.ortvalue_from_numpy(positions.astype(np.int64),
                                                                                self.device, 0)
        values = {}
        for name, tensor in self.graph.gathers.items():
            source = sources[tensor]
            if index is None:
                values[name] = source
                continue
            if self.fixed and name not in self.inputs:
                self.inputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(
                    [len(positions), *source.shape()[1:]], _numpy_type(source.data_type()), self.device, 0)
            values[name] = gather(source, index, self.inputs.get(name))
        if self.graph.count is not None:
            rows = np.array([count], np.int64)
            if self.fixed and self.graph.count in self.inputs:
                self.inputs[self.graph.count].update_inplace(rows)
            else:
                self.inputs[self.graph.count] = ort.OrtValue.ortvalue_from_numpy(rows, self.device, 0)
            values[self.graph.count] = self.inputs[self.graph.count]
        if not self.reuse:
            self.binding = self._bind(values)
        self.session.run_with_iobinding(self.binding)
        outputs = self.outputs if self.reuse else dict(
            zip([o.name for o in self.session.get_outputs()], self.binding.get_outputs()))
        return {self.graph.roles[name]: value for name, value in outputs.items()}

    def _bind(self, values: Mapping[str, ort.OrtValue]) -> ort.IOBinding:
        """A binding of ``values`` and of the outputs: into buffers allocated once when the instance has a
        bucket and its outputs' shapes follow from the inputs' (then :attr:`reuse`), else allocated per run."""
        binding = self.session.io_binding()
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        dims = {dim: size for spec in self.session.get_inputs() if spec.name in values
                for dim, size in zip(spec.shape, values[spec.name].shape()) if isinstance(dim, str)}
        shapes = {spec.name: [dims.get(dim) if isinstance(dim, str) else dim for dim in spec.shape]
                  for spec in self.session.get_outputs()}
        self.reuse = self.fixed and all(isinstance(size, int) for shape in shapes.values() for size in shape)
        for spec in self.session.get_outputs():
            if self.reuse:
                self.outputs[spec.name] = ort.OrtValue.ortvalue_from_shape_and_type(
                    shapes[spec.name], _numpy_type(spec.type), self.device, 0)
                binding.bind_ortvalue_output(spec.name, self.outputs[spec.name])
            else:
                binding.bind_output(spec.name, self.device)
        if self.captured and not self.reuse:
            raise MocoError(f"stage {self.graph.stage}, bucket {self.graph.bucket}: its outputs' shapes do not "
                            "follow from its inputs', so no CUDA graph can be captured; pass cuda_graph=False")
        return binding


_ONNX_TYPES = {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16,
               "tensor(double)": onnx.TensorProto.DOUBLE, "tensor(bool)": onnx.TensorProto.BOOL,
               "tensor(int64)": onnx.TensorProto.INT64, "tensor(int32)": onnx.TensorProto.INT32,
               "tensor(bfloat16)": onnx.TensorProto.BFLOAT16}


def _numpy_type(type_name: str) -> np.dtype:
    """The numpy dtype of an onnxruntime type name such as ``tensor(float)``."""
    return helper.tensor_dtype_to_np_dtype(_ONNX_TYPES[type_name])


def _gather_model(type_name: str, rank: int) -> onnx.ModelProto:
    """``y = Gather(x, positions)`` along rows, for tensors of ``type_name`` and ``rank``."""
    elem = _ONNX_TYPES[type_name]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["x", "positions"], ["y"], axis=0)], "moco_gather_rows",
        [helper.make_tensor_value_info("x", elem, [f"d{i}" for i in range(rank)]),
         helper.make_tensor_value_info("positions", onnx.TensorProto.INT64, ["rows"])],
        [helper.make_tensor_value_info("y", elem, ["rows", *[f"d{i}" for i in range(1, rank)]])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _load_model(path: str | os.PathLike) -> onnx.ModelProto:
    try:
        return onnx.load(os.fspath(path))
    except Exception as error:  # onnx raises its own (and protobuf's) error types
        raise MocoError(f"cannot read the compiled model {path}: {error}") from error


def _load_plan(path: str | os.PathLike) -> Mapping:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise PlanMismatchError(f"cannot read plan.json {path}: {error}") from error
    if not isinstance(record, Mapping):
        raise PlanMismatchError(f"{path} holds no plan (a JSON object); pass the plan.json of the build")
    return record
