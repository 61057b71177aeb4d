"""Pricing exits for the machine that serves: a device's measured constants (:class:`TargetProfile`) and
the planner's two FLOP-equivalent exit costs priced from them at a serving batch (:func:`resolve_target`).

An exit costs a fixed time per batch (on CUDA the host sync that reads its row count, and its kernel
launches) plus a copy of every continuing row's cut tensor.  The planner counts FLOPs, so both become
FLOP-equivalents at the rate the device runs dense compute at the serving batch ``B``:

1. ``exit_fixed_cost = exit_fixed_seconds * rate(B) / B`` per row reaching the exit: the batch's fixed
   time shared by its ``B`` rows;
2. ``boundary_cost = BYTES_MOVED_PER_ELEMENT / copy_bytes_per_second * rate(B)`` per cut element of a
   row reaching the exit (all of them charged as if they continued, as on CPU).

``rate(B)`` interpolates the profile's measured rates linearly in log batch and log rate (exact where
time is flat in the batch, launch-bound; a plateau once compute-bound) and is clamped outside them.

Not priced: padding.  A bucketed graph pads the rows continuing past an exit up to the next bucket
(:data:`~moco_compile.passes.planning.config.DEFAULT_BATCH_BUCKETS`: under 2x the rows from 8 rows up,
up to 8 rows below), so the remainder runs on up to twice the continuing rows.  How many rows continue
varies per batch and per plan, so no per-exit constant captures it; launch-bound (time flat in the
batch) padding costs little time, compute-bound the remainder pays it.  Nor is the launch-bound regime
itself: there rows that leave save their FLOPs in this model but little time on the device, so plans
priced at batches below the knee (64 on the H100) are optimistic (MiniLM-6 with 2 exits, 36% of its
FLOPs saved: 1.37x the original's time at batch 64, 0.88x at 256).  Measure with ``moco evaluate``.

Targets: ``cpu`` (the default) keeps :class:`~moco_compile.passes.planning.config.PlannerConfig`'s own
figures unless a profile is given; ``cuda`` is ``cuda:h100`` (:data:`BUILT_IN_TARGETS`); any other
device needs a profile measured on it (``moco profile-target``).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from moco_compile.constants import TARGET_PROFILE_FIELDS, TARGET_PROFILE_FORMAT, TARGET_PROFILE_VERSION
from moco_compile.outputs import GENERATOR, staged_output_file

from moco_compile.passes.planning.config import PlannerConfig, checked_buckets

CPU_TARGET = "cpu"
GPU_KINDS = ("cuda",)  # devices served with the bucketed layout
KIND_OF_PROVIDER = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}
# The serving batch GPU targets are priced at unless told: the batch moco's other commands assume
# (`moco evaluate --batch-size`, `moco export-triton --max-batch-size`, the latency comparison's larger batch).
DEFAULT_GPU_SERVING_BATCH = 64
BYTES_MOVED_PER_ELEMENT = 8.0  # a float32 element of a continuing row, read and written once by the gather
PROFILE_HINT = "run `moco profile-target --providers {kind} --out target.json` on that machine and pass " \
               "--target-profile target.json"


@dataclass(frozen=True)
class TargetProfile:
    """What one device costs, measured (``moco profile-target``) or built in (:data:`BUILT_IN_TARGETS`).

    ``name``: e.g. ``"cuda:h100"`` or ``"cpu"``; ``provider``: the onnxruntime execution provider it ran on.
    ``exit_fixed_seconds``: time one exit adds to a batch whatever its rows (host sync, kernel launches).
    ``flops_per_second``: dense float32 compute rate per batch size, ``{batch: FLOP/s}``.
    ``copy_bytes_per_second``: bandwidth of a gather of rows (the continuing rows' copy).
    ``machine``, ``onnxruntime``, ``measured_on``: where, with what and when (ISO date) it was measured.
    """

    name: str
    provider: str
    exit_fixed_seconds: float
    flops_per_second: Mapping[int, float]
    copy_bytes_per_second: float
    machine: str = ""
    onnxruntime: str = ""
    measured_on: str = ""
    _rates: tuple[tuple[int, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise ValueError(f"target profile {self.name!r}: {problem}")
        rates = tuple(sorted((int(b), float(r)) for b, r in self.flops_per_second.items()))
        object.__setattr__(self, "flops_per_second", dict(rates))
        object.__setattr__(self, "_rates", rates)

    @property
    def kind(self) -> str:
        """``"cpu"`` or ``"cuda"``: the kind of device, from the provider."""
        return KIND_OF_PROVIDER[self.provider]

    def rate(self, batch: int) -> float:
        """FLOP/s of dense compute at ``batch`` rows: log-log interpolation between the measured batch
        sizes, the nearest measured rate outside them."""
        batches = [b for b, _ in self._rates]
        if batch <= batches[0]:
            return self._rates[0][1]
        if batch >= batches[-1]:
            return self._rates[-1][1]
        upper = next(k for k, b in enumerate(batches) if b >= batch)
        (b0, r0), (b1, r1) = self._rates[upper - 1], self._rates[upper]
        if b1 == batch:
            return r1
        share = math.log(batch / b0) / math.log(b1 / b0)
        return math.exp(math.log(r0) + share * math.log(r1 / r0))

    def exit_fixed_cost(self, batch: int) -> float:
        """FLOP-equivalents per row reaching an exit of its fixed time, at ``batch`` rows per batch."""
        return self.exit_fixed_seconds * self.rate(batch) / batch

    def boundary_cost(self, batch: int) -> float:
        """FLOP-equivalents per cut element of a row reaching an exit for copying it on, at ``batch``."""
        return BYTES_MOVED_PER_ELEMENT / self.copy_bytes_per_second * self.rate(batch)

    def to_dict(self) -> dict:
        """The profile as its JSON file holds it (:meth:`from_dict` reads it back)."""
        return {"generator": GENERATOR, "format": TARGET_PROFILE_FORMAT, "version": TARGET_PROFILE_VERSION,
                **{name: getattr(self, name) for name in TARGET_PROFILE_FIELDS},
                "flops_per_second": {str(b): r for b, r in self._rates}}

    @classmethod
    def from_dict(cls, data: object, where: str = "the target profile") -> "TargetProfile":
        """The profile in ``data`` (parsed JSON); ``ValueError`` naming ``where`` and the field that is
        missing, of the wrong kind or out of range, or a format or version this moco does not read."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} is not a moco target profile (not a JSON object); {_REMEASURE}")
        if data.get("format") != TARGET_PROFILE_FORMAT:
            raise ValueError(f"{where} is not a moco target profile (its 'format' is {data.get('format')!r}, not "
                             f"{TARGET_PROFILE_FORMAT!r}); {_REMEASURE}")
        if data.get("version") != TARGET_PROFILE_VERSION:
            raise ValueError(f"{where} is a target profile of version {data.get('version')!r}; this moco reads "
                             f"version {TARGET_PROFILE_VERSION}: {_REMEASURE}")
        missing = [name for name in TARGET_PROFILE_FIELDS if name not in data]
        if missing:
            raise ValueError(f"{where} has no {missing[0]!r}; {_REMEASURE}")
        rates = data["flops_per_second"]
        if not isinstance(rates, dict) or not all(isinstance(b, str) and b.isdigit() for b in rates):
            raise ValueError(f"{where}: 'flops_per_second' must map batch sizes to FLOP/s, e.g. "
                             f"{{\"1\": 1e10, \"64\": 5e10}}, got {json.dumps(rates)[:60]}; {_REMEASURE}")
        values = {name: data[name] for name in TARGET_PROFILE_FIELDS}
        values["flops_per_second"] = {int(b): r for b, r in rates.items()}
        problem = _problem(values)
        if problem:
            raise ValueError(f"{where}: {problem}; {_REMEASURE}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TargetProfile":
        """The profile in the JSON file ``path`` (:meth:`from_dict`'s checks, naming the file)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"target profile {path} is not a file; {PROFILE_HINT.format(kind='cuda')}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"target profile {path} is not valid JSON ({error}); {_REMEASURE}") from None
        return cls.from_dict(data, f"target profile {path}")

    def to_json(self, path: str | os.PathLike, force: bool = False) -> None:
        """Write the profile to ``path`` atomically; a file there is replaced only when moco wrote it and
        ``force`` is given (:func:`~moco_compile.outputs.staged_output_file`)."""
        with staged_output_file(path, "target profile", "json", force=force) as temporary:
            temporary.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")


_REMEASURE = "measure it again with `moco profile-target --out target.json`"


def _problem(values: object) -> str | None:
    """What is wrong with a profile's fields (an object or a dict of them), or None."""
    get = values.get if isinstance(values, dict) else lambda name: getattr(values, name)
    for name in ("name", "provider", "machine", "onnxruntime", "measured_on"):
        if not isinstance(get(name), str):
            return f"{name!r} must be a string, got {get(name)!r}"
    if get("provider") not in KIND_OF_PROVIDER:
        return f"'provider' must be one of {', '.join(KIND_OF_PROVIDER)}, got {get('provider')!r}"
    for name in ("exit_fixed_seconds", "copy_bytes_per_second"):
        value = get(name)
        if not _number(value) or value < 0 or (name == "copy_bytes_per_second" and value == 0):
            return f"{name!r} must be a finite number {'>= 0' if name == 'exit_fixed_seconds' else '> 0'}, " \
                   f"got {value!r}"
    rates = get("flops_per_second")
    if not isinstance(rates, Mapping) or not rates:
        return f"'flops_per_second' must map at least one batch size to FLOP/s, got {rates!r}"
    for batch, rate in rates.items():
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            return f"'flops_per_second' has batch size {batch!r}, not a positive whole number"
        if not _number(rate) or rate <= 0:
            return f"'flops_per_second' at batch {batch} must be a finite number > 0, got {rate!r}"
    return None


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Measured H100 figures (benchmarks/RESULTS.md "GPU (CUDA)": NVIDIA H100 80GB HBM3, onnxruntime-gpu 1.31.1):
# - exit_fixed_seconds: exits no row takes cost 0.144-0.175 ms per exit and batch at batch 1, 64 and 256
#   (the If condition's host sync and the exit's launches); 0.16 ms is their middle.
# - flops_per_second: MiniLM-6 (1,407 MFLOPs per row at 64 tokens, rows padded to the batch's longest,
#   so at most that) ran 2.451 ms at batch 1 and 2.462 ms at batch 64: launch-bound, time flat in the
#   batch, <= 0.57 TFLOP/s at batch 1 -> 0.5e12.  At batch 256 it ran 8.02 ms with TF32 on (<= 45 TFLOP/s);
#   TF32 off (moco's sessions) made the compiled graph 1.44x slower there -> about 31 TFLOP/s, 46% of the
#   H100 SXM's 67 TFLOP/s float32 peak without tensor cores: 30e12.  Time flat up to 64 puts the knee there:
#   rate(64) = 64 x 0.5e12 ~ 30e12, and log-log interpolation between the two is exactly "time flat".
# - copy_bytes_per_second: not measured on the H100; a row gather is a memory-bound copy, taken at
#   about half the HBM3 peak (3.35 TB/s): 1.5e12.
H100 = TargetProfile(name="cuda:h100", provider="CUDAExecutionProvider", exit_fixed_seconds=0.16e-3,
                     flops_per_second={1: 0.5e12, 64: 30e12}, copy_bytes_per_second=1.5e12,
                     machine="NVIDIA H100 80GB HBM3 (benchmarks/RESULTS.md, GPU (CUDA))",
                     onnxruntime="onnxruntime-gpu 1.31.1", measured_on="2026-11-27")
BUILT_IN_TARGETS = {H100.name: H100}
TARGET_ALIASES = {"cuda": H100.name}


def target_kind(name: str) -> str:
    """``"cpu"`` or ``"cuda"`` for a target name (``cpu``, ``cuda``, ``cuda:<device>``); ``ValueError``
    for any other."""
    kind, _, device = name.partition(":") if isinstance(name, str) else ("", "", "")
    if (kind == CPU_TARGET and not device) or (kind in GPU_KINDS and (device or ":" not in name)):
        return kind
    raise ValueError(f"unknown target {name!r}: give cpu, cuda or cuda:<device> (built in: "
                     f"{', '.join(sorted(BUILT_IN_TARGETS))}; others need --target-profile)")


def built_in_target(name: str) -> TargetProfile:
    """The built-in profile of target ``name`` (an alias such as ``cuda`` included); ``ValueError``
    saying how to measure one when there is none."""
    resolved = TARGET_ALIASES.get(name, name)
    if resolved not in BUILT_IN_TARGETS:
        raise ValueError(f"no built-in constants for {name}: {PROFILE_HINT.format(kind=target_kind(name))}")
    return BUILT_IN_TARGETS[resolved]


def priced_config(config: PlannerConfig, profile: TargetProfile, serving_batch: int | None = None,
                  target: str | None = None) -> PlannerConfig:
    """``config`` with ``exit_fixed_cost`` and ``boundary_cost`` priced from ``profile`` at
    ``serving_batch`` rows per batch (default :data:`DEFAULT_GPU_SERVING_BATCH` on a GPU, 1 on CPU),
    the bucketed layout on a GPU, and ``target`` (default the profile's name) recorded."""
    gpu = profile.kind in GPU_KINDS
    batch = serving_batch if serving_batch is not None else DEFAULT_GPU_SERVING_BATCH if gpu else 1
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"serving batch must be a positive whole number of rows, got {batch!r}; e.g. 64")
    return replace(config, exit_layout="bucketed" if gpu else config.exit_layout, target=target or profile.name,
                   serving_batch=batch, exit_fixed_cost=profile.exit_fixed_cost(batch),
                   boundary_cost=profile.boundary_cost(batch))


def resolve_target(config: PlannerConfig, target: str | None = None, serving_batch: int | None = None,
                   batch_buckets: Iterable[int] | None = None,
                   profile: TargetProfile | None = None) -> tuple[PlannerConfig, TargetProfile | None]:
    """The planner configuration for serving on ``target`` (default: ``cpu``, or the profile's) at
    ``serving_batch`` rows per batch, the continuing rows padded to ``batch_buckets`` (default
    ``config``'s), and the profile that priced its exits (None: ``config``'s own figures).

    1. ``cpu`` without a profile: ``config`` as it is (its batch-1 CPU figures), buckets applied; with
       a serving batch, ``config`` records it and the compile prices the exits on the model itself
       (:mod:`moco_compile.pricing`; None is returned for the profile until then).
    2. a profile: its kind (cpu, cuda) must be the target's; it prices the exits (:func:`priced_config`).
    3. a GPU target without one: its built-in constants (``cuda`` = ``cuda:h100``), else ``ValueError``
       saying how to measure them.
    """
    if batch_buckets is not None:
        config = replace(config, batch_buckets=checked_buckets(batch_buckets))
    name = target if target is not None else profile.name if profile is not None else CPU_TARGET
    kind = target_kind(name)
    if profile is not None and profile.kind != kind:
        raise ValueError(f"the target profile was measured on {profile.provider} ({profile.name}) but the target is "
                         f"{name}: pass --target {profile.kind}, or a profile measured on {name}")
    if profile is None and kind == CPU_TARGET:
        if serving_batch is not None:  # PlannerConfig checks it
            return replace(config, target=CPU_TARGET, serving_batch=serving_batch), None
        return config, None
    if profile is None:
        profile = built_in_target(name)
        name = profile.name
    return priced_config(config, profile, serving_batch, name if ":" in name else profile.name), profile
