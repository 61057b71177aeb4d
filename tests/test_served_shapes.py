"""The served-shape benchmark's models and exit profiles (benchmarks/served_shapes.py, exit_profiles.py) at
small widths, and its RESULTS.md subsection written into a copy."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks import exit_profiles, gpu_report, results as results_file
from benchmarks.served_shapes import OUTPUT, SHAPES, random_rows
from moco_compile.passes.graph.rewrite import apply_plan

CPU = ["CPUExecutionProvider"]


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=CPU).run(None, feed)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_served_shape_runs_any_batch_with_finite_spread_logits(shape):
    model = SHAPES[shape](small=True)
    onnx.checker.check_model(model)
    logits, = _run(model, random_rows(model, 16, seed=0))
    one, = _run(model, random_rows(model, 1, seed=0))
    assert np.isfinite(logits).all() and logits.std(axis=0).mean() > 1e-2
    np.testing.assert_allclose(one, logits[:1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_exit_profiles_let_their_share_of_fresh_rows_leave(shape):
    """Thresholds set on 512 seeded rows: on 512 fresh rows each profile's share leaves (within 10 points),
    the compiled graph routes the 50% profile's rows as numpy does, and the closed exit lets none leave."""
    model = SHAPES[shape](small=True)
    cut = exit_profiles.third_cut(model, random_rows(model, 1, seed=0))
    assert abs(cut.fraction_before - 1 / 3) < 0.1
    pooling = exit_profiles.pooling_for(cut)
    classes = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    sample = exit_profiles.pooled_features(model, cut, pooling, random_rows(model, 512, seed=1), CPU)
    rule = exit_profiles.random_rule(sample, classes)
    plans = exit_profiles.profile_plans(cut, pooling, rule, sample)
    fresh = random_rows(model, 512, seed=2)
    top = rule(exit_profiles.pooled_features(model, cut, pooling, fresh, CPU)).max(axis=1)
    for profile in exit_profiles.PROFILES:
        threshold = plans[f"{profile:.0%}"].exits[0].thresholds[0]
        assert abs((top > threshold).mean() - profile) <= 0.10
    for name in ("50%", exit_profiles.CLOSED):
        compiled = apply_plan(model, plans[name], OUTPUT, "nested")
        exits = _run(compiled, fresh)[-1]
        realized = exit_profiles.realized(compiled, exits)
        expected = (top > plans[name].exits[0].thresholds[0]).mean()
        assert abs(realized["exit_fraction"] - expected) <= 0.01
        assert (realized["flops_reduction"] > 0.2) if name == "50%" else (exits == -1).all()


def _served(small: bool) -> dict:
    """A served-shape step's result as ``bench_served_shapes.served_shape`` writes it (figures made up)."""
    realized = {f"{p}/{layout}": {"exit_fraction": f, "flops_reduction": f * 0.6}
                for p, f in (("50%", 0.5), ("closed", 0.0)) for layout in ("nested", "bucketed")}
    return {"small": small, "cut": "encoder.layer.3.output.LayerNorm", "cut_shape": [1, 16, 64],
            "fraction_before": 0.333, "pooling": "first_token", "original_mflops": 20.4, "sample_rows": 512,
            "thresholds": {"50%": 0.59, "closed": float("inf")}, "realized": realized,
            "latency_ms": {"64": {"original": 10.0, "original_cuda_graph": 9.0, "50%/nested": 8.0,
                                  "50%/bucketed": 7.0, "closed/nested": 10.04, "closed/bucketed": 10.2}},
            "errors": {"50%/staged": "Traceback\nModuleNotFoundError: No module named 'moco_compile.runtime.staged'"}}


def test_record_adds_the_served_subsection_and_keeps_the_reference_text(tmp_path, monkeypatch):
    copy = tmp_path / "RESULTS.md"
    copy.write_text(results_file.RESULTS.read_text())
    monkeypatch.setattr(results_file, "RESULTS", copy)
    before = gpu_report._current_text()
    gpu_report.record({"environment": {"gpu": "no GPU (dry run)", "onnxruntime": "1.32.0"},
                       "served_bert_base": _served(small=True)}, ["served.json"])
    text = copy.read_text()
    assert "### Served shapes: early exits" in text and "DRY RUN" in text and before.strip() in text
    assert "50%/bucketed, batch 64: compiled / original: 0.700 (target <= 0.760): met" in text
    assert "closed exit, bucketed, batch 64: ms over the original: 0.200 (target <= 0.050): missed" in text
    assert "No module named 'moco_compile.runtime.staged'" in text
    assert text.count("## GPU (CUDA)") == 1 and text.count("### Served shapes") == 1
    gpu_report.record({"environment": {}, "served_bert_base": _served(small=False)}, ["served.json"])
    assert copy.read_text().count("### Served shapes") == 1 and "DRY RUN" not in copy.read_text()
