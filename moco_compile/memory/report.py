"""Writing and showing memory work: ``memory.json`` + ``memory.html`` (+ ``model.onnx``) in a
moco output directory, written with the spine's safe-output rules."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import onnx

from moco_compile.outputs import staged_output_dir
from moco_compile.reports.html import cell_html, figure_html, page_html, percent_text, table_html

MIB = 2 ** 20


def write_memory_outputs(out_dir: str | os.PathLike, title: str, record: Mapping[str, Any], *,
                         model: onnx.ModelProto | None = None, inputs: Iterable[str | os.PathLike] = (),
                         force: bool = False) -> list[str]:
    """Write ``memory.json``, ``memory.html`` and, when given, ``model.onnx`` into ``out_dir``."""
    written = ["memory.json", "memory.html"]
    with staged_output_dir(out_dir, inputs, force) as staging:
        (staging / "memory.json").write_text(json.dumps(record, indent=1))
        (staging / "memory.html").write_text(memory_page(title, record))
        if model is not None:
            onnx.save(model, str(staging / "model.onnx"))
            written.insert(0, "model.onnx")
    return written


def memory_page(title: str, record: Mapping[str, Any]) -> str:
    """The profile (per batch size) and, for an optimisation, the before/after table."""
    body = [f"<h1>{title}</h1>"]
    if "steps" in record:
        body += ["<h2>Validation of each step</h2>", _steps_table(record["steps"])]
    if "batches" in record:
        body += ["<h2>Peak memory per batch size</h2>", _profile_table(record["batches"]),
                 figure_html("live-memory", "Live activation memory over the node order",
                             "Bytes of activations live after each node runs (liveness estimate; If branches "
                             "follow the costliest branch), one line per batch size.",
                             lambda figure: _draw_timeline(figure, record["batches"])),
                 "<h2>Largest tensors live at the peak</h2>", _top_tensors(record["batches"][-1])]
    return page_html(title, body, record.get("notes", ()))


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / MIB:.2f} MiB"


def _profile_table(batches: list[dict]) -> str:
    rows = [f"<tr>{cell_html(str(b['batch_size']), b['batch_size'])}"
            f"{cell_html(_mib(b['weight_bytes']), b['weight_bytes'], class_='weights')}"
            f"{cell_html(_mib(b['estimated_peak_bytes']), b['estimated_peak_bytes'], class_='estimated')}"
            f"{cell_html(_mib(b['measured_peak_bytes']), b['measured_peak_bytes'], class_='measured')}"
            f"{cell_html(_mib(b['measured_default_session_bytes']), b['measured_default_session_bytes'])}"
            f"{cell_html(b['estimate_note'], has_value=False)}</tr>" for b in batches]
    return table_html("profile", "Weights and peak activation memory", (
        "batch", "weights", "estimated peak", "measured peak (graph as written)", "measured, default session",
        "estimate vs measured"), rows)


def _steps_table(steps: list[dict]) -> str:
    rows = []
    for s in steps:
        latency = s["latency_ratio"]
        rows.append(f"<tr>{cell_html(s['step'], has_value=False)}"
                    f"{cell_html(percent_text(s['accuracy'], 2), s['accuracy'], class_='accuracy')}"
                    f"{cell_html(percent_text(s['disagreement'], 2), s['disagreement'], class_='disagreement')}"
                    f"{cell_html(percent_text(s['compute_reduction']), s['compute_reduction'], class_='compute')}"
                    f"{cell_html(_mib(s['weight_bytes']), s['weight_bytes'], class_='weights')}"
                    f"{cell_html(_mib(s['estimated_peak_bytes']), s['estimated_peak_bytes'])}"
                    f"{cell_html(_mib(s['measured_peak_bytes']), s['measured_peak_bytes'])}"
                    + "".join(cell_html(f"{latency[b]:.2f}x" if b in latency else "-", latency.get(b))
                              for b in ("1", "64")) + "</tr>")
    return table_html("steps", f"On {steps[0]['rows']:,} validation rows no choice touched", (
        "step", "accuracy", "disagreement", "compute saved", "weights", "estimated peak (b=64)", "measured peak (b=64)",
        "latency b=1", "latency b=64"), rows)


def _top_tensors(batch: dict) -> str:
    rows = [f"<tr>{cell_html(t['name'], has_value=False)}{cell_html(_mib(t['bytes']), t['bytes'])}"
            f"{cell_html(t['producer'], has_value=False)}</tr>" for t in batch["top_tensors"]]
    return table_html("top-tensors", f"At batch {batch['batch_size']}, peak at {batch['peak_node']}",
                      ("tensor", "size", "produced by"), rows)


def _draw_timeline(figure, batches: list[dict]) -> None:
    ax = figure.add_subplot()
    for b in batches:
        ax.plot([p["bytes"] / MIB for p in b["timeline"]], label=f"batch {b['batch_size']}")
    ax.set_xlabel("node (execution order)")
    ax.set_ylabel("live activations (MiB)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)

