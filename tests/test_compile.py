"""End to end on the reference CNN: outputs on disk, the bound, the compiled graph's behaviour."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from moco_compile import ExitSession
from moco_compile.cli import app
from moco_compile.passes.planning.types import ExitPlan
from moco_compile.progress import PHASES
from tests.plan_settings import CHEAPEST_PLAN


def test_outputs_are_written(compiled):
    result, out = compiled
    assert sorted(p.name for p in out.iterdir()) == ["frame.arrow", "moco-manifest.json", "model.onnx", "plan.json",
                                                     "report.json"]
    report = json.loads((out / "report.json").read_text())
    for key in ("compute_reduction", "exits", "disagreement", "accuracy_before", "accuracy_after", "bound"):
        assert key in report
    plan = ExitPlan.from_dict(json.loads((out / "plan.json").read_text()))
    assert len(plan.exits) == len(result.plan.exits)


def test_plan_saves_compute_within_the_certified_budget(compiled):
    result, _ = compiled
    report, bound = result.report, result.plan.certificate
    assert report["compute_reduction"] > 0.25
    assert bound["p_value"] <= 1 - bound["confidence"]
    # 4,000 rows: no separate report split, the figures are on the certifying rows and say so
    assert report["evaluated_on"] == "test" and "flatter" in report["evaluation_note"]
    assert report["disagreement"] <= bound["disagreements"] / bound["test_rows"]
    assert report["accuracy_after"] > report["accuracy_before"] - 0.02
    assert report["verification"]["exited_argmax_matches_rule"]


def test_report_states_what_was_verified_and_what_is_certified(compiled):
    """Verification covers the first calibration rows on onnxruntime CPU, and says so; the
    certificate is a rate over traffic like the calibration rows, not a fraction of a stretch."""
    report = compiled[0].report
    verification = report["verification"]
    assert f"the first {verification['rows']} calibration rows" in verification["scope"]
    assert "CPUExecutionProvider" in verification["scope"] and "TF32" in verification["scope"]
    assert "rate" in report["bound"]["certified"] and "particular stretch of traffic" in report["bound"]["certified"]
    assert "not the fraction on any particular stretch" in report["traffic_scope"]
    from io import StringIO

    from rich.console import Console

    from moco_compile.reports.terminal import print_report

    printed = StringIO()
    print_report(report, Console(file=printed, width=4000))
    assert f"verified: {verification['scope']}" in printed.getvalue()
    assert "certified disagreement rate" in printed.getvalue()


def test_compiled_model_runs_per_row_exits(compiled, reference_onnx, calibration):
    result, out = compiled
    images = calibration["images"][-256:]
    session = ExitSession(out / "model.onnx", providers=["CPUExecutionProvider"])
    outputs = session.run({"images": images})
    full, = ort.InferenceSession(str(reference_onnx)).run(None, {"images": images})
    exits = outputs["moco_exit"]
    assert exits.shape == (256,) and exits.dtype == np.int64
    assert 0 < (exits >= 0).mean() < 1  # a batch mixes exited rows and full-network rows
    rows = exits == -1
    np.testing.assert_allclose(outputs["logits"][rows], full[rows], atol=1e-4)
    assert (outputs["logits"].argmax(1) == full.argmax(1)).mean() > 0.97
    assert sum(session.exit_counts.values()) == 256


@pytest.mark.slow
def test_same_inputs_same_plan(calibration, tmp_path, compiled, reference_onnx):
    from moco_compile import compile

    result, out = compiled
    again = compile(reference_onnx, calibration, measure_latency=False, show_progress=False)
    assert json.dumps(again.plan.to_dict()) == json.dumps(result.plan.to_dict())


def test_cli_inspect_lists_cut_points_in_full_when_piped(reference_onnx):
    """Not a terminal (a pipe, a file): tab-separated lines with whole tensor and module names."""
    run = CliRunner().invoke(app, ["inspect", str(reference_onnx)])
    assert run.exit_code == 0, run.output
    header, *rows = [line.split("\t") for line in run.output.strip().splitlines()]
    assert header[:3] == ["#", "tensor", "module"] and "MFLOPs before" in header
    assert [row[2] for row in rows] == ["layer1.0", "layer1", "layer2.0", "layer2", "layer3.0"]
    tensors = {name for node in onnx.load(str(reference_onnx)).graph.node for name in node.output}
    assert all(len(row) == len(header) and row[1] in tensors for row in rows)


@pytest.mark.slow
def test_cli_compile_writes_report(tmp_path, calibration, reference_onnx):
    np.savez(tmp_path / "calib.npz", images=calibration["images"][:2500], labels=calibration["labels"][:2500])
    run = CliRunner().invoke(app, ["compile", str(reference_onnx), "--calib", str(tmp_path / "calib.npz"),
                                   "--out", str(tmp_path / "out"), "--max-disagreement", "0.02", "--max-exits", "2",
                                   "--exit-layout", "flat", "--exit-heads", "linear"])
    assert run.exit_code == 0, run.output
    assert not [n for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node if n.op_type == "If"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "compute reduction" in run.output and report["bound"]["max_disagreement"] == 0.02
    assert 1 <= len(json.loads((tmp_path / "out" / "plan.json").read_text())["exits"]) <= 2  # the reference opens 5
    for batch in ("batch_1", "batch_64"):  # measured: both sessions ran, the ratio is theirs
        timing = report["latency"][batch]
        assert timing["original_ms"] > 0 and timing["ratio"] == pytest.approx(timing["compiled_ms"] / timing["original_ms"])
        assert timing["batches_timed"] >= 5  # five alternating rounds of at least one batch each
    assert list(report["phases"]["seconds"]) == list(PHASES)  # every phase ran, in pipeline order
    for phase in PHASES:  # each phase shown as it ended
        assert f"done {phase} in" in run.output


def test_report_says_where_the_compile_time_went(compiled):
    """Without the latency comparison every other phase is timed, in order, within the total."""
    phases = compiled[0].report["phases"]
    assert list(phases["seconds"]) == [phase for phase in PHASES if phase != "latency"]
    assert all(seconds >= 0 for seconds in phases["seconds"].values())
    assert sum(phases["seconds"].values()) <= phases["total"]


@pytest.mark.slow
def test_another_seed_splits_anew_and_an_accuracy_budget_is_certified_with_labels(calibration, compiled,
                                                                                  reference_onnx):
    """One compile for two questions: seed 1 draws another split and still certifies exits; with an
    accuracy budget the certificate bounds the accuracy harm too (its p-value within the plan's)."""
    from moco_compile import compile
    from moco_compile.passes.planning.bounds import binomial_p_value

    result, _ = compiled
    other = compile(reference_onnx, calibration, seed=1, max_accuracy_drop=0.01, measure_latency=False,
                    show_progress=False, planner_config=CHEAPEST_PLAN)
    assert not np.array_equal(other.frame["split"], result.frame["split"])
    bound = other.plan.certificate
    assert bound["p_value"] <= 0.05 and other.plan.exits
    assert bound["max_accuracy_drop"] == 0.01 and bound["accuracy_harm"] is not None
    assert bound["accuracy_harm"] <= bound["disagreements"]  # harm is a kind of disagreement
    assert binomial_p_value(bound["accuracy_harm"], bound["test_rows"], 0.01) <= bound["p_value"] <= 0.05


def test_latency_note_names_the_batch_sizes_the_build_slowed(compiled):
    from io import StringIO

    from rich.console import Console

    from moco_compile.api import latency_note
    from moco_compile.reports.terminal import print_report

    def timing(ratio: float) -> dict:
        return {"original_ms": 1.0, "compiled_ms": ratio, "ratio": ratio}

    assert latency_note({"batch_1": timing(0.8), "batch_64": timing(1.01)}) is None
    note = latency_note({"batch_1": timing(1.12), "batch_64": timing(0.9)})
    assert "batch 1 (1.12x)" in note and "batch 64" not in note and "--max-exits 1" in note
    result, _ = compiled
    assert result.report["latency_note"] is None  # not measured
    printed = StringIO()
    print_report({**result.report, "latency": {"batch_1": timing(1.12)}, "latency_note": note},
                 Console(file=printed, width=200))
    assert "latency: on this machine the compiled graph ran slower" in printed.getvalue()
