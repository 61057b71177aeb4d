"""Export a moco build as an entry of a Triton Inference Server model repository.

``export_triton(build_dir, repository)`` writes ``REPOSITORY/NAME``::

    config.pbtxt        the model configuration (below)
    1/model.onnx        the build's graph, byte for byte
    1/model.py          --backend python only: runtime/triton/model.py (onnxruntime inside Triton)
    moco-manifest.json  what moco wrote, so that --force may replace it later

The configuration is read off the graph:

1. Every input and output keeps its name; its ONNX element type maps to Triton's ``TYPE_*``.
2. Axis 0 is the batch axis Triton fills (it must be dynamic); ``dims`` are the other axes,
   -1 where dynamic.  A tensor with only the batch axis (``moco_exit``: int64 ``[batch]``) is
   declared ``dims: [1]`` with ``reshape: { shape: [] }``, as Triton requires.
3. ``max_batch_size``, dynamic batching that prefers full batches (each exit's fixed cost is
   paid once per batch, so batch-64 latency gains more than batch-1) or the preferred sizes given,
   with the maximum queue delay given, ``instance_group`` with the count and kind asked for.
4. ``--backend onnxruntime``: ``platform: "onnxruntime_onnx"``.  ``--backend python``:
   ``backend: "python"`` and the parameter ``exit_output`` naming the exit output for model.py.

The text comes from ``tritonclient``'s ``ModelConfig`` protobuf when it is installed (the
``triton`` extra), else from :func:`_config_text`, which writes the same message by hand.
Writes follow ``moco_compile.outputs``: ``REPOSITORY/NAME`` is staged and swapped into place, and
nothing else in the repository is touched.
"""
from __future__ import annotations

import numbers
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from moco_compile.constants import EXIT_OUTPUT
from moco_compile.errors import MocoError, ModelError, OutputError
from moco_compile.outputs import build_model, listed_files, staged_output_dir

VERSION = "1"  # the model version directory Triton loads
CONFIG = "config.pbtxt"
MODEL = "model.onnx"
BACKENDS = ("onnxruntime", "python")
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
MAX_QUEUE_DELAY_US = 100  # how long dynamic batching waits to fill a batch
# Entry instances of a staged export: Triton runs a non-decoupled python model's async execute one
# call at a time per instance (triton-inference-server/server#7888), so only several instances put
# several calls' rows in the stage models' queues at once for their batchers to merge.
ENTRY_INSTANCES = 4
EXIT_PARAMETER = "exit_output"  # config parameter naming the exit output for the python backend
SPINNING_PARAMETER = "intra_op_spinning"  # config parameter: "0" = model.py's onnxruntime threads never spin
PYTHON_MODEL = Path(__file__).with_name("model.py")
DATA_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16", onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.STRING: "TYPE_STRING",
}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as Triton declares it: dims without the batch axis (-1 = dynamic);
    ``reshape`` is the shape the model sees when it differs from ``dims`` (else None)."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TritonSettings:
    """How Triton runs the model: checked on creation, each bad value named with what to give."""

    max_batch_size: int = 64
    instances: int = 1
    kind: str = "cpu"
    backend: str = "onnxruntime"
    preferred_batch_sizes: tuple[int, ...] = ()  # the batches dynamic batching aims for; () = (max_batch_size,)
    max_queue_delay_us: int = MAX_QUEUE_DELAY_US  # how long dynamic batching waits to fill one
    entry_instances: int = ENTRY_INSTANCES  # a staged export's entry model (runtime/triton/staged.py)

    def __post_init__(self) -> None:
        for field, value in (("max_batch_size", self.max_batch_size), ("instances", self.instances),
                             ("entry_instances", self.entry_instances),
                             *(("preferred_batch_sizes", size) for size in self.preferred_batch_sizes)):
            if not _whole(value) or value < 1:
                raise MocoError(f"--{field.replace('_', '-')} must be a whole number of at least 1, "
                                f"not {value!r}")
        too_large = [size for size in self.preferred_batch_sizes if size > self.max_batch_size]
        if too_large:
            raise MocoError(f"--preferred-batch-sizes {too_large[0]} is larger than --max-batch-size "
                            f"{self.max_batch_size}; Triton forms no batch beyond the maximum")
        if not _whole(self.max_queue_delay_us) or self.max_queue_delay_us < 0:
            raise MocoError(f"--max-queue-delay-us must be a whole number of microseconds, 0 or more, "
                            f"not {self.max_queue_delay_us!r}")
        if self.kind not in KINDS:
            raise MocoError(f"--kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.backend not in BACKENDS:
            raise MocoError(f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")

    @property
    def preferred(self) -> tuple[int, ...]:
        """The preferred batch sizes, ascending: those given, else the maximum alone (full batches)."""
        return tuple(sorted(set(self.preferred_batch_sizes))) or (self.max_batch_size,)


def _whole(value: object) -> bool:
    """Whether ``value`` is a whole number (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def export_triton(build_dir: str | os.PathLike, repository: str | os.PathLike, name: str | None = None,
                  settings: TritonSettings = TritonSettings(), force: bool = False) -> Path:
    """Write the moco build in ``build_dir`` as the model ``name`` of the Triton model repository
    ``repository``; returns ``repository/name``.

    ``name`` defaults to the build directory's name made into a valid model name.  An existing
    ``repository/name`` is replaced only when it is a previous export and ``force`` is given.
    """
    build_dir = Path(build_dir)
    model_path = build_model(build_dir)
    model = compiled_graph(model_path)
    name = model_name(build_dir) if name is None else checked_name(name)
    parameters = {EXIT_PARAMETER: EXIT_OUTPUT} if settings.backend == "python" else {}
    config = config_text(name, tensor_specs(model.graph.input, model.graph.initializer),
                         tensor_specs(model.graph.output), settings, parameters)
    target = Path(repository) / name
    check_previous_export(target)
    with staged_output_dir(target, [model_path], force) as staging:
        (staging / CONFIG).write_text(config, encoding="utf-8")
        (staging / VERSION).mkdir()
        shutil.copyfile(model_path, staging / VERSION / MODEL)
        if settings.backend == "python":
            shutil.copyfile(PYTHON_MODEL, staging / VERSION / "model.py")
    return target


def compiled_graph(path: Path) -> onnx.ModelProto:
    """The graph at ``path``; :class:`ModelError` unless moco compiled it."""
    try:
        model = onnx.load(str(path))
    except Exception as error:  # onnx raises protobuf's DecodeError and others for a damaged file
        raise ModelError(f"cannot read {path}: {error}; compile the model again") from error
    if EXIT_OUTPUT not in [output.name for output in model.graph.output]:
        raise ModelError(f"{path} has no {EXIT_OUTPUT!r} output, so moco did not compile it; compile the "
                         "model again")
    return model


def model_name(build_dir: Path) -> str:
    """The build directory's name as a Triton model name: characters other than letters, digits,
    ``_ . -`` become ``_``; no leading ``.`` or ``-``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", build_dir.resolve().name).lstrip(".-")
    return name or "model"


def checked_name(name: str) -> str:
    """``name`` when it is a valid model name (a plain directory name, safe in URLs)."""
    if not _NAME.fullmatch(name):
        raise MocoError(f"{name!r} is not a valid Triton model name; use letters, digits and _ . - "
                        f"(not first: . or -), e.g. --name {model_name(Path(name))}")
    return name


def check_previous_export(target: Path) -> None:
    """Refuse ``target`` when it holds a moco output that is not a Triton export (a build, say):
    --force replaces previous exports only."""
    listed = listed_files(target) if target.is_dir() else None
    if listed is not None and CONFIG not in listed:
        raise OutputError(f"{target} holds another moco output, not a Triton export; moco replaces only "
                          "its own exports there. Choose another --name or --repository")


def tensor_specs(values: Iterable[onnx.ValueInfoProto],
                 initializers: Iterable[onnx.TensorProto] = ()) -> list[TensorSpec]:
    """The Triton declaration of each graph input or output in ``values`` (inputs that are
    ``initializers`` left out: they are weights)."""
    weights = {initializer.name for initializer in initializers}
    return [tensor_spec(value) for value in values if value.name not in weights]


def tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    """One graph input or output as Triton declares it (rules 1 and 2)."""
    if not value.type.HasField("tensor_type"):
        raise ModelError(f"{value.name!r} is not a tensor; Triton's ONNX models take and give tensors only")
    tensor = value.type.tensor_type
    if tensor.elem_type not in DATA_TYPES:
        raise ModelError(f"{value.name!r} has ONNX element type "
                         f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}, which Triton does not serve")
    if not tensor.HasField("shape") or not tensor.shape.dim:
        raise ModelError(f"{value.name!r} has no batch axis (its shape is unknown or a scalar); Triton "
                         "batches rows on axis 0: export the model with a dynamic batch axis")
    batch, *rest = tensor.shape.dim
    if batch.HasField("dim_value"):
        raise ModelError(f"{value.name!r} has a fixed batch axis of size {batch.dim_value}; Triton batches "
                         "rows on axis 0: export the model with a dynamic batch axis")
    dims = tuple(dim.dim_value if dim.HasField("dim_value") else -1 for dim in rest)
    if not dims:
        return TensorSpec(value.name, DATA_TYPES[tensor.elem_type], (1,), ())
    return TensorSpec(value.name, DATA_TYPES[tensor.elem_type], dims)


def config_text(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], settings: TritonSettings,
                parameters: Mapping[str, str] | None = None) -> str:
    """``config.pbtxt`` for the model (rules 3 and 4), with the string ``parameters`` its model.py
    reads: tritonclient's protobuf when installed."""
    try:
        from google.protobuf import text_format

        message = config_message(name, inputs, outputs, settings, parameters)
    except ImportError:  # no tritonclient: the same message written by hand
        return _config_text(name, inputs, outputs, settings, parameters)
    return text_format.MessageToString(message)


def config_message(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], settings: TritonSettings,
                   parameters: Mapping[str, str] | None = None):
    """The configuration as a ``tritonclient.grpc.model_config_pb2.ModelConfig`` (ImportError
    without tritonclient)."""
    from tritonclient.grpc import model_config_pb2 as pb

    config = pb.ModelConfig(name=name, max_batch_size=settings.max_batch_size)
    if settings.backend == "python":
        config.backend = "python"
    else:
        config.platform = "onnxruntime_onnx"
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    for declared, specs in ((config.input, inputs), (config.output, outputs)):
        for spec in specs:
            tensor = declared.add(name=spec.name, data_type=pb.DataType.Value(spec.data_type), dims=spec.dims)
            if spec.reshape is not None:
                tensor.reshape.SetInParent()
                tensor.reshape.shape.extend(spec.reshape)
    config.dynamic_batching.preferred_batch_size.extend(settings.preferred)
    config.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    config.instance_group.add(count=settings.instances, kind=pb.ModelInstanceGroup.Kind.Value(KINDS[settings.kind]))
    return config


def _config_text(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], settings: TritonSettings,
                 parameters: Mapping[str, str] | None = None) -> str:
    """The same configuration as :func:`config_message`, written by hand (protobuf text format)."""
    lines = [f'name: "{name}"']
    if settings.backend == "python":
        lines.append('backend: "python"')
    else:
        lines.append('platform: "onnxruntime_onnx"')
    lines.append(f"max_batch_size: {settings.max_batch_size}")
    for field, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            lines += [f"{field} {{", f'  name: "{_escape(spec.name)}"', f"  data_type: {spec.data_type}",
                      f"  dims: [{', '.join(map(str, spec.dims))}]"]
            if spec.reshape is not None:
                lines.append(f"  reshape {{ shape: [{', '.join(map(str, spec.reshape))}] }}")
            lines.append("}")
    lines += [f"instance_group {{ count: {settings.instances} kind: {KINDS[settings.kind]} }}",
              f"dynamic_batching {{ preferred_batch_size: [{', '.join(map(str, settings.preferred))}] "
              f"max_queue_delay_microseconds: {settings.max_queue_delay_us} }}"]
    lines += [f'parameters {{ key: "{_escape(key)}" value {{ string_value: "{_escape(value)}" }} }}'
              for key, value in (parameters or {}).items()]
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    """``text`` inside a double-quoted protobuf text-format string."""
    return text.replace("\\", "\\\\").replace('"', '\\"')
