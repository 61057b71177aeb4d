"""Human-readable views of a compile's report (terminal tables)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.table import Table


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


CUT_COLUMNS = ("#", "tensor", "module", "shape", "MFLOPs before", "MFLOPs after", "before")


def cut_point_rows(cuts: Sequence) -> list[tuple[str, ...]]:
    """``moco inspect``'s cells, one tuple per candidate cut (columns: :data:`CUT_COLUMNS`)."""
    return [(str(number), cut.tensor, cut.module or "-", "x".join(map(str, cut.shape[1:])),
             f"{cut.flops_before / 1e6:.2f}", f"{cut.flops_after / 1e6:.2f}", _percent(cut.fraction_before, 1))
            for number, cut in enumerate(cuts)]


def cut_points_table(cuts: Sequence, total_flops: float) -> Table:
    """``moco inspect`` on a terminal: one row per candidate cut."""
    table = Table(title=f"Cut points ({total_flops / 1e6:.2f} MFLOPs per row in total)")
    longest_module = max((len(cut.module or "-") for cut in cuts), default=1)
    for column in CUT_COLUMNS:
        if column == "module":  # the name users pass back (add_rule, reports): never cut short
            table.add_column(column, no_wrap=True, min_width=longest_module)
        else:
            table.add_column(column, justify="left" if column == "tensor" else "right")
    for row in cut_point_rows(cuts):
        table.add_row(*row)
    return table


def cut_points_tsv(cuts: Sequence) -> str:
    """``moco inspect`` into a pipe or file: tab-separated, full names, one line per cut."""
    return "\n".join("\t".join(cells) for cells in [CUT_COLUMNS, *cut_point_rows(cuts)])


def print_report(report: Mapping, console: Console | None = None) -> None:
    """Print the summary, the exits and the latency of a compile as tables."""
    console = console or Console()
    where = report.get("evaluation_note") or "report split: rows untouched by fitting and testing"
    summary = Table(title=f"moco compile report ({where})")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    bound = report["bound"]
    rows = [
        ("compute reduction (FLOPs, rules included)", _percent(report["compute_reduction"], 1)),
        ("rows exiting early", _percent(report["exit_rate"], 1)),
        ("disagreement with full model", _percent(report["disagreement"])),
        ("  among exited rows", _percent(report["disagreement_among_exited"])),
        ("accuracy before -> after", f"{_percent(report['accuracy_before'])} -> "
                                     f"{_percent(report['accuracy_after'])}"),
    ]
    confidence = report.get("exited_confidence")
    if confidence and confidence.get("rows"):
        rows.append(("exited rows' mean top probability: compiled / full model (uncalibrated)",
                     f"{confidence['mean_top_probability']:.3f} / {confidence['mean_top_probability_full_model']:.3f} "
                     f"({confidence['mean_top_probability_uncalibrated']:.3f})"))
        if confidence.get("ece") is not None:
            rows.append(("  calibration error (ECE): compiled / full model (uncalibrated)",
                         f"{confidence['ece']:.3f} / {confidence['ece_full_model']:.3f} "
                         f"({confidence['ece_uncalibrated']:.3f})"))
    if bound.get("certified"):
        rows += [
            ("certified disagreement rate (over traffic like the calibration rows)",
             f"<= {_percent(bound.get('max_disagreement'))} at {_percent(bound.get('confidence'), 0)} confidence"),
            ("  test rows / disagreements (rounding) / p-value",
             f"{bound.get('test_rows')} / {bound.get('disagreements')} ({bound.get('near_threshold_rows')}) / "
             f"{bound.get('p_value', 1):.3g}"),
            ("  estimated disagreement upper bound (not certified)",
             _percent(bound.get("estimated_disagreement_upper_bound"))),
            ("  plan family (held-out score of each)", f"{bound.get('family', '-')} (" + ", ".join(
                f"{name}: {_percent(value, 1)}" for name, value in (bound.get("families") or {}).items()) + ")"),
        ]
    else:
        rows.append(("certificate", str(bound.get("reason", "nothing certified"))))
    if bound.get("note"):
        rows.append(("certificate note", str(bound["note"])))
    for name in ("batch_1", "batch_64"):
        if name in report.get("latency", {}):
            timing = report["latency"][name]
            timed = f", {timing['batches_timed']} batches timed" if "batches_timed" in timing else ""
            rows.append((f"latency {name.replace('_', ' ')} (compiled / original, CPU)",
                         f"{timing['compiled_ms']:.3f} / {timing['original_ms']:.3f} ms = {timing['ratio']:.3f}x"
                         f"{timed}"))
    for name, value in rows:
        summary.add_row(name, value)
    console.print(summary)
    exits = Table(title="Exits")
    guarded = report.get("ood_guard") is not None
    columns = ("exit", "module", "tensor", "FLOPs before", "classes", "exit rate") + (("guard sends on",) * guarded)
    for column in columns:
        exits.add_column(column, justify="left" if column in ("module", "tensor") else "right")
    for item in report["exits"]:
        exits.add_row(str(item["exit"]), item["module"] or "-", item["tensor"],
                      _percent(item["fraction_of_flops_before"], 1), str(item["classes_enabled"]),
                      _percent(item["exit_rate"], 1), *((_percent(item.get("guard_rate"), 1),) * guarded))
    console.print(exits)
    if bound.get("certified"):
        console.print(f"certified: {bound['certified']}\nmethod: {bound.get('method', '-')}")
    if report.get("latency_note"):
        console.print(f"latency: {report['latency_note']}", highlight=False)
    if report.get("traffic_scope"):
        console.print(f"scope: {report['traffic_scope']}", highlight=False)
    for note in report.get("import_notes") or []:
        console.print(f"model: {note}", highlight=False)
    if (report.get("verification") or {}).get("scope"):
        console.print(f"verified: {report['verification']['scope']}", highlight=False)
    phases = report.get("phases")
    if phases:
        spent = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases["seconds"].items())
        console.print(f"time: {phases['total']:.1f} s ({spent})", highlight=False)
