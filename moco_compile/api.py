"""Public API: ``compile`` a classifier into an early-exit ONNX graph."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from moco_compile.build import Build, source_model
from moco_compile.calibration_data import for_inputs, load_calibration
from moco_compile.constants import LABELS, OUTPUTS, PROBABILITIES, SPLIT_COLUMN
from moco_compile.errors import ModelError
from moco_compile.frame import ActivationFrame, load_frame
from moco_compile.importer import ImportedModel, check_rows_are_independent, import_model
from moco_compile.outputs import check_output_dir, check_output_file, staged_output_file
from moco_compile.passes.calibration.calibrate import calibrate, variant_features
from moco_compile.passes.graph.binary_output import from_two_class
from moco_compile.passes.graph.cut_points import CutPoint
from moco_compile.passes.graph.exit_graph import derived_outputs
from moco_compile.passes.graph.index import GraphIndex, elem_types, subgraph_nesting
from moco_compile.passes.graph.rewrite import apply_plan
from moco_compile.passes.graph.verify import verify_compiled
from moco_compile.passes.planning.config import Budget, PlannerConfig
from moco_compile.passes.planning.pipeline import FrameRows, Planning, plan_rows
from moco_compile.passes.planning.routing import Routing
from moco_compile.passes.planning.splits import SPLITS
from moco_compile.passes.planning.target import TargetProfile, priced_config, resolve_target
from moco_compile.passes.planning.types import ExitPlan
from moco_compile.prepare import MAX_VERIFIED_ROWS, cut_points_of
from moco_compile.pricing import measured_cpu_profile
from moco_compile.progress import Phases
from moco_compile.scale.shards import ShardedData

log = logging.getLogger("moco")

EVALUATION_NOTES = {
    "report": "estimates on report rows that nothing was fitted or certified on",
    "test": "estimates on the certifying test rows (too few calibration rows to keep some apart for the report): "
            "the plan was chosen on these rows, so they flatter it",
}
TRAFFIC_SCOPE = ("The certificate covers traffic like the calibration rows (exchangeable with them), and what it "
                 "bounds is a rate over such traffic, not the fraction on any particular stretch of it (a day's "
                 "or a batch's fraction varies around the rate). Inputs unlike the calibration rows (noise, "
                 "another data set, a changed camera or tokenizer) may leave early with a wrong class at any "
                 "rate; {guard}")
GUARD_SCOPE = {
    False: "compile with --ood-guard LEVEL (ood_guard=LEVEL) to send rows unlike the calibration rows to the full "
           "network, or check live traffic with moco evaluate.",
    True: "the out-of-distribution guard sends rows farther from the calibration rows than the 1 - {level:g} "
          "quantile at each exit to the full network (measured on noise and on another data set in "
          "benchmarks/RESULTS.md); it is a safeguard, not part of the certificate.",
}


def compile(model: Any, calibration: Mapping[str, Any] | Iterable[Mapping[str, Any]] | str | os.PathLike, *,
            out_dir: str | os.PathLike | None = None, output: str | None = None,
            example_input: Any = None, max_disagreement: float = 0.01, confidence: float = 0.95,
            max_accuracy_drop: float | None = None, ood_guard: float | None = None, allow_no_exit: bool = False,
            seed: int = 0, batch_size: int = 256, measure_latency: bool = True,
            latency_seconds: float | None = None, show_progress: bool = True,
            planner_config: PlannerConfig | None = None, target: str | None = None,
            serving_batch: int | None = None, batch_buckets: Sequence[int] | None = None,
            target_profile: str | os.PathLike | TargetProfile | None = None, force: bool = False) -> Build:
    """Compile ``model`` into one ONNX graph with early exits.

    Parameters
    ----------
    model:
        An ONNX file path, an ``onnx.ModelProto`` or a ``torch.nn.Module`` (then
        ``example_input`` is required).
    calibration:
        A mapping ``{input name: array, ..., "labels": array}`` or an iterable of
        such mappings (batches), rows on axis 0.  ``labels`` is optional.  Or
        :class:`~moco_compile.scale.shards.ShardedData`: shard files calibrated on a Ray cluster.  Or, for a
        Hugging Face text classifier's directory, :class:`~moco_compile.calibration_text.TextCalibration`:
        texts its saved tokenizer tokenizes; for an image classifier's,
        :class:`~moco_compile.calibration_images.ImageCalibration`: image files its saved processor processes.
        Or a path to any of these (:func:`~moco_compile.calibration_data.load_calibration`).
    out_dir:
        When given, ``model.onnx``, ``plan.json``, ``report.json`` and
        ``frame.arrow`` are written there (all or nothing), with a manifest listing
        them.  It must be new, empty, or (with ``force``) a previous moco output holding
        only the files its manifest lists; never the current or home directory or the
        directory of the model file.  Checked before the work starts and again at the end.
    max_disagreement, confidence:
        With probability ``confidence``, the rate at which the compiled model's class
        differs from the full model's, over inputs exchangeable with the calibration
        rows, is at most ``max_disagreement``: a population rate, not the fraction on
        any particular stretch of traffic.
    max_accuracy_drop:
        Optional second budget (needs labels): fraction of inputs the full model
        gets right and the compiled model gets wrong.
    ood_guard:
        Optional out-of-distribution guard: the share of calibration-like rows (in
        (0, 1), e.g. 0.01) that each exit's distance check may send on to the full
        network; rows unlike the calibration rows (noise, another data set) then run
        the full network instead of leaving early (:mod:`~moco_compile.passes.calibration.guard`).
        Overrides ``planner_config.ood_guard``.
    allow_no_exit:
        Emit the unchanged graph (``moco_exit`` always -1) instead of failing
        when no plan with exits meets the budget or the rows are too few to certify one.
    seed:
        Seed of the random split of calibration rows (rules / test / report).
    measure_latency, latency_seconds:
        Time the compiled graph against the original at batch 1 and 64 on CPU, within
        ``latency_seconds`` in all (default: 10% of the compile so far, between
        2 and 15 seconds); the report says how many batches were timed.
    show_progress:
        Show each phase on stderr as it runs; ``report["phases"]`` holds their seconds either way.
    planner_config:
        How plans are designed and certified (:class:`~moco_compile.passes.planning.config.PlannerConfig`).
    target, serving_batch, batch_buckets, target_profile:
        The machine that will serve the graph, and how (:func:`~moco_compile.passes.planning.target.resolve_target`
        prices ``planner_config``'s exit costs from them before the planning).  ``target``: ``"cpu"``
        (default; ``planner_config``'s own figures unless a profile or a serving batch is given), ``"cuda"``
        (the built-in H100 figures) or ``"cuda:<device>"`` (needs a profile); GPU targets write the bucketed
        layout.  ``serving_batch``: rows per batch served (GPU default 64; at most the largest bucket); on
        the cpu target without a profile, the exits are priced by timing the model and closed exits on
        this machine at that batch (:mod:`moco_compile.pricing`, about 6 s; for batch 1 also pass
        ``PlannerConfig(exit_layout="whole-batch")``, which the CLI writes by default there).
        ``batch_buckets``: batch sizes the continuing rows are padded to (default
        ``planner_config.batch_buckets``).  ``target_profile``: a :class:`TargetProfile` or the JSON file
        ``moco profile-target`` wrote, measured on the serving machine.
    force:
        Replace a previous moco output in ``out_dir``.
    """
    budget = Budget(max_disagreement, confidence, max_accuracy_drop)
    config = planner_config or PlannerConfig()
    if ood_guard is not None:
        config = replace(config, ood_guard=ood_guard)
    if target_profile is not None and not isinstance(target_profile, TargetProfile):
        target_profile = TargetProfile.from_json(target_profile)
    config, pricing = resolve_target(config, target, serving_batch, batch_buckets, target_profile)
    inputs = _input_files(model)
    if out_dir is not None:
        check_output_dir(out_dir, inputs, force)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = load_calibration(calibration, model)
    phases = Phases(show_progress)
    with phases("import"):
        imported = import_model(model, output=output, example_input=example_input,
                                rows=calibration if isinstance(calibration, Mapping) else None)
        check_rows_are_independent(imported.model)
        calibration = for_inputs(calibration, imported.input_names)
    if imported.binary is not None and config.exit_layout == "bucketed":
        raise ModelError(f"output {imported.binary.name!r} is one column (a binary classifier): the bucketed "
                         "layout (the GPU targets' default) splits the graph into stages that serve the two-class "
                         "form moco plans on, not the column; compile it with --target cpu (or --exit-layout "
                         "nested) for now")
    with tempfile.TemporaryDirectory(prefix="moco-") as scratch:  # the Ray engine's frame shards
        with phases("calibration", spinner=False):
            if isinstance(calibration, ShardedData):
                from moco_compile.scale.driver import calibrate_sharded

                rows, cuts, kept = calibrate_sharded(imported, calibration, Path(scratch), batch_size, show_progress)
            else:
                frame, cuts, kept = _calibrate_local(imported, calibration, Path(scratch), batch_size, show_progress)
                rows = FrameRows(frame)
        types = elem_types(imported.model)
        config = config.for_cut_types(types.get(cut.tensor, onnx.TensorProto.FLOAT) for cut in cuts) \
            .for_model_nesting(subgraph_nesting(imported.model.graph))
        total_flops = cuts[0].flops_before + cuts[0].flops_after
        if pricing is None and config.serving_batch is not None:  # the cpu target at a batch: measured here
            with phases("pricing", f"timing the model and closed exits at batch {config.serving_batch}"):
                pricing = measured_cpu_profile(imported.model, imported.output, cuts, imported.num_classes, kept,
                                               config.serving_batch, config)
            config = priced_config(config, pricing, config.serving_batch)
        planning = plan_rows(rows, cuts, imported.num_classes, total_flops, budget, config, seed, allow_no_exit,
                             phase=phases)
        verified = len(next(iter(kept.values())))
        frame = rows.kept_frame(planning.row_split, verified)
    plan = planning.plan
    with phases("rewrite"):
        compiled = apply_plan(imported.model, plan, imported.output, config.exit_layout, config.batch_buckets)
    _warn_of_zero_filled_outputs(imported, plan)
    features = [variant_features(frame, e.column, e.pooling) for e in plan.exits]
    routing = plan.routing(features, len(frame), config.rounding)  # the chosen plan, routed once
    with phases("verification"):
        verification = verify_compiled(compiled, imported.model, imported.output, kept,
                                       routing.take(np.arange(verified)), config.rounding_tolerance,
                                       rows_described=f"the first {verified} calibration rows (of every split)",
                                       original_outputs=frame[OUTPUTS][:verified] if OUTPUTS in frame else None)
    latency = {}
    if measure_latency:
        seconds = latency_seconds if latency_seconds is not None else latency_budget(phases.elapsed())
        with phases("latency", f"timing batch 1 and 64 for about {seconds:.0f} s"):
            latency = _latency(imported.model, compiled, kept, seconds)
    if imported.binary is not None:  # verified in two-class form: the column is exactly l1 - l0 of it
        compiled = from_two_class(compiled, imported.binary)
    report = _report(imported, planning, verification.to_dict(), latency, total_flops)
    evaluated = np.flatnonzero(frame[SPLIT_COLUMN] == SPLITS.index(planning.evaluated_on))
    figures = _in_memory_figures(plan, frame, evaluated, features, routing)
    for item, rate in zip(report["exits"], figures.pop("guard_rates")):
        item["guard_rate"] = rate
    report.update(figures)
    report["source_model"] = source_model(inputs[0]) if inputs and inputs[0].exists() else None
    report["target"] = _target_record(config, pricing)
    report["phases"] = phases.to_dict()
    result = Build(compiled, plan, report, frame, exit_layout=config.exit_layout, seed=seed, planner_config=config)
    if out_dir is not None:
        result.save(out_dir, inputs=inputs, force=force)
    return result


def _warn_of_zero_filled_outputs(imported: ImportedModel, plan: ExitPlan) -> None:
    """Warn of the outputs that rows leaving early carry zeros in: those the model computes from more than the
    classifier's logits (:func:`~moco_compile.passes.graph.exit_graph.derived_outputs`)."""
    index = GraphIndex(imported.model)
    derived = derived_outputs(index, imported.output)
    zero_filled = [name for name in index.graph_outputs if name != imported.output and name not in derived]
    if plan.exits and zero_filled:
        log.warning("rows that leave at an exit carry zeros in output(s) %s: only the classifier output %r and "
                    "outputs computed from its logits alone get values from an exit", ", ".join(zero_filled),
                    imported.output)


def _target_record(config: PlannerConfig, pricing: TargetProfile | None) -> dict:
    """report.json's ``target``: what the exits were priced for, and from what."""
    if pricing is None:
        note = "exit costs: moco's CPU figures, measured at batch 1 (PlannerConfig.exit_fixed_cost, boundary_cost)"
    else:
        note = (f"exit costs priced for batches of {config.serving_batch} rows on {config.target} from "
                f"{pricing.name} ({pricing.machine}, {pricing.onnxruntime}, {pricing.measured_on}): "
                f"{pricing.exit_fixed_seconds * 1e3:.3g} ms per exit and batch, "
                f"{pricing.rate(config.serving_batch):.3g} FLOP/s; estimates that shape the plan, not part of the "
                "certificate"
                + ("; the padding of continuing rows up to a bucket is not priced"
                   if config.exit_layout == "bucketed" else ""))
    return {"name": config.target, "serving_batch": config.serving_batch, "exit_layout": config.exit_layout,
            "batch_buckets": list(config.batch_buckets) if config.exit_layout == "bucketed" else None,
            "exit_fixed_cost": config.exit_fixed_cost, "boundary_cost": config.boundary_cost,
            "priced_from": None if pricing is None else
            {key: value for key, value in pricing.to_dict().items() if key not in ("generator", "format", "version")},
            "note": note}


def _calibrate_local(imported: ImportedModel, calibration: Mapping[str, Any] | Iterable[Mapping[str, Any]],
                     scratch: Path, batch_size: int,
                     show_progress: bool) -> tuple[ActivationFrame, list[CutPoint], dict[str, np.ndarray]]:
    """Calibrate in this process: the frame (in memory), the cuts, and the inputs kept for verification."""
    batches, cuts = cut_points_of(imported, calibration, batch_size)
    keeper = _InputKeeper(imported.input_names, MAX_VERIFIED_ROWS)
    frame = calibrate(imported.model, imported.output, cuts, keeper.tee(batches),
                      scratch / "frame.arrow", show_progress=show_progress).in_memory()
    return frame, cuts, keeper.inputs()


def calibrate_frame(model: Any, calibration: Mapping[str, Any] | Iterable[Mapping[str, Any]] | str | os.PathLike,
                    out: str | os.PathLike, *, output: str | None = None, example_input: Any = None,
                    raw: bool = False, batch_size: int = 256, show_progress: bool = True,
                    force: bool = False) -> ActivationFrame:
    """Run ``model`` over ``calibration`` and save an ActivationFrame of its cut points at ``out``.

    Columns: one per cut and pooling piece (``<cut>``, ``<cut>:max``, ``<cut>:grid``), the
    unpooled cut tensors with ``raw`` (``<cut>:raw``), ``predictions`` and ``labels`` if given.
    ``out`` is never the model file nor a file moco did not write; a frame moco wrote is
    replaced only with ``force``.  Checked before the run and again before the rename.
    """
    inputs = _input_files(model)
    check_output_file(out, "frame", "frame", inputs, force)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = load_calibration(calibration, model)
    imported = import_model(model, output=output, example_input=example_input,
                            rows=calibration if isinstance(calibration, Mapping) else None)
    calibration = for_inputs(calibration, imported.input_names)
    batches, cuts = cut_points_of(imported, calibration, batch_size)
    with staged_output_file(out, "frame", "frame", inputs, force) as temporary:
        calibrate(imported.model, imported.output, cuts, batches, temporary, show_progress=show_progress, raw=raw)
    return load_frame(out)


def _input_files(model: Any) -> list[Path]:
    """The input files an output must not touch: the model, when it is given as a path."""
    return [Path(model)] if isinstance(model, (str, os.PathLike)) else []


def _in_memory_figures(plan: ExitPlan, frame: ActivationFrame, evaluated: np.ndarray,
                       features: list[np.ndarray], routing: Routing) -> dict:
    """Figures read from the evaluated rows (indices ``evaluated`` into ``frame``, the rows the
    build keeps in memory: all of them in one process; with the Ray engine, those among the first
    rows), given every kept row's pooled features per exit and the plan's ``routing`` of them: each
    exit's guard rate, and exited rows' top probability and calibration error vs the full model's."""
    guard = None if routing.guard is None or not len(evaluated) else routing.guard.take(evaluated)
    figures: dict = {"in_memory_rows": len(evaluated), "guard_rates": [
        None if guard is None or e.guard is None else float(guard.blocked[k].mean())
        for k, e in enumerate(plan.exits)], "exited_confidence": None}
    if PROBABILITIES in frame and len(evaluated):
        labels = frame[LABELS][evaluated] if LABELS in frame else None
        confidence = plan.confidence([f[evaluated] for f in features], frame[PROBABILITIES][evaluated], labels,
                                     routing.exit_index[evaluated])
        figures["exited_confidence"] = {
            **confidence.to_dict(), "scales": [e.confidence_scale for e in plan.exits],
            "note": "estimates on the evaluated rows kept in memory; ece_* against the labels (15 equal-width "
                    "bins), gap: mean |exited row's top probability - the full model's probability of that "
                    "class|; uncalibrated: the softmax of the exit's margins (what exited rows carried before "
                    "confidence scales)"}
    return figures


LATENCY_SECONDS = (2.0, 15.0)  # the latency comparison's default time, at least / at most
LATENCY_SHARE = 0.1  # of the compile so far


def latency_budget(elapsed: float) -> float:
    """Seconds the latency comparison may take by default: 10% of the compile so far, within
    :data:`LATENCY_SECONDS` (a one-second comparison of a fast model is noise; a slow model's
    compile should not wait minutes for a figure the serving machine measures better)."""
    low, high = LATENCY_SECONDS
    return min(high, max(low, LATENCY_SHARE * elapsed))


def _latency(original: onnx.ModelProto, compiled: onnx.ModelProto, inputs: Mapping[str, np.ndarray],
             seconds: float) -> dict:
    """Compiled vs original on CPU at batch 1 and 64 within about ``seconds`` in all, the sessions'
    creation included (what is left is shared by the two batch sizes)."""
    from moco_compile.runtime.latency import time_sessions
    from moco_compile.runtime.session import make_session

    started = time.perf_counter()
    sessions = {"original": make_session(original, ["CPUExecutionProvider"]),
                "compiled": make_session(compiled, ["CPUExecutionProvider"])}
    left = max(seconds - (time.perf_counter() - started), LATENCY_SECONDS[0] / 2)
    result = {}
    for batch_size in (1, 64):
        timing = time_sessions(sessions, inputs, batch_size, left / 2 / len(sessions))
        result[f"batch_{batch_size}"] = {"original_ms": timing.seconds["original"] * 1e3,
                                         "compiled_ms": timing.seconds["compiled"] * 1e3,
                                         "ratio": timing.seconds["compiled"] / timing.seconds["original"],
                                         "batches_timed": timing.batches_timed}
    return result


SLOWER_MARGIN = 1.02  # ratios below this are within a one-second measurement's noise


def latency_note(latency: Mapping[str, Mapping[str, float]]) -> str | None:
    """What to do when the compiled graph ran slower than the original at some measured batch size."""
    slower = [f"{name.replace('_', ' ')} ({timing['ratio']:.2f}x)" for name, timing in latency.items()
              if timing["ratio"] > SLOWER_MARGIN]
    if not slower:
        return None
    return (f"on this machine the compiled graph ran slower than the original at {' and '.join(slower)}: each "
            "exit costs a fixed time per batch (its rule's operators and the If), which small batches or few "
            "leaving rows do not repay. If you serve such batches, compile with fewer exits (--max-exits 1) or a "
            "higher PlannerConfig.exit_fixed_cost, and measure on the serving machine (moco evaluate)")


def _report(imported: ImportedModel, planning: Planning, verification: dict, latency: dict,
            total_flops: float) -> dict:
    plan, evaluation, evaluated_on = planning.plan, planning.evaluation, planning.evaluated_on
    exits = [{"exit": k, "module": e.cut.module, "tensor": e.cut.tensor,
              "fraction_of_flops_before": e.cut.fraction_before,
              "classes_enabled": int(np.isfinite(e.thresholds).sum()),
              "exit_rate": evaluation.exit_rates[k]} for k, e in enumerate(plan.exits)]
    level = next((e.guard.level for e in plan.exits if e.guard is not None), None)
    report = {
        "classifier_output": imported.binary.name if imported.binary is not None else imported.output,
        "flops_per_row_original": total_flops,
        "evaluated_on": evaluated_on,
        "evaluation_note": EVALUATION_NOTES[evaluated_on],
        "compute_reduction": evaluation.compute_reduction,
        "exit_rate": float(sum(evaluation.exit_rates)),
        "exits": exits,
        "disagreement": evaluation.disagreement,
        "disagreement_among_exited": evaluation.disagreement_among_exited,
        "accuracy_before": evaluation.accuracy_before,
        "accuracy_after": evaluation.accuracy_after,
        "bound": plan.certificate,
        "ood_guard": level,
        "traffic_scope": TRAFFIC_SCOPE.format(guard=GUARD_SCOPE[level is not None].format(level=level or 0)),
        "splits": planning.row_split.sizes,
        "verification": verification,
        "latency": latency,
        "latency_note": latency_note(latency),
    }
    report["import_notes"] = import_notes(imported)
    return report


def import_notes(imported: ImportedModel) -> list[str]:
    """What moco changed about the model's form to compile it (a freed batch, a one-column output)."""
    notes = []
    if imported.fixed_batch is not None:
        notes.append(f"the model's export fixed its inputs at a batch of {imported.fixed_batch.size}; moco freed the "
                     "batch dimension (checked on calibration rows: one batch gives the outputs the model gives them "
                     "a batch at a time), so the compiled graph takes batches of any size")
    if imported.binary is not None:
        notes.append(f"output {imported.binary.name!r} is one column (a binary classifier's "
                     f"{'probability' if imported.binary.sigmoid else 'logit'}): moco planned and verified its "
                     "two-class form [0, logit] and ships the column as the difference of that form's two values "
                     "(the logit itself on rows that run the whole network, the exit's log-odds on the others)"
                     + (", through the model's Sigmoid" if imported.binary.sigmoid else ""))
    return notes


class _InputKeeper:
    """Passes batches through and keeps the model inputs of the first ``limit`` rows."""

    def __init__(self, input_names: list[str], limit: int) -> None:
        self._names = input_names
        self._limit = limit
        self._kept: list[dict[str, np.ndarray]] = []
        self._rows = 0

    def tee(self, batches: Iterable[dict]) -> Iterator[dict]:
        for batch in batches:
            take = min(self._limit - self._rows, len(batch[self._names[0]]))
            if take > 0:
                self._kept.append({name: batch[name][:take] for name in self._names})
                self._rows += take
            yield batch

    def inputs(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate([part[name] for part in self._kept]) for name in self._names}
