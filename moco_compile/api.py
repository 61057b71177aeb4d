"""Public API: ``compile`` a classifier into an early-exit ONNX graph."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from moco_compile.calibration import CalibrationSpec, iter_batches
from moco_compile.errors import BudgetError, CalibrationDataError, ModelError
from moco_compile.frame import ActivationFrame, load_frame, written_by_moco
from moco_compile.importer import ImportedModel, TextInputs, import_model
from moco_compile.outputs import check_output_dir, check_output_file, staged_output_dir, staged_output_file
from moco_compile.passes.bounds import rows_needed
from moco_compile.passes.calibrate import LABELS, PREDICTIONS, calibrate, cut_column, variant_features
from moco_compile.passes.cost import flops_per_row, measure_shapes
from moco_compile.passes.cut_points import CutPoint, find_cut_points, localize_side_tensors
from moco_compile.passes.plan import Exit, ExitPlan, ExitPlanner, NoPlanError, PlanEvaluation, Split
from moco_compile.passes.pooling import pooling_cost, variants_for
from moco_compile.passes.rewrite import insert_exits
from moco_compile.passes.rules import SoftmaxRuleFitter, out_of_fold_scores, select_variant
from moco_compile.passes.verify import verify_compiled

# Calibration rows are assigned at random (seeded) to: fitting rules and designing the
# plan (cross-fitted), the certifying test, and the report split that nothing else touches.
SPLITS = ("rules", "test", "report")
SPLIT_FRACTIONS = (0.55, 0.30, 0.15)
SPLIT_COLUMN = "split"  # frame column: index into SPLITS
MAX_KEPT_REPORT_ROWS = 4096


@dataclass
class CompileResult:
    """Everything ``compile`` produced; ``save`` writes it to a directory."""

    model: onnx.ModelProto
    plan: ExitPlan
    report: dict
    frame: ActivationFrame

    def save(self, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
        """Write ``model.onnx``, ``plan.json``, ``report.json`` and ``frame.arrow`` atomically.

        A non-empty ``out_dir`` is replaced only when it holds a previous moco output and
        ``force`` is given (see :mod:`moco_compile.outputs`).
        """
        return write_outputs(Path(out_dir), self, force=force)


def compile(model: Any, calibration: Mapping[str, Any] | Iterable[Mapping[str, Any]], *,
            out_dir: str | os.PathLike | None = None, output: str | None = None,
            example_input: Any = None, max_disagreement: float = 0.01, confidence: float = 0.95,
            max_accuracy_drop: float | None = None, allow_no_exit: bool = False, seed: int = 0,
            batch_size: int = 256, measure_latency: bool = True,
            show_progress: bool = True, force: bool = False) -> CompileResult:
    """Compile ``model`` into one ONNX graph with early exits.

    Parameters
    ----------
    model:
        An ONNX file path, an ``onnx.ModelProto`` or a ``torch.nn.Module`` (then
        ``example_input`` is required).
    calibration:
        A mapping ``{input name: array, ..., "labels": array}`` or an iterable of
        such mappings (batches), rows on axis 0.  ``labels`` is optional.
    out_dir:
        When given, ``model.onnx``, ``plan.json``, ``report.json`` and
        ``frame.arrow`` are written there (all or nothing), with a manifest listing
        them.  It must be new, empty, or (with ``force``) a previous moco output holding
        only the files its manifest lists; never the current or home directory or the
        directory of the model file.  Checked before the work starts and again at the end.
    max_disagreement, confidence:
        With probability ``confidence``, the compiled model's class differs from
        the full model's on at most ``max_disagreement`` of inputs.
    max_accuracy_drop:
        Optional second budget (needs labels): fraction of inputs the full model
        gets right and the compiled model gets wrong.
    allow_no_exit:
        Emit the unchanged graph (``moco_exit`` always -1) instead of failing
        when no plan with exits meets the budget.
    force:
        Replace a previous moco output in ``out_dir``.
    """
    _check_budget(max_disagreement, confidence, max_accuracy_drop)
    inputs = _input_files(model)
    if out_dir is not None:
        check_output_dir(out_dir, inputs, force)
    imported = import_model(model, output=output, example_input=example_input)
    batches, cuts = cut_points_of(imported, calibration, batch_size)
    total_flops = cuts[0].flops_before + cuts[0].flops_after
    with tempfile.TemporaryDirectory(prefix="moco-") as scratch:
        splitter = _RowSplitter(seed, imported.input_names)
        frame = calibrate(imported.model, imported.output, cuts, splitter.tee(batches),
                          Path(scratch) / "frame.arrow", show_progress=show_progress).in_memory()
    split = splitter.assignment
    frame = frame.with_column(SPLIT_COLUMN, split)
    _check_rows(split, max_disagreement, confidence)
    with _stage("fitting rules and planning exits", show_progress):
        plan = _plan(imported, cuts, frame, split, total_flops, max_disagreement, confidence,
                     max_accuracy_drop, allow_no_exit)
    compiled = insert_exits(imported.model, plan.exits, imported.output)
    report_rows = np.flatnonzero(split == SPLITS.index("report"))
    evaluation = _evaluate(plan, frame.take(report_rows))
    kept = splitter.report_inputs()
    kept_rows = len(next(iter(kept.values())))
    with _stage("verifying the compiled graph", show_progress):
        verification = verify_compiled(compiled, imported.model, imported.output, kept,
                                       evaluation.exit_index[:kept_rows],
                                       evaluation.compiled_predictions[:kept_rows])
    with _stage("measuring latency (batch 1 and 64)", show_progress and measure_latency):
        latency = _latency(imported.model, compiled, kept) if measure_latency else {}
    report = _report(imported, plan, evaluation, verification.to_dict(), latency, split, total_flops)
    result = CompileResult(compiled, plan, report, frame)
    if out_dir is not None:
        write_outputs(Path(out_dir), result, inputs=inputs, force=force)
    return result


def calibrate_frame(model: Any, calibration: Mapping[str, Any] | Iterable[Mapping[str, Any]],
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
    check_output_file(out, "frame", written_by_moco, inputs, force)
    imported = import_model(model, output=output, example_input=example_input)
    batches, cuts = cut_points_of(imported, calibration, batch_size)
    with staged_output_file(out, "frame", written_by_moco, inputs, force) as temporary:
        calibrate(imported.model, imported.output, cuts, batches, temporary, show_progress=show_progress, raw=raw)
    return load_frame(out)


def cut_points_of(imported: ImportedModel, calibration: Mapping[str, Any] | Iterable[Mapping[str, Any]],
                batch_size: int) -> tuple[Iterable[dict], list[CutPoint]]:
    """Validated calibration batches, and the model's cut points measured on the first row.

    Text models (``imported.text``) get their mask inputs as side inputs that may cross a cut.
    """
    spec = CalibrationSpec(imported.model, imported.num_classes)
    batches = iter_batches(calibration, spec, batch_size)
    text = imported.text
    if text is not None:
        # later layers recompute the extended mask from the compressed mask input
        imported.model = localize_side_tensors(imported.model, text.side)
        batches = _checked_text_batches(batches, text, imported.input_names)
    batches = _peekable(batches)
    first = batches.peek()
    shapes = measure_shapes(imported.model, {name: first[name][:1] for name in imported.input_names})
    node_flops = flops_per_row(imported.model, shapes)
    if text is None:
        cuts = find_cut_points(imported.model, node_flops, shapes, imported.scopes)
    else:
        cuts = find_cut_points(imported.model, node_flops, shapes, imported.scopes, side_inputs=text.side,
                               sequence_mask=text.mask, min_fraction_before=0.0)
    if not cuts:
        raise ModelError("the model has no cut point: no tensor separates it into a prefix and a "
                         "remainder with real compute on both sides, so there is nowhere to exit")
    return batches, cuts


def _checked_text_batches(batches: Iterable[dict], text: TextInputs, names: list[str]) -> Iterator[dict]:
    """Text calibration batches: token inputs of one ``[N, S]`` shape, ``S`` within the model's limit."""
    for number, batch in enumerate(batches):
        shapes = {name: batch[name].shape for name in names}
        mask_shape = shapes[text.mask]
        if any(len(shape) != 2 or shape != mask_shape for shape in shapes.values()):
            raise CalibrationDataError(f"calibration batch {number}: the token inputs must all be "
                                       f"[rows, sequence length] arrays of one shape, got {shapes}; "
                                       "tokenize with padding (e.g. padding='max_length')")
        if text.max_length is not None and mask_shape[1] > text.max_length:
            raise CalibrationDataError(f"calibration batch {number}: sequences have {mask_shape[1]} tokens, "
                                       f"more than the model's maximum of {text.max_length}; tokenize with "
                                       f"truncation=True, max_length<={text.max_length}")
        yield batch


def _check_budget(max_disagreement: float, confidence: float, max_accuracy_drop: float | None) -> None:
    if not 0 < max_disagreement < 1:
        raise ValueError(f"max_disagreement must be in (0, 1), got {max_disagreement}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if max_accuracy_drop is not None and not 0 < max_accuracy_drop < 1:
        raise ValueError(f"max_accuracy_drop must be in (0, 1), got {max_accuracy_drop}")


def _input_files(model: Any) -> list[Path]:
    """The input files an output must not touch: the model, when it is given as a path."""
    return [Path(model)] if isinstance(model, (str, os.PathLike)) else []


def _check_rows(split: np.ndarray, max_disagreement: float, confidence: float) -> None:
    test_rows = int((split == SPLITS.index("test")).sum())
    needed = rows_needed(max_disagreement, confidence)
    if test_rows < needed:
        fraction = SPLIT_FRACTIONS[SPLITS.index("test")]
        total = int(np.ceil(needed / fraction * 1.1))
        raise CalibrationDataError(
            f"too few calibration rows: {len(split)} given, {test_rows} of them in the test split; "
            f"certifying a disagreement of {max_disagreement:g} at confidence {confidence:g} needs "
            f"at least {needed} test rows even with zero disagreements, i.e. about {total} calibration "
            f"rows ({fraction:.0%} go to the test split). Give more rows or raise --max-disagreement.")


def _plan(imported: ImportedModel, cuts: list[CutPoint], frame: ActivationFrame, split: np.ndarray,
          total_flops: float, max_disagreement: float, confidence: float,
          max_accuracy_drop: float | None, allow_no_exit: bool) -> ExitPlan:
    predictions = frame[PREDICTIONS]
    labels = frame[LABELS] if LABELS in frame else None
    rows = {name: np.flatnonzero(split == i) for i, name in enumerate(SPLITS)}
    fitter = SoftmaxRuleFitter()
    candidates, design_scores, test_scores = [], [], []
    for cut in cuts:
        column = cut_column(cut)
        variants = {variant: variant_features(frame, column, variant)
                    for variant in variants_for(cut.shape, cut.sequence_mask)}
        if not all(np.isfinite(values).all() for values in variants.values()):
            raise CalibrationDataError(f"the model's activations at {column} contain NaN or Inf; "
                                       "check the calibration inputs are in the range the model expects")
        fit_rows, targets = rows["rules"], predictions[rows["rules"]]
        variant, scores = select_variant({v: f[fit_rows] for v, f in variants.items()}, targets,
                                         imported.num_classes, fitter, precision=1 - max_disagreement / 2)
        rule_flops = pooling_cost(cut.shape, variant) + scores.flops + 2 * imported.num_classes
        candidates.append(Exit(cut, column, variant, scores, np.full(imported.num_classes, np.inf), rule_flops))
        design_scores.append(out_of_fold_scores(fitter, variants[variant][fit_rows], targets,
                                                imported.num_classes))
        test_scores.append(scores(variants[variant][rows["test"]]))

    def labels_of(name: str) -> np.ndarray | None:
        return None if labels is None else labels[rows[name]]

    design = Split(design_scores, predictions[rows["rules"]], labels_of("rules"))
    test = Split(test_scores, predictions[rows["test"]], labels_of("test"))
    planner = ExitPlanner(max_disagreement, confidence, max_accuracy_drop)
    try:
        plan = planner.fit(candidates, design, test, total_flops)
    except NoPlanError as error:
        raise BudgetError(f"no exit plan can be certified ({error})") from error
    if not plan.exits and not allow_no_exit:
        raise BudgetError(
            f"no exit plan meets --max-disagreement {max_disagreement:g} at --confidence "
            f"{confidence:g}: every plan with exits failed the test on {len(rows['test'])} held-out "
            "rows. Raise the budget, give more calibration rows, or pass --allow-no-exit to emit "
            "the unchanged graph")
    return plan


def _evaluate(plan: ExitPlan, frame: ActivationFrame) -> PlanEvaluation:
    features = [variant_features(frame, e.column, e.pooling) for e in plan.exits]
    return plan.evaluate(features, frame[PREDICTIONS], frame[LABELS] if LABELS in frame else None)


def _latency(original: onnx.ModelProto, compiled: onnx.ModelProto,
             inputs: Mapping[str, np.ndarray]) -> dict:
    from moco_compile.runtime.latency import compare_latency
    from moco_compile.runtime.session import make_session

    sessions = {"original": make_session(original, ["CPUExecutionProvider"]),
                "compiled": make_session(compiled, ["CPUExecutionProvider"])}
    result = {}
    for batch_size in (1, 64):
        seconds = compare_latency(sessions, inputs, batch_size, min_seconds=1.0)
        result[f"batch_{batch_size}"] = {"original_ms": seconds["original"] * 1e3,
                                         "compiled_ms": seconds["compiled"] * 1e3,
                                         "ratio": seconds["compiled"] / seconds["original"]}
    return result


def _report(imported: ImportedModel, plan: ExitPlan, evaluation: PlanEvaluation, verification: dict,
            latency: dict, split: np.ndarray, total_flops: float) -> dict:
    exits = [{"exit": k, "module": e.cut.module, "tensor": e.cut.tensor,
              "fraction_of_flops_before": e.cut.fraction_before,
              "classes_enabled": int(np.isfinite(e.thresholds).sum()),
              "exit_rate": evaluation.exit_rates[k]} for k, e in enumerate(plan.exits)]
    report = {
        "classifier_output": imported.output,
        "flops_per_row_original": total_flops,
        "compute_reduction": evaluation.compute_reduction,
        "exit_rate": float(sum(evaluation.exit_rates)),
        "exits": exits,
        "disagreement": evaluation.disagreement,
        "disagreement_among_exited": evaluation.disagreement_among_exited,
        "accuracy_before": evaluation.accuracy_before,
        "accuracy_after": evaluation.accuracy_after,
        "bound": plan.certificate,
        "splits": {name: int((split == i).sum()) for i, name in enumerate(SPLITS)},
        "verification": verification,
        "latency": latency,
    }
    return report


def write_outputs(out_dir: Path, result: CompileResult, *, inputs: Iterable[str | os.PathLike] = (),
                  force: bool = False) -> Path:
    """Write all outputs into a staging sibling directory and swap it into place at ``out_dir``.

    ``inputs``: files whose directory must not be replaced.  The rules and the swap are
    :func:`moco_compile.outputs.staged_output_dir`'s.
    """
    with staged_output_dir(out_dir, inputs, force) as staging:
        onnx.save(result.model, str(staging / "model.onnx"))
        (staging / "plan.json").write_text(json.dumps(result.plan.to_dict(), indent=1))
        (staging / "report.json").write_text(json.dumps(result.report, indent=2))
        result.frame.save(staging / "frame.arrow")
    return out_dir


@contextmanager
def _stage(description: str, show: bool) -> Iterator[None]:
    """A spinner on stderr while a stage of the compile runs (when ``show``)."""
    if not show:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(description):
        yield


class _peekable:
    def __init__(self, iterator: Iterator[dict]) -> None:
        self._iterator = iterator
        self._head: list[dict] = []

    def peek(self) -> dict:
        if not self._head:
            try:
                self._head.append(next(self._iterator))
            except StopIteration:
                raise CalibrationDataError("the calibration data has no rows") from None
        return self._head[0]

    def __iter__(self) -> Iterator[dict]:
        yield from self._head
        self._head = []
        yield from self._iterator


class _RowSplitter:
    """Assigns each streamed row to a split (seeded) and keeps report rows' inputs."""

    def __init__(self, seed: int, input_names: list[str]) -> None:
        self._rng = np.random.default_rng(seed)
        self._names = input_names
        self._parts: list[np.ndarray] = []
        self._kept: list[dict[str, np.ndarray]] = []
        self._kept_rows = 0

    def tee(self, batches: Iterable[dict]) -> Iterator[dict]:
        report = SPLITS.index("report")
        for batch in batches:
            rows = len(batch[self._names[0]])
            assignment = self._rng.choice(len(SPLITS), size=rows, p=SPLIT_FRACTIONS)
            self._parts.append(assignment)
            chosen = np.flatnonzero(assignment == report)[:MAX_KEPT_REPORT_ROWS - self._kept_rows]
            if len(chosen):
                self._kept.append({name: batch[name][chosen] for name in self._names})
                self._kept_rows += len(chosen)
            yield batch

    @property
    def assignment(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros(0, np.int64)

    def report_inputs(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate([part[name] for part in self._kept]) for name in self._names}
