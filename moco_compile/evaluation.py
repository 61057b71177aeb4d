"""``moco evaluate BUILD_DIR --traffic traffic.npz``: the 30-day evaluation, in shadow mode.

A sample of the user's real traffic runs through the original model and the
compiled one side by side (same process, same providers, same batches).  The
result says how often the compiled model's class differs from the original's
(with an exact confidence interval, and whether that is consistent with the
certified budget), where rows left, how much compute and time that saved, and
what that projects to in device-hours and money over a period at a given
request rate.  Windows of the stream where exits fall or disagreement rises past
the budget (beyond binomial noise) are flagged: that is what drift away from
the calibration data looks like.  Written as ``evaluation.json`` and an HTML
page with plots beside the build's other files.
"""
from __future__ import annotations

import html
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moco_compile.build import Build, recorded_output
from moco_compile.calibration_data import CalibrationSpec, for_inputs
from moco_compile.calibration_images import ImageCalibration
from moco_compile.calibration_text import TextCalibration
from moco_compile.constants import LABELS
from moco_compile.errors import CalibrationDataError, MocoError, ModelError
from moco_compile.importer import import_model, load_original
from moco_compile.outputs import GENERATOR, add_to_manifest, check_output_file, staged_output_file
from moco_compile.passes.graph.fixed_batch import free_batch
from moco_compile.passes.planning.bounds import clopper_pearson_interval
from moco_compile.reports.html import cell_html, figure_html, page_html, percent_text, table_html
from moco_compile.runtime.session import ExitSession
from moco_compile.runtime.shadow import ShadowRun, project_savings, shadow_run, stream_drift
from moco_compile.scale.shards import ShardedData

EVALUATION_JSON = "evaluation.json"
EVALUATION_HTML = "evaluation.html"


def evaluate_build(build_dir: str | os.PathLike,
                   traffic: Mapping[str, Any] | ShardedData | TextCalibration | ImageCalibration, *,
                   original: str | os.PathLike | None = None, providers: Sequence[str] | None = None,
                   require_gpu: bool = False, batch_size: int = 64, qps: float = 100.0, days: float = 30.0,
                   utilisation: float = 0.6, device_hour_price: float | None = None, windows: int = 20,
                   show_progress: bool = True) -> dict:
    """Run ``traffic`` through the original and the compiled model of ``build_dir``; return the evaluation.

    Parameters
    ----------
    build_dir:
        Output directory of ``moco compile``.
    traffic:
        ``{input name: array, ...}`` (rows on axis 0, in arrival order) and optional ``labels``; or
        :class:`~moco_compile.scale.shards.ShardedData`: shard files (in arrival order) shadow-run on Ray; or
        texts / image files for a Hugging Face classifier (:mod:`~moco_compile.calibration_text`,
        :mod:`~moco_compile.calibration_images`).
    original:
        The original ONNX model or Hugging Face directory; default: the one compile recorded, refused if it
        changed since.
    providers, require_gpu:
        As :class:`~moco_compile.runtime.session.ExitSession`; both models use the same.
    batch_size:
        Rows per batch, as the serving system would batch them.
    qps, days, utilisation, device_hour_price:
        The projection: requests per second, period, fraction of paid device time spent serving
        at the measured speed, and price per device-hour (optional).
    windows:
        Number of consecutive windows of the stream checked for drift.
    """
    _check_settings(batch_size, qps, days, utilisation, device_hour_price, windows)
    build_dir = Path(build_dir)
    build = Build.load(build_dir)
    compiled_path, report, original_path = build.model_path, build.report, build.original_model(original)
    source = load_original(original_path)  # a Hugging Face directory: exported as compile exported it
    imported = import_model(source, output=recorded_output(build, source, original_path))
    prepared = for_inputs(traffic, imported.input_names)
    if prepared is not traffic:  # texts or images, prepared for the model's inputs: in memory, as an .npz is
        traffic = _in_memory(prepared)
    spec = CalibrationSpec(imported.model, imported.num_classes)
    binary = imported.binary  # a one-column output: the models' own output and its classes
    output, classes = (binary.name, binary.classes) if binary is not None else (imported.output, None)
    fixed = imported.fixed_batch  # the original takes one batch size: its freed graph, checked at compile, serves
    original_model = source if fixed is None else free_batch(fixed.model, fixed.size)
    sessions = {name: ExitSession(model, providers, require_gpu=require_gpu)
                for name, model in (("original", original_model), ("compiled", compiled_path))}
    if sessions["compiled"].input_names != sessions["original"].input_names:
        raise ModelError(f"{original_path} takes inputs {sessions['original'].input_names} but the build's "
                         f"model takes {sessions['compiled'].input_names}: pass the model it was compiled from")
    if isinstance(traffic, ShardedData):
        from moco_compile.scale.driver import shadow_sharded

        run, labels = shadow_sharded(original_model, compiled_path, output, spec, traffic, providers,
                                     batch_size, show_progress, classes)
        sessions["compiled"].statistics.add(run.exits)
    else:
        run, labels = _shadow_local(sessions, output, spec.check(traffic, "traffic"), batch_size,
                                    show_progress, classes)
    return _evaluation(build_dir, report, original_path, run, sessions, labels, batch_size,
                       dict(qps=qps, days=days, utilisation=utilisation, device_hour_price=device_hour_price),
                       windows)


def _in_memory(rows: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Traffic as one mapping of arrays: ``rows`` itself, or its batches joined."""
    if isinstance(rows, Mapping):
        return dict(rows)
    batches = list(rows)
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def _shadow_local(sessions: Mapping[str, ExitSession], output: str, checked: dict[str, np.ndarray],
                  batch_size: int, show_progress: bool,
                  classes: Callable[[np.ndarray], np.ndarray] | None) -> tuple[ShadowRun, np.ndarray | None]:
    """The shadow run in this process over validated traffic; and its labels, if given."""
    labels = checked.pop(LABELS, None)
    rows = len(next(iter(checked.values())))
    if rows == 0:
        raise CalibrationDataError("traffic: no rows; give a sample of the requests the model serves")
    batches = [{name: values[start:start + batch_size] for name, values in checked.items()}
               for start in range(0, rows, batch_size)]
    with Progress(TextColumn("shadow run"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not show_progress, transient=True) as progress:
        task = progress.add_task("shadow", total=rows)
        run = shadow_run(sessions["original"], sessions["compiled"], batches, output,
                         on_batch=lambda n: progress.advance(task, n), classes=classes)
    return run, labels


def _check_settings(batch_size: int, qps: float, days: float, utilisation: float,
                    device_hour_price: float | None, windows: int) -> None:
    problems = [f"{name} must be {rule}, got {value}" for name, value, ok, rule in (
        ("--batch-size", batch_size, batch_size >= 1, "at least 1"),
        ("--qps", qps, qps > 0, "positive"),
        ("--days", days, days > 0, "positive"),
        ("--utilisation", utilisation, 0 < utilisation <= 1, "in (0, 1]"),
        ("--gpu-hour-price", device_hour_price, device_hour_price is None or device_hour_price >= 0, "0 or more"),
        ("--windows", windows, windows >= 1, "at least 1")) if not ok]
    if problems:
        raise MocoError("; ".join(problems))


def _evaluation(build_dir: Path, report: dict, original_path: Path, run: ShadowRun,
                sessions: Mapping[str, ExitSession], labels: np.ndarray | None, batch_size: int,
                projection: dict, windows: int) -> dict:
    bound = report["bound"]
    budget, confidence = float(bound["max_disagreement"]), float(bound.get("confidence", 0.95))
    disagreements = int(run.disagrees.sum())
    low, high = clopper_pearson_interval(disagreements, run.rows, confidence)
    expected_exit_rate = float(report.get("exit_rate") or 0.0)
    compile_rows = (report.get("splits") or {}).get(report.get("evaluated_on"))
    stream = stream_drift(run.exits, run.disagrees, expected_exit_rate, budget, windows, confidence,
                          compile_rows=compile_rows)
    seconds = {"original": run.original_seconds / run.rows, "compiled": run.compiled_seconds / run.rows}
    statistics = sessions["compiled"].statistics
    flags = _flags(low, budget, confidence, stream)
    return {
        "generator": GENERATOR,
        "build": str(build_dir), "original": str(original_path), "traffic_rows": run.rows,
        "provider": sessions["compiled"].provider, "batch_size": batch_size,
        "disagreement": {"rows": disagreements, "fraction": disagreements / run.rows,
                         "interval": [low, high], "confidence": confidence, "certified_budget": budget,
                         "consistent_with_budget": low <= budget},
        "accuracy_original": None if labels is None else float((run.original_classes == labels).mean()),
        "accuracy_compiled": None if labels is None else float((run.compiled_classes == labels).mean()),
        "exit_rate": float((run.exits >= 0).mean()), "exit_rate_at_compile": expected_exit_rate,
        "exits": statistics.to_dict(),
        "compute_reduction": statistics.compute_reduction,
        "seconds_per_row": seconds,
        "latency_ratio": seconds["compiled"] / seconds["original"],
        "throughput_ratio": seconds["original"] / seconds["compiled"],
        "projection": {**project_savings(seconds["original"], seconds["compiled"], **projection),
                       "qps": projection["qps"], "days": projection["days"],
                       "utilisation": projection["utilisation"],
                       "assumptions": f"devices like this one ({sessions['compiled'].provider}) serve batches of "
                                      f"{batch_size} rows at the measured time per row and are busy "
                                      f"{projection['utilisation']:.0%} of the time they are paid for; traffic "
                                      "like this sample"},
        "windows": [window.to_dict() for window in stream],
        "drift": flags,
    }


def _flags(low: float, budget: float, confidence: float, stream: Sequence) -> list[str]:
    flags = []
    if low > budget:
        flags.append(f"disagreement is above the certified budget of {budget:.2%} (the {confidence:.0%} interval "
                     f"starts at {low:.2%}): this traffic is not like the calibration data; compile again "
                     "on a sample of it")
    fell = [w.start for w in stream if w.exits_fell]
    if fell:
        flags.append(f"exit rate fell below the rate at compile time in {len(fell)} window(s), from row {fell[0]}: "
                     "the traffic is drifting away from the calibration data")
    above = [w.start for w in stream if w.disagreement_above_budget]
    if above:
        flags.append(f"disagreement rose past the budget in {len(above)} window(s), from row {above[0]}")
    return flags


# ----------------------------------------------------------------------------- writing

def check_evaluation_paths(build_dir: str | os.PathLike, *, json_path: str | os.PathLike | None = None,
                           html_path: str | os.PathLike | None = None, force: bool = False) -> tuple[Path, Path]:
    """The paths the evaluation goes to (default: in ``build_dir``); :class:`OutputError` unless both may
    be written (new, or an evaluation moco wrote there and ``force``)."""
    json_path = Path(json_path) if json_path is not None else Path(build_dir) / EVALUATION_JSON
    html_path = Path(html_path) if html_path is not None else Path(build_dir) / EVALUATION_HTML
    check_output_file(json_path, "shadow evaluation", "json", force=force)
    check_output_file(html_path, "shadow evaluation page", "page", force=force)
    return json_path, html_path


def write_evaluation(build_dir: str | os.PathLike, evaluation: dict, *, json_path: str | os.PathLike | None = None,
                     html_path: str | os.PathLike | None = None, force: bool = False) -> tuple[Path, Path]:
    """Write ``evaluation.json`` and ``evaluation.html`` (default: in ``build_dir``), each atomically;
    a file already there is replaced only when moco wrote it and ``force`` is given."""
    json_path, html_path = check_evaluation_paths(build_dir, json_path=json_path, html_path=html_path, force=force)
    page = evaluation_page(evaluation)
    with staged_output_file(json_path, "shadow evaluation", "json", force=force) as temporary:
        temporary.write_text(json.dumps(evaluation, indent=2))
    with staged_output_file(html_path, "shadow evaluation page", "page", force=force) as temporary:
        temporary.write_text(page, encoding="utf-8")
    add_to_manifest(json_path)
    add_to_manifest(html_path)
    return json_path, html_path


# ----------------------------------------------------------------------------- the page

def evaluation_page(evaluation: dict) -> str:
    """The evaluation as one HTML page: summary, projection, drift flags and plots."""
    e, d, p = evaluation, evaluation["disagreement"], evaluation["projection"]
    summary = [
        ("disagreement with the original", percent_text(d["fraction"], 2), d["fraction"], "disagreement"),
        (f"{d['confidence']:.0%} interval", f"{d['interval'][0]:.2%} to {d['interval'][1]:.2%}", None, "interval"),
        ("certified budget", percent_text(d["certified_budget"], 2), d["certified_budget"], "budget"),
        ("consistent with the budget", "yes" if d["consistent_with_budget"] else "NO", d["consistent_with_budget"],
         "consistent_with_budget"),
        ("exit rate (at compile)", f"{e['exit_rate']:.1%} ({e['exit_rate_at_compile']:.1%})", e["exit_rate"],
         "exit_rate"),
        ("compute reduction", percent_text(e["compute_reduction"]), e["compute_reduction"], "compute_reduction"),
        ("time per row, compiled / original", f"{e['latency_ratio']:.3f}", e["latency_ratio"], "latency_ratio"),
        ("accuracy original / compiled", "-" if e["accuracy_original"] is None else
         f"{e['accuracy_original']:.2%} / {e['accuracy_compiled']:.2%}", e["accuracy_compiled"], "accuracy"),
    ]
    projection = [
        (f"device-hours over {p['days']:g} days at {p['qps']:g} requests/s, original",
         f"{p['device_hours_original']:.1f}", p["device_hours_original"], "hours_original"),
        ("device-hours, compiled", f"{p['device_hours_compiled']:.1f}", p["device_hours_compiled"], "hours_compiled"),
        ("device-hours saved", f"{p['device_hours_saved']:.1f} ({p['fraction_saved']:.1%})",
         p["device_hours_saved"], "hours_saved"),
        ("cost saved", "-" if p["cost_saved"] is None else f"{p['cost_saved']:,.2f} at {p['device_hour_price']:g} "
         "per device-hour", p["cost_saved"], "cost_saved"),
    ]

    def rows(items) -> list[str]:
        return [f"<tr><th>{label}</th>{cell_html(text, value, id_=key)}</tr>" for label, text, value, key in items]

    flags = "".join(f'<li class="flag">{html.escape(flag)}</li>' for flag in e["drift"]) or \
        '<li class="ok">no window flagged: exits and disagreement stay as at compile time</li>'
    body = [
        f"<h1>moco evaluation: {e['traffic_rows']:,} rows of traffic</h1>",
        f"<p>Build {html.escape(e['build'])}, original {html.escape(e['original'])}, on {e['provider']}, "
        f"batches of {e['batch_size']}.</p>",
        table_html("summary", "Shadow run: compiled vs original on the same rows", ("figure", "value"), rows(summary)),
        "<h2>Drift</h2>", f'<ul id="drift">{flags}</ul>',
        "<h2>Projection</h2>", f"<p>Assumptions: {p['assumptions']}.</p>",
        table_html("projection", "Projected savings", ("figure", "value"), rows(projection)),
        "<h2>Plots</h2>",
        figure_html("stream", "Exit rate and disagreement over the traffic stream",
                    "Per window of consecutive rows: the exit rate (compile-time rate dashed) and the disagreement "
                    "with the original (budget dashed); flagged windows are marked.",
                    lambda figure: _draw_stream(figure, e)),
        figure_html("projection", "Projected device-hours",
                    "Cumulative device-hours to serve the traffic with each model over the period.",
                    lambda figure: _draw_projection(figure, p)),
    ]
    return page_html(f"moco evaluation: {Path(e['build']).name}", body)


def _draw_stream(figure, evaluation: dict) -> None:
    windows = evaluation["windows"]
    starts = [w["start"] for w in windows]
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.step(starts, [100 * w["exit_rate"] for w in windows], where="post", label="exit rate")
    top.axhline(100 * evaluation["exit_rate_at_compile"], linestyle="--", color="gray", label="at compile")
    top.scatter([w["start"] for w in windows if w["exits_fell"]],
                [100 * w["exit_rate"] for w in windows if w["exits_fell"]], color="red", zorder=3, label="fell")
    top.set_ylabel("exit rate (%)")
    top.legend(loc="lower left", fontsize=8)
    bottom.step(starts, [100 * w["disagreement"] for w in windows], where="post", color="tab:orange")
    bottom.axhline(100 * evaluation["disagreement"]["certified_budget"], linestyle="--", color="gray")
    bottom.scatter([w["start"] for w in windows if w["disagreement_above_budget"]],
                   [100 * w["disagreement"] for w in windows if w["disagreement_above_budget"]], color="red",
                   zorder=3)
    bottom.set_ylabel("disagreement (%)")
    bottom.set_xlabel("row of the traffic stream")


def _draw_projection(figure, projection: dict) -> None:
    ax = figure.add_subplot()
    days = np.linspace(0, projection["days"], 61)
    for name, color in (("original", "tab:gray"), ("compiled", "tab:blue")):
        ax.plot(days, projection[f"device_hours_{name}"] * days / projection["days"], label=name, color=color)
    ax.set_xlabel("day")
    ax.set_ylabel("device-hours (cumulative)")
    ax.legend()
