"""``moco report DIR``: one self-contained HTML page from a compile's output directory.

The page holds the tables of ``report.json`` (summary, certificate, latency,
exits, splits, verification) and PNG plots embedded as base64 ``<img>``:

1. exit rate per exit (report split, or the test split when there is none),
2. cumulative compute: the fraction of rows still running and the expected
   compute spent so far, against the position in the network (fraction of FLOPs),
3. the compute / disagreement curve of the nested plan family on the test split
   (certified plans vs not, the chosen plan, the budget),
4. per exit, a 2-D PCA projection of the features its rule reads, coloured by the
   full model's prediction (needs ``frame.arrow``; skipped with a note otherwise).

Key numbers carry stable ids / classes and their raw value in ``data-value``
(e.g. ``<td id="compute_reduction" data-value="0.4953">49.5%</td>``), so tools
and tests can read the page back.  The page is written atomically.
"""
from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa

from moco_compile.build import Build, FRAME_ARROW, MODEL_ONNX, PLAN_JSON, REPORT_JSON
from moco_compile.constants import PREDICTIONS
from moco_compile.frame import ActivationFrame, load_frame
from moco_compile.outputs import add_to_manifest, check_output_file, staged_output_file
from moco_compile.passes.calibration.calibrate import variant_columns, variant_features
from moco_compile.reports.html import (
    ReportRenderError, cell_html, figure_html, is_number, key_value_row, number_text, page_html, percent_text, table_html)

REPORT_HTML = "report.html"
PROJECTION_ROWS = 2000  # rows subsampled from the frame for each projection plot


def render_report(out_dir: str | os.PathLike, html_path: str | os.PathLike | None = None, *,
                  force: bool = False) -> Path:
    """Render the compile output in ``out_dir`` as one HTML page; return its path.

    ``html_path`` defaults to ``out_dir/report.html``.  The file is written to a
    temporary name first and renamed into place, so it is never partly written,
    and listed in the manifest of the directory it lands in when that is a moco
    output.  An existing file there is replaced only when it is a page moco wrote
    and ``force`` is given (:class:`~moco_compile.errors.OutputError` otherwise).
    Needs only ``report.json`` and ``plan.json`` (:meth:`Build.load` with ``complete=False``:
    :class:`~moco_compile.errors.NotACompileOutputError` when one is missing,
    :class:`~moco_compile.errors.BuildError` when one is damaged).  Without ``frame.arrow``
    the projection plots are skipped.
    """
    out_dir = Path(out_dir)
    html_path = Path(html_path) if html_path is not None else out_dir / REPORT_HTML
    build = Build.load(out_dir, complete=False)
    check_output_file(html_path, "report page", "page", force=force)
    text = _Page(out_dir, build).render()
    with staged_output_file(html_path, "report page", "page", force=force) as temporary:
        temporary.write_text(text, encoding="utf-8")
    add_to_manifest(html_path)
    return html_path




class _Page:
    def __init__(self, out_dir: Path, build: Build) -> None:
        self.out_dir = out_dir
        self.report = report = build.report
        self.exit_plan = build.plan
        self.plan = plan = build.plan.to_dict()
        self.bound = report.get("bound") or plan.get("certificate") or {}
        self.certificate = plan.get("certificate") or self.bound
        self.exits = list(report.get("exits") or [])
        self.plan_exits = list(plan.get("exits") or [])
        self.total_flops = plan.get("total_flops") or report.get("flops_per_row_original")
        self._evaluated_on = report.get("evaluated_on", "report")
        self.notes: list[str] = list(report.get("import_notes") or [])

    # ---- assembly

    def render(self) -> str:
        figures = self._figures()
        title = f"moco compile report: {self.out_dir.name or self.out_dir}"
        body = [
            f"<h1>{html.escape(title)}</h1>",
            self._header(),
            "<h2>Summary</h2>",
            self._measured_on(),
            self._summary_table(),
            "<h2>Certificate</h2>",
            self._certificate_table(),
            "<h2>Latency</h2>",
            self._latency_table(),
            *self._phases_table(),
            "<h2>Exits</h2>",
            self._exits_table(),
            "<h2>Plots</h2>",
            *figures,
            "<h2>Calibration splits</h2>",
            self._splits_table(),
            "<h2>Verification of the compiled graph</h2>",
            self._verification_table(),
        ]
        return page_html(title, body, self.notes)

    def _measured_on(self) -> str:
        """Where the summary's figures come from (``evaluated_on``: the report split, or the test
        split when the calibration set was too small for one), in one sentence."""
        split = self._evaluated_on
        rows = (self.report.get("splits") or {}).get(split)
        note = self.report.get("evaluation_note") or f"estimates on the {split} rows"
        counted = f" ({rows} rows)" if is_number(rows) else ""
        return (f'<p id="measured_on" data-split="{html.escape(str(split))}">Figures other than the certificate are '
                f"measured on the <em>{html.escape(str(split))}</em> split{counted}: {html.escape(note)}.</p>")

    def _header(self) -> str:
        files = [name for name in (MODEL_ONNX, PLAN_JSON, REPORT_JSON, FRAME_ARROW) if (self.out_dir / name).exists()]
        items = [("directory", str(self.out_dir), "out_dir"),
                 ("classifier output", str(self.report.get("classifier_output", "-")), "classifier_output"),
                 ("files", ", ".join(files), "files")]
        rows = "".join(f"<dt>{html.escape(k)}</dt><dd id=\"{i}\">{html.escape(v)}</dd>" for k, v, i in items)
        return f'<dl id="header">{rows}</dl>'

    # ---- tables

    def _summary_table(self) -> str:
        r = self.report
        total = r.get("flops_per_row_original", self.total_flops)
        reduction = r.get("compute_reduction")
        expected = total * (1 - reduction) if is_number(total) and is_number(reduction) else None
        rows = [
            ("compute reduction (FLOPs, rules included)", "compute_reduction", reduction, percent_text(reduction)),
            ("rows exiting early", "exit_rate", r.get("exit_rate"), percent_text(r.get("exit_rate"))),
            ("disagreement with the full model", "disagreement", r.get("disagreement"),
             percent_text(r.get("disagreement"), 2)),
            ("disagreement among exited rows", "disagreement_among_exited", r.get("disagreement_among_exited"),
             percent_text(r.get("disagreement_among_exited"), 2)),
            ("accuracy of the full model", "accuracy_before", r.get("accuracy_before"),
             percent_text(r.get("accuracy_before"), 2)),
            ("accuracy of the compiled model", "accuracy_after", r.get("accuracy_after"),
             percent_text(r.get("accuracy_after"), 2)),
            ("MFLOPs per row, original", "flops_per_row_original", total,
             number_text(total / 1e6, ".2f") if is_number(total) else "-"),
            ("MFLOPs per row, compiled (expected)", "flops_per_row_compiled", expected,
             number_text(expected / 1e6, ".2f") if expected is not None else "-"),
        ]
        b = self.bound
        budget = b.get("max_disagreement")
        certified = (f"<= {percent_text(budget, 2)} at {percent_text(b.get('confidence'), 0)} confidence"
                     if is_number(budget) else "-")
        rows.append(("certified disagreement rate (a rate over traffic like the calibration rows, not the "
                     "fraction on any particular stretch of it)", "certified_budget", budget, certified))
        rows.append(("estimated upper bound on disagreement (not certified)", "estimated_upper_bound",
                     b.get("estimated_disagreement_upper_bound"),
                     percent_text(b.get("estimated_disagreement_upper_bound"), 2)))
        confidence = r.get("exited_confidence") or {}
        for label, key in (("exited rows' mean top probability, compiled (estimate)", "mean_top_probability"),
                           ("  the full model on the same rows", "mean_top_probability_full_model"),
                           ("  before confidence scales (softmax of margins)", "mean_top_probability_uncalibrated"),
                           ("exited rows' calibration error (ECE vs labels), compiled", "ece"),
                           ("  the full model on the same rows", "ece_full_model")):
            if is_number(confidence.get(key)):
                rows.append((label, f"exited_{key}", confidence[key], number_text(confidence[key], ".3f")))
        rows.append(("figures above measured on", "evaluated_on", r.get("evaluated_on"),
                     str(r.get("evaluation_note") or r.get("evaluated_on") or "-")))
        for name in ("batch_1", "batch_64"):
            timing = (r.get("latency") or {}).get(name)
            if isinstance(timing, Mapping) and is_number(timing.get("ratio")):
                rows.append((f"latency ratio {name.replace('_', ' ')} (compiled / original)",
                             f"latency_ratio_{name}", timing["ratio"], f"{timing['ratio']:.3f}x"))
        return table_html("summary", "Summary", ("metric", "value"),
                      [key_value_row(label, key, value, text) for label, key, value, text in rows])

    def _certificate_table(self) -> str:
        b = self.bound
        rows = [
            ("what is certified", "bound_certified", b.get("certified"),
             str(b.get("certified") or b.get("reason") or "-")),
            *([("note", "bound_note", None, str(b["note"]))] if b.get("note") else []),
            ("method", "bound_method", b.get("method"), str(b.get("method", "-"))),
            ("disagreement budget", "bound_max_disagreement", b.get("max_disagreement"),
             percent_text(b.get("max_disagreement"), 2)),
            ("accuracy-drop budget", "bound_max_accuracy_drop", b.get("max_accuracy_drop"),
             percent_text(b.get("max_accuracy_drop"), 2)),
            ("confidence", "bound_confidence", b.get("confidence"), percent_text(b.get("confidence"), 0)),
            ("test rows", "bound_test_rows", b.get("test_rows"), number_text(b.get("test_rows"))),
            ("disagreements on the test rows (rounding-sensitive rows included)", "bound_disagreements",
             b.get("disagreements"), number_text(b.get("disagreements"))),
            ("  of which only under float rounding", "bound_near_threshold_rows", b.get("near_threshold_rows"),
             number_text(b.get("near_threshold_rows"))),
            ("accuracy harm on the test rows", "bound_accuracy_harm", b.get("accuracy_harm"),
             number_text(b.get("accuracy_harm"))),
            ("p-value", "bound_p_value", b.get("p_value"), number_text(b.get("p_value"), ".3g")),
            ("estimated upper bound on disagreement (Clopper-Pearson on the chosen plan's test rows; "
             "an estimate, not certified)", "bound_estimated_disagreement_upper_bound",
             b.get("estimated_disagreement_upper_bound"), percent_text(b.get("estimated_disagreement_upper_bound"), 2)),
            ("plans tested (fixed sequence)", "bound_plans_tested", b.get("plans_tested"),
             number_text(b.get("plans_tested"))),
            ("chosen plan (index in the family)", "bound_chosen_plan", b.get("chosen_plan"),
             number_text(b.get("chosen_plan"))),
            ("plans in the family", "bound_family_size", b.get("family_size"), number_text(b.get("family_size"))),
            ("plan family chosen", "bound_family", b.get("family"), str(b.get("family", "-"))),
            ("how the family was chosen", "bound_family_selection", b.get("family_selection"),
             str(b.get("family_selection", "-"))),
            ("confidence the family was tested at", "bound_family_confidence", b.get("family_confidence"),
             percent_text(b.get("family_confidence"), 1)),
            ("traffic the certificate covers", "traffic_scope", self.report.get("traffic_scope"),
             str(self.report.get("traffic_scope") or "traffic exchangeable with the calibration rows")),
            ("out-of-distribution guard level (share of calibration-like rows each exit's guard sends on)",
             "ood_guard", self.report.get("ood_guard"),
             "none" if self.report.get("ood_guard") is None else f"{self.report['ood_guard']:g}"),
        ]
        return table_html("certificate", "Certificate (test split)", ("item", "value"),
                      [key_value_row(label, key, value, text) for label, key, value, text in rows])

    def _latency_table(self) -> str:
        latency = self.report.get("latency") or {}
        rows = []
        for name, timing in latency.items():
            if not isinstance(timing, Mapping):
                continue
            cells = [cell_html(name.replace("_", " "), name, class_="batch")]
            for key, spec in (("original_ms", ".3f"), ("compiled_ms", ".3f"), ("ratio", ".3f")):
                value = timing.get(key)
                text = number_text(value, spec) + ("x" if key == "ratio" and is_number(value) else "")
                cells.append(cell_html(text, value, class_=key))
            rows.append(f'<tr data-batch="{html.escape(name)}">{"".join(cells)}</tr>')
        if not rows:
            return ('<p id="latency" class="missing">Latency was not measured for this compile '
                    '(onnxruntime CPU, batch 1 and 64, is measured unless turned off).</p>')
        note = self.report.get("latency_note")
        return table_html("latency", "Latency, onnxruntime CPU, same process (ratio < 1: compiled is faster)",
                          ("batch", "original ms", "compiled ms", "ratio"), rows) \
            + (f'<p id="latency_note" class="warning">{html.escape(note)}</p>' if note else "")

    def _phases_table(self) -> list[str]:
        """Where the compile's time went (``report["phases"]``), when the report records it."""
        phases = self.report.get("phases") or {}
        seconds, total = phases.get("seconds") or {}, phases.get("total")
        if not seconds or not is_number(total) or total <= 0:
            return []
        rows = [f'<tr data-phase="{html.escape(name)}">{cell_html(name, name, class_="phase")}'
                f'{cell_html(number_text(value, ".1f"), value, class_="seconds")}'
                f'{cell_html(percent_text(value / total), value / total, class_="share")}</tr>'
                for name, value in seconds.items() if is_number(value)]
        return ["<h2>Compile time</h2>", table_html("phases", f"Seconds per phase of the compile ({total:.1f} s in all)",
                                                    ("phase", "seconds", "share"), rows)]

    def _exits_table(self) -> str:
        rows = []
        cumulative = 0.0
        for position, item in enumerate(self.exits):
            number = item.get("exit", position)
            planned = self.plan_exits[position] if position < len(self.plan_exits) else {}
            rate = item.get("exit_rate")
            cumulative += rate if is_number(rate) else 0.0
            thresholds = planned.get("thresholds") or []
            classes = [str(c) for c, t in enumerate(thresholds) if t is not None]
            cells = [
                cell_html(str(number), number, class_="exit"),
                cell_html(item.get("module") or "-", item.get("module"), class_="module"),
                cell_html(str(item.get("tensor", "-")), item.get("tensor"), class_="tensor"),
                cell_html(str(planned.get("pooling", "-")), planned.get("pooling"), class_="pooling"),
                cell_html(percent_text(item.get("fraction_of_flops_before")), item.get("fraction_of_flops_before"),
                      class_="fraction_of_flops_before"),
                cell_html(number_text(item.get("classes_enabled")), item.get("classes_enabled"), class_="classes_enabled"),
                cell_html(", ".join(classes) or "-", ",".join(classes), class_="classes"),
                cell_html(percent_text(rate), rate, class_="exit_rate"),
                cell_html(percent_text(cumulative), cumulative, class_="cumulative_exit_rate"),
                cell_html(percent_text(item.get("guard_rate")), item.get("guard_rate"), class_="guard_rate"),
            ]
            rows.append(f'<tr class="exit-row" data-exit="{html.escape(str(number))}">{"".join(cells)}</tr>')
        rest = self.report.get("exit_rate")
        full = 1 - rest if is_number(rest) else None
        rows.append('<tr class="full-row" data-exit="-1">' + "".join([
            cell_html("-1", -1, class_="exit"), cell_html("full network", None, class_="module"),
            cell_html(str(self.report.get("classifier_output", "-")), None, class_="tensor"),
            cell_html("-", None, class_="pooling"), cell_html("100.0%", 1.0, class_="fraction_of_flops_before"),
            cell_html("-", None, class_="classes_enabled"), cell_html("-", None, class_="classes"),
            cell_html(percent_text(full), full, class_="exit_rate"),
            cell_html(percent_text(1.0 if full is not None else None), 1.0 if full is not None else None,
                  class_="cumulative_exit_rate"), cell_html("-", None, class_="guard_rate")]) + "</tr>")
        return table_html("exits", f"Exits in graph order (rates on the {self._evaluated_on} rows; -1: the full network)",
                      ("exit", "module", "tensor", "pooling", "FLOPs before", "classes enabled",
                       "classes", "exit rate", "cumulative", "guard sends on (--ood-guard)"), rows)

    def _splits_table(self) -> str:
        splits = self.report.get("splits") or {}
        total = sum(v for v in splits.values() if is_number(v))
        purpose = {"rules": "fit the rules and design the plan family (cross-fitted)",
                   "test": "certify the plan (fixed-sequence test)",
                   "report": "the figures in this report; untouched otherwise (only large calibration sets "
                             "have one; otherwise the report reads the test rows)"}
        rows = [f'<tr data-split="{html.escape(name)}">{cell_html(name, name, class_="split")}'
                f'{cell_html(number_text(rows), rows, class_="rows")}'
                f'{cell_html(percent_text(rows / total) if total and is_number(rows) else "-", None, class_="share", has_value=False)}'
                f'{cell_html(purpose.get(name, ""), None, class_="purpose", has_value=False)}</tr>'
                for name, rows in splits.items()]
        return table_html("splits", f"Calibration rows by split ({total} in all)", ("split", "rows", "share", "used to"),
                      rows)

    def _verification_table(self) -> str:
        verification = self.report.get("verification") or {}
        scope = verification.get("scope")
        rows = []
        for key, value in verification.items():
            if key == "scope":
                continue
            if isinstance(value, (dict, list)):
                value = json.dumps(value)
            text = number_text(value, ".3g") if not isinstance(value, str) else value
            rows.append(f'<tr data-key="{html.escape(key)}"><th>{html.escape(key.replace("_", " "))}</th>'
                        f'{cell_html(text, value, id_=f"verification_{key}")}</tr>')
        checked = f"the first {verification['rows']} calibration rows" if is_number(verification.get("rows")) \
            else "calibration rows"
        return (f'<p id="verification_scope">{html.escape(str(scope))}</p>' if scope else "") + \
            table_html("verification", f"Parity of the compiled graph with the original and with the certified "
                       f"simulation on {checked} (onnxruntime CPU)", ("check", "value"), rows)

    # ---- plots

    def _figures(self) -> list[str]:
        figures = [
            figure_html("exit-rates", "Exit rate per exit",
                        f"Fraction of {self._evaluated_on}-split rows leaving at each exit; the grey bar runs the "
                        "full network.",
                        self._draw_exit_rates),
            figure_html("cumulative-compute", "Cumulative compute",
                        "Against the position in the network (fraction of the original FLOPs per row): the "
                        "fraction of rows still running (steps) and the expected compute spent so far per row "
                        "(rules not drawn; the summary's reduction includes them).",
                        self._draw_cumulative_compute),
        ]
        curve = self.certificate.get("curve") or []
        if curve:
            figures.append(figure_html(
                "pareto", "Compute / disagreement curve",
                f"The nested plan family on the test split ({self.certificate.get('test_rows', '?')} rows), "
                "tested in order; plans before the first failure are certified, the last of them is chosen. "
                f"The chosen plan's figure on the {self._evaluated_on} split is drawn for comparison.",
                self._draw_pareto))
        else:
            self.notes.append("plan.json has no certificate curve: the compute / disagreement plot is skipped.")
        figures += self._projection_figures()
        return figures

    def _exit_labels(self) -> list[str]:
        return [f"{item.get('exit', k)}: {item.get('module') or item.get('tensor', '?')}"
                for k, item in enumerate(self.exits)]

    def _draw_exit_rates(self, figure) -> None:
        ax = figure.add_subplot()
        labels = self._exit_labels() + ["full network"]
        rates = [item.get("exit_rate") or 0.0 for item in self.exits]
        rates.append(max(0.0, 1 - sum(rates)))
        colors = ["tab:blue"] * len(self.exits) + ["tab:gray"]
        bars = ax.bar(range(len(rates)), [100 * r for r in rates], color=colors)
        for bar, rate in zip(bars, rates):
            ax.annotate(f"{100 * rate:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(rates)), labels, rotation=20 if len(rates) > 5 else 0, ha="right" if len(rates) > 5 else "center")
        ax.set_ylabel("rows (%)")
        ax.set_ylim(0, max(100 * max(rates) * 1.15, 5))
        ax.set_title(f"Exit rate per exit ({self._evaluated_on} rows)")
        ax.grid(axis="y", alpha=0.3)

    def _draw_cumulative_compute(self, figure) -> None:
        ax = figure.add_subplot()
        positions = [float(item.get("fraction_of_flops_before") or 0.0) for item in self.exits]
        rates = [float(item.get("exit_rate") or 0.0) for item in self.exits]
        xs = [0.0, *positions, 1.0]
        remaining = [1.0]
        for rate in rates:
            remaining.append(max(0.0, remaining[-1] - rate))
        # remaining[k] is the fraction running between xs[k] and xs[k + 1]
        spent = [0.0]
        for k in range(len(xs) - 1):
            spent.append(spent[-1] + remaining[k] * (xs[k + 1] - xs[k]))
        ax.step(xs, [*remaining, remaining[-1]], where="post", color="tab:blue", label="rows still running")
        ax.fill_between(xs, [*remaining, remaining[-1]], step="post", color="tab:blue", alpha=0.12)
        ax.plot(xs, spent, color="tab:orange", marker="o", label="expected compute spent per row")
        ax.plot([0, 1], [0, 1], color="tab:gray", linestyle=":", label="original model")
        for x, label in zip(positions, self._exit_labels()):
            ax.axvline(x, color="tab:gray", alpha=0.4, linewidth=0.8)
            ax.annotate(label, (x, 1.02), rotation=90, fontsize=8, ha="right", va="bottom",
                        xycoords=("data", "axes fraction"))
        reduction = self.report.get("compute_reduction")
        if is_number(reduction):
            ax.annotate(f"compiled: {100 * (1 - reduction):.1f}% of original FLOPs per row (rules included)",
                        (0.98, 0.04), xycoords="axes fraction", ha="right", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("position in the network (fraction of original FLOPs per row)")
        ax.set_ylabel("fraction")
        figure.legend(loc="outside lower center", ncols=3, fontsize=8)
        ax.grid(alpha=0.3)

    def _draw_pareto(self, figure) -> None:
        ax = figure.add_subplot()
        curve = [p for p in self.certificate.get("curve") or []
                 if is_number(p.get("disagreement")) and is_number(p.get("compute_reduction"))]
        x = np.array([100 * p["disagreement"] for p in curve])
        y = np.array([100 * p["compute_reduction"] for p in curve])
        certified = np.array([bool(p.get("certified")) for p in curve])
        ax.plot(x, y, color="tab:gray", alpha=0.4, linewidth=0.8, zorder=1)
        ax.scatter(x[certified], y[certified], s=16, color="tab:blue", label="certified", zorder=2)
        ax.scatter(x[~certified], y[~certified], s=16, facecolors="none", edgecolors="tab:gray",
                   label="not certified (after the first failure)", zorder=2)
        chosen = self.certificate.get("chosen_plan")
        chosen_points = [p for p in curve if p.get("plan") == chosen]
        if chosen_points:
            p = chosen_points[0]
            ax.scatter([100 * p["disagreement"]], [100 * p["compute_reduction"]], marker="*", s=220,
                       color="tab:red", edgecolors="black", label=f"chosen plan #{chosen} (test split)", zorder=3)
        if is_number(self.report.get("disagreement")) and is_number(self.report.get("compute_reduction")):
            ax.scatter([100 * self.report["disagreement"]], [100 * self.report["compute_reduction"]], marker="D",
                       s=50, color="tab:green", edgecolors="black", label=f"chosen plan ({self._evaluated_on} rows)",
                       zorder=3)
        budget = self.certificate.get("max_disagreement")
        if is_number(budget):
            ax.axvline(100 * budget, color="tab:red", linestyle="--", linewidth=1,
                       label=f"budget {100 * budget:g}%")
        ax.set_xlabel("disagreement with the full model (%)")
        ax.set_ylabel("compute reduction (%)")
        ax.set_title("Compute reduction vs disagreement of the plan family")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)

    def _projection_figures(self) -> list[str]:
        if not self.exit_plan.exits:
            self.notes.append("the plan has no exits: no projection plots.")
            return []
        path = self.out_dir / FRAME_ARROW
        if not path.exists():
            self.notes.append(f"{FRAME_ARROW} is not in {self.out_dir}: the projection plots are skipped "
                              "(moco compile writes it next to report.json).")
            return []
        frame, rows = _frame_sample(path)
        exit_index = self._exit_index(frame)
        figures = []
        for position, planned in enumerate(self.exit_plan.exits):
            found = _exit_features(frame, planned.column, planned.pooling)
            if found is None:
                self.notes.append(f"{FRAME_ARROW} has no column {planned.column!r}: no projection plot for exit "
                                  f"{position}.")
                continue
            features, described = found
            label = self._exit_labels()[position] if position < len(self.exits) else f"{position}: {planned.column}"
            figures.append(figure_html(
                f"projection-{position}", f"Projection at exit {label}",
                f"Exit {label}: 2-D PCA of the standardised {described} ({len(rows)} frame rows sampled from all splits), "
                "coloured by the full model's prediction; rows that leave at this exit are drawn large with a "
                "black edge.",
                lambda fig, f=features, k=position, l=label: self._draw_projection(fig, f, frame, exit_index, k, l),
                size=(6.4, 4.8)))
        return figures

    def _exit_index(self, frame: ActivationFrame) -> np.ndarray | None:
        """The exit each sampled row takes under the plan; None, with a note, when the frame lacks a
        column the plan reads (the rows leaving at each exit are then not marked)."""
        needed = [PREDICTIONS, *(name for e in self.exit_plan.exits for name in variant_columns(e.column, e.pooling))]
        missing = [name for name in needed if name not in frame]
        if missing:
            self.notes.append(f"{FRAME_ARROW} has no column {', '.join(map(repr, missing))}: the rows leaving at "
                              "each exit are not marked in the projection plots.")
            return None
        features = [variant_features(frame, e.column, e.pooling) for e in self.exit_plan.exits]
        return self.exit_plan.evaluate(features, frame[PREDICTIONS]).exit_index

    def _draw_projection(self, figure, features: np.ndarray, frame, exit_index, position: int, label: str) -> None:
        ax = figure.add_subplot()
        points, explained = _pca_2d(features)
        predictions = frame[PREDICTIONS] if PREDICTIONS in frame else np.zeros(len(points), np.int64)
        classes = np.unique(predictions)
        import matplotlib

        colors = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
        here = exit_index == position if exit_index is not None else np.zeros(len(points), bool)
        for number, cls in enumerate(classes):
            color = colors(number % colors.N)
            mine = predictions == cls
            ax.scatter(points[mine & ~here, 0], points[mine & ~here, 1], s=5, color=color, alpha=0.35,
                       linewidths=0, label=str(cls))
            if here.any():
                ax.scatter(points[mine & here, 0], points[mine & here, 1], s=14, color=color,
                           edgecolors="black", linewidths=0.4)
        ax.set_xlabel(f"PC 1 ({100 * explained[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * explained[1]:.0f}% of variance)")
        rate = f", {100 * here.mean():.1f}% of these rows exit here" if exit_index is not None else ""
        ax.set_title(f"exit {label}{rate}", fontsize=10)
        ax.legend(title="full model's class", fontsize=7, title_fontsize=8, markerscale=2.5,
                  loc="center left", bbox_to_anchor=(1.0, 0.5))
        ax.grid(alpha=0.3)


def _frame_sample(path: Path) -> tuple[ActivationFrame, np.ndarray]:
    """At most :data:`PROJECTION_ROWS` rows of the frame at ``path`` (seeded) and their indices;
    :class:`ReportRenderError` when the file is not a readable frame."""
    try:
        frame = load_frame(path)
        rows = np.sort(np.random.default_rng(0).choice(len(frame), size=min(len(frame), PROJECTION_ROWS),
                                                       replace=False))
        return frame.take(rows), rows
    except (OSError, pa.ArrowException) as error:  # truncated, not Arrow IPC, damaged data
        raise ReportRenderError(f"{path} could not be read ({type(error).__name__}: {error}); the output directory "
                                f"is damaged: compile again, or move {FRAME_ARROW} away to render the page without "
                                "the projection plots") from error


def _exit_features(frame: ActivationFrame, column: str, pooling: str | None) -> tuple[np.ndarray, str] | None:
    """The features an exit's rule reads (its pooling variant), else the cut's plain column; None when
    the frame has neither."""
    if pooling and all(name in frame for name in variant_columns(column, pooling)):
        return variant_features(frame, column, pooling).astype(np.float64), f"'{pooling}'-pooled features of {column}"
    if column in frame:
        return frame[column].reshape(len(frame), -1).astype(np.float64), f"pooled features of {column}"
    return None


def _pca_2d(features: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """``[N, 2]`` PCA coordinates of the standardised features (zero-padded when fewer than two
    components exist) and the explained variance ratios."""
    rows, width = features.shape
    components = min(2, rows, width)
    if components < 1:
        return np.zeros((rows, 2)), [0.0, 0.0]
    from sklearn.decomposition import PCA

    spread = features.std(axis=0)
    standardised = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    pca = PCA(n_components=components, random_state=0)
    points = pca.fit_transform(standardised)
    explained = [float(v) if np.isfinite(v) else 0.0 for v in pca.explained_variance_ratio_]
    if components < 2:
        points = np.concatenate([points, np.zeros((rows, 2 - components))], axis=1)
        explained += [0.0] * (2 - components)
    return points, explained
