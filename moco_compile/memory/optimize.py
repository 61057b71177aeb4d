"""Shrink a model's memory (float16, int8, fusions) and validate every step on untouched rows.

Steps run in this order: precision (float16 or int8), then a build's certified exits when
composing with one (:func:`optimize_build`), then onnxruntime's fusions.
``optimize_memory`` splits the calibration rows once (seeded): tuning rows feed every choice
(static int8 ranges, which nodes float16 must keep in float32) and validation rows judge the
result.  Each step is a pass ``ModelProto -> ModelProto``; after each, the validation rows are
run through the original and the candidate: accuracy (with labels), disagreement with the
original, latency ratios at batch 1 and 64 in the same process, weights' bytes and peak
memory.  A step whose accuracy drop exceeds ``max_accuracy_drop`` is rejected with its
measured figures (:class:`OptimizationRejectedError`); nothing is written then.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from moco_compile.build import Build, recorded_output
from moco_compile.constants import EXIT_OUTPUT, LABELS
from moco_compile.errors import CalibrationDataError, MocoError, ModelError
from moco_compile.importer import classifier_output, load_original
from moco_compile.passes.graph.flops import measure_shapes
from moco_compile.passes.graph.index import GraphIndex, exposing_every_tensor
from moco_compile.passes.graph.rewrite import apply_plan
from moco_compile.passes.memory.float16 import to_float16
from moco_compile.passes.memory.fusion import fused
from moco_compile.passes.memory.liveness import feed_shapes, liveness, weight_bytes
from moco_compile.passes.memory.quantize import check_not_quantized, quantize_dynamic_int8, quantize_static_int8
from moco_compile.passes.planning.bounds import clopper_pearson_interval
from moco_compile.prepare import model_for_plan
from moco_compile.runtime.latency import batches_of, compare_latency
from moco_compile.runtime.memory.peak import can_measure, measure_peak
from moco_compile.runtime.session import ExitSession, open_session

INT8_MODES = ("dynamic", "static")
MIN_VALIDATION_ROWS = 100
MAX_TUNING_ROWS = 512
FLOAT16_MAX = float(np.finfo(np.float16).max)
LATENCY_BATCHES = (1, 64)
MEMORY_BATCH = 64
LATENCY_ROWS = 256  # rows timed per batch size: enough for stable medians, bounded whatever the data size


class OptimizationRejectedError(MocoError):
    """An optimisation broke the accuracy budget (or overflowed); its measured figures are attached."""

    def __init__(self, message: str, step: dict) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class MemoryOptimization:
    """The optimised model and the validation table (one row per step, the original first)."""

    model: onnx.ModelProto
    steps: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "notes": self.notes}


def optimize_memory(model: onnx.ModelProto, calibration: Mapping[str, np.ndarray], *, float16: bool = False,
                    int8: str | None = None, fuse: bool = False, max_accuracy_drop: float = 0.005,
                    seed: int = 0, measure_latency: bool = True, build: Build | None = None,
                    output: str | None = None) -> MemoryOptimization:
    """Apply the requested optimisations to ``model`` in order (precision, the exits of ``build``
    in its layout, fusions), each validated on rows no choice touched; raise
    :class:`OptimizationRejectedError` on the first one that breaks ``max_accuracy_drop`` (a
    fraction: 0.005 = half a point).  ``output``: the classifier output, where the model has several."""
    if float16 and int8:
        raise ValueError("choose float16 or int8, not both: int8 already stores weights in a quarter of float32")
    if int8 not in (None, *INT8_MODES):
        raise ValueError(f"int8 must be one of {INT8_MODES}, got {int8!r}")
    if not 0 <= max_accuracy_drop < 1:
        raise ValueError(f"max_accuracy_drop is a fraction in [0, 1), got {max_accuracy_drop}")
    check_not_quantized(model)
    if EXIT_OUTPUT in {o.name for o in model.graph.output}:
        raise ModelError("this is a graph moco compiled: give its build directory instead, so the certified exits "
                         "are put back on the optimised original")
    tuning, validation = split_rows(model, calibration, seed)
    judge = _Validator(model, classifier_output(model, output), validation, measure_latency)
    result = MemoryOptimization(model, steps=[judge.add_costs(judge.quality("original", model), model)])
    current = model
    if float16:
        current = _validated(judge, "float16", _float16_within_range(current, tuning, result.notes),
                             max_accuracy_drop, result)
    if int8 == "dynamic":
        quantized = quantize_dynamic_int8(current)
        result.notes.extend(_kept_float_notes(quantized.kept_float, "dynamic"))
        current = _validated(judge, "int8 dynamic", quantized.model, max_accuracy_drop, result)
    if int8 == "static":
        quantized = quantize_static_int8(current, tuning)
        result.notes.extend(_kept_float_notes(quantized.kept_float, "static"))
        current = _validated(judge, "int8 static", quantized.model, max_accuracy_drop, result)
    if build is not None:
        prepared, output = model_for_plan(current, judge.output, {k: v[:1] for k, v in judge.inputs.items()})
        with_exits = apply_plan(prepared, build.plan, output, build.exit_layout, build.batch_buckets)
        current = _validated(judge, "+ exits", with_exits, max_accuracy_drop, result)
    if fuse:
        current = _validated(judge, "+ fusions" if len(result.steps) > 1 else "fusions", fused(current),
                             max_accuracy_drop, result)
    result.model = current
    return result


def optimize_build(build_dir: str | os.PathLike, calibration: Mapping[str, np.ndarray], *,
                   original: str | os.PathLike | None = None, **options: Any) -> MemoryOptimization:
    """Optimise the model a moco build was compiled from, then put the build's exits back on it,
    in the exit layout the build records (:func:`~moco_compile.passes.graph.rewrite.apply_plan`).

    The exit rules and thresholds are the build's (fitted and certified on the float32 model) and
    stay float32 in the graph; they now read the optimised network's activations, so the
    build's certificate does not carry over: the validation rows measure what the combination
    does.  To certify exits on the optimised model, compile that model instead.
    """
    build = Build.load(build_dir)
    source = build.original_model(original)
    model = load_original(source)
    return optimize_memory(model, calibration, build=build, output=recorded_output(build, model, source), **options)


def split_rows(model: onnx.ModelProto, calibration: Mapping[str, np.ndarray],
               seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Seeded split of the rows into tuning rows (at most ``MAX_TUNING_ROWS``, half at most) and
    validation rows (the rest, labels kept)."""
    names = GraphIndex(model).graph_inputs
    missing = [name for name in names if name not in calibration]
    if missing:
        raise CalibrationDataError(f"the calibration data has no array for the model input(s) {missing}; it has "
                                   f"{sorted(calibration)}. Give one array per model input (+ optional '{LABELS}')")
    rows = len(calibration[names[0]])
    tuning_rows = min(MAX_TUNING_ROWS, rows // 2)
    if rows - tuning_rows < MIN_VALIDATION_ROWS:
        raise CalibrationDataError(f"validating an optimisation needs at least {MIN_VALIDATION_ROWS} rows no choice "
                                   f"touched, beside the tuning rows; {rows} calibration rows leave "
                                   f"{rows - tuning_rows}. Give at least {2 * MIN_VALIDATION_ROWS} rows")
    order = np.random.default_rng(seed).permutation(rows)
    keys = [*names, *([LABELS] if LABELS in calibration else [])]
    tuning = {name: calibration[name][order[:tuning_rows]] for name in names}
    validation = {name: calibration[name][order[tuning_rows:]] for name in keys}
    return tuning, validation


class _Validator:
    """Runs the validation rows through the original once and through each candidate."""

    def __init__(self, original: onnx.ModelProto, output: str, validation: Mapping[str, np.ndarray],
                 measure_latency: bool):
        self.output = output
        self.labels = validation.get(LABELS)
        self.inputs = {k: v for k, v in validation.items() if k != LABELS}
        self.reference = self._logits(_exit_session(original)).argmax(axis=1)
        self.original_session = _session(original)
        self.measure_latency = measure_latency

    def quality(self, name: str, model: onnx.ModelProto) -> dict:
        """Accuracy, disagreement with the original, weights' bytes and, for a graph with exits, the
        exit rate and compute reduction of ``model`` on the validation rows."""
        session = _exit_session(model)
        logits = self._logits(session)
        predictions = logits.argmax(axis=1)
        rows = len(predictions)
        differ = int((predictions != self.reference).sum())
        low, high = clopper_pearson_interval(differ, rows, 0.95)
        row = {
            "step": name, "rows": rows,
            "non_finite_outputs": int((~np.isfinite(logits)).any(axis=1).sum()),
            "disagreement": differ / rows, "disagreement_interval": [low, high],
            "accuracy": None if self.labels is None else float((predictions == self.labels).mean()),
            "accuracy_original": None if self.labels is None else float((self.reference == self.labels).mean()),
            "weight_bytes": weight_bytes(model),
            "exit_rate": 1 - session.exit_rates.get(-1, 0.0) if session.exit_counts else None,
            "compute_reduction": session.statistics.compute_reduction,
        }
        row["accuracy_drop"] = (row["accuracy_original"] - row["accuracy"]) if self.labels is not None \
            else row["disagreement"]
        return row

    def add_costs(self, row: dict, model: onnx.ModelProto) -> dict:
        """Peak memory at batch 64 (estimated and measured) and latency ratios to the original."""
        feed = batches_of(self.inputs, MEMORY_BATCH)[0]
        row["estimated_peak_bytes"] = liveness(model, feed_shapes(feed), measure_shapes(model, feed)).peak_bytes
        row["measured_peak_bytes"] = measure_peak(model.SerializeToString(), feed, default_session=True).run_bytes \
            if can_measure() else None
        row["latency_ratio"] = {}
        if self.measure_latency and row["step"] != "original":
            session = _session(model)
            timed = {name: values[:LATENCY_ROWS] for name, values in self.inputs.items()}
            for batch in LATENCY_BATCHES:
                seconds = compare_latency({"original": self.original_session, "candidate": session}, timed,
                                          batch, min_seconds=0.5)
                row["latency_ratio"][str(batch)] = seconds["candidate"] / seconds["original"]
        return row

    def _logits(self, session: ExitSession) -> np.ndarray:
        return np.concatenate([session.run(batch)[self.output]
                               for batch in _chunks(self.inputs, 256)]).astype(np.float64)


def _validated(judge: _Validator, name: str, candidate: onnx.ModelProto, max_drop: float,
               result: MemoryOptimization) -> onnx.ModelProto:
    row = judge.quality(name, candidate)
    if row["non_finite_outputs"]:
        raise OptimizationRejectedError(f"{name}: {row['non_finite_outputs']} of {row['rows']} validation rows give "
                                        "non-finite outputs (overflow); the step is rejected", row)
    if row["accuracy_drop"] > max_drop:
        measured = "accuracy drop" if row["accuracy"] is not None else "disagreement with the original (no labels)"
        raise OptimizationRejectedError(
            f"{name} is rejected: {measured} {row['accuracy_drop']:.2%} on {row['rows']} validation rows exceeds "
            f"--max-accuracy-drop {max_drop:.2%} (disagreement {row['disagreement']:.2%}, weights "
            f"{row['weight_bytes']:,} bytes). Raise the limit or choose another optimisation", row)
    result.steps.append(judge.add_costs(row, candidate))
    return candidate


def _float16_within_range(model: onnx.ModelProto, tuning: Mapping[str, np.ndarray],
                          notes: list[str]) -> onnx.ModelProto:
    """float16, with each node that writes or reads a tensor beyond float16's range on the
    tuning rows kept in float32.  The check reads the original's tensors: onnxruntime's CPU provider runs a
    float16 graph in float32 behind casts, so a converted model cannot overflow on this machine
    although it would on a GPU."""
    overflowing = _float16_overflows(model, tuning)
    for node, tensor, largest in overflowing:
        notes.append(f"float16 would overflow at {tensor!r} (node {node!r}, |value| up to {largest:.3g} > "
                     f"{FLOAT16_MAX:g} on the tuning rows): that node is kept in float32")
    wide = {tensor for _, tensor, _ in overflowing}
    readers = [node.name for node in model.graph.node if wide & set(node.input)]
    return to_float16(model, keep_float32=[*(node for node, _, _ in overflowing), *readers])


def _float16_overflows(model: onnx.ModelProto, rows: Mapping[str, np.ndarray]) -> list[tuple[str, str, float]]:
    """(node, tensor, largest |value|) of each top-level node whose float output leaves float16's range."""
    session = _session(exposing_every_tensor(model))
    names = [o.name for o in session.get_outputs()]
    largest: dict[str, float] = {}
    for batch in _chunks(rows, 256):
        for name, value in zip(names, session.run(names, batch)):
            if value.dtype == np.float32 and value.size:
                largest[name] = max(largest.get(name, 0.0), float(np.abs(value).max()))
    return [(node.name or node.output[0], name, largest[name]) for node in model.graph.node
            for name in node.output if largest.get(name, 0.0) > FLOAT16_MAX]


def _kept_float_notes(kept: Mapping[str, int], mode: str) -> list[str]:
    return [f"int8 {mode}: {count} {op} node(s) keep float weights (onnxruntime's {mode} quantizer has no int8 "
            f"kernel for {op})" for op, count in sorted(kept.items())]


def _exit_session(model: onnx.ModelProto) -> ExitSession:
    return ExitSession(model, providers=["cpu"])


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return open_session(model, ["cpu"])


def _chunks(inputs: Mapping[str, np.ndarray], size: int) -> Sequence[dict[str, np.ndarray]]:
    rows = len(next(iter(inputs.values())))
    return [{k: v[start:start + size] for k, v in inputs.items()} for start in range(0, rows, size)]
