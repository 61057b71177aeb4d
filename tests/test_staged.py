"""The stage runner (issue 26, item 4): a bucketed build run stage by stage equals the single graph.

On CPU it runs the same stage graphs, gathers and bound buffers a GPU would, without capture.
"""
from __future__ import annotations

import json
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from moco_compile.build import Build
from moco_compile.errors import MocoError
from moco_compile.passes.graph.rewrite import apply_plan, insert_exits
from moco_compile.passes.planning.config import PlannerConfig
from moco_compile.passes.planning.types import ExitPlan
from moco_compile.runtime.stage_graphs import PlanMismatchError
from moco_compile.runtime.staged import StagedSession
from tests.tiny_nets import calibrate_routes, deep_mlp, exits_at

BUCKETS = (1, 8, 16, 32, 64, 128, 256)


def _single(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _bucketed_build(model: onnx.ModelProto, plan: ExitPlan, output: str, report: dict | None = None) -> Build:
    config = PlannerConfig(exit_layout="bucketed", batch_buckets=BUCKETS)
    return Build(apply_plan(model, plan, output, "bucketed", BUCKETS), plan, report or {}, None,
                 exit_layout="bucketed", planner_config=config)


@pytest.fixture(scope="module")
def mlp():
    model, exits = deep_mlp(6), exits_at(5)
    x = np.random.default_rng(3).normal(size=(600, 8)).astype(np.float32)
    routes = calibrate_routes(model, exits, x, len(exits))
    return model, ExitPlan(exits, total_flops=1000.0), x, routes


def test_every_batch_size_from_0_to_257_matches_the_single_graph(mlp):
    model, plan, x, routes = mlp
    build = _bucketed_build(model, plan, "logits")
    staged = StagedSession(build.model, build.plan_record(), providers=["cpu"])
    single = _single(build.model)
    for size in range(0, 258):
        rows = x[size:2 * size] if size <= 300 else x[:size]
        outputs = staged.run({"x": rows})
        logits, exits = single.run(None, {"x": rows})
        np.testing.assert_array_equal(outputs["moco_exit"], exits)
        np.testing.assert_array_equal(exits, routes[size:2 * size])
        np.testing.assert_allclose(outputs["logits"], logits, atol=1e-5)
        assert outputs["logits"].shape == (size, 3)
    assert (routes == -1).any() and (routes >= 0).any()
    assert {bucket for _, bucket, _ in staged._stages} == {*BUCKETS, None}


def test_results_are_the_callers_and_later_batches_leave_them_alone(mlp):
    """The stages' outputs are bound to buffers reused batch after batch: what ``run`` returns is the caller's
    own (results kept from several batches, as a serving loop keeps them, stay as they were)."""
    model, plan, x, _ = mlp
    build = _bucketed_build(model, plan, "logits")
    staged = StagedSession(build.model, build.plan_record(), providers=["cpu"])
    single = _single(build.model)
    kept = [staged.run({"x": x[start:start + 16]}) for start in range(0, 96, 16)]
    for position, outputs in enumerate(kept):
        logits, exits = single.run(None, {"x": x[16 * position:16 * position + 16]})
        np.testing.assert_array_equal(outputs["moco_exit"], exits)
        np.testing.assert_allclose(outputs["logits"], logits, atol=1e-5)


def test_the_reference_cnn_runs_staged_as_one_graph(compiled, reference_model, calibration):
    result, _ = compiled
    build = _bucketed_build(reference_model, result.plan, "logits")
    staged = StagedSession(build.model, build.plan_record(), providers=["cpu"])
    single = _single(build.model)
    images = calibration["images"]
    for start, size in ((0, 0), (0, 1), (5, 7), (40, 9), (100, 64), (300, 65), (1000, 257)):
        batch = images[start:start + size]
        outputs = staged.run({"images": batch})
        logits, exits = single.run(None, {"images": batch})
        np.testing.assert_array_equal(outputs["moco_exit"], exits)
        np.testing.assert_allclose(outputs["logits"], logits, atol=1e-5, rtol=1e-5)
    assert (exits >= 0).any() and (exits == -1).any()


def test_a_plan_that_does_not_match_the_graph_is_refused(mlp, tmp_path):
    model, plan, _, _ = mlp
    build = _bucketed_build(model, plan, "logits")
    record = build.plan_record()
    nested = {**record, "exit_layout": "nested"}
    with pytest.raises(PlanMismatchError, match="not a bucketed build's plan"):
        StagedSession(build.model, nested)
    fewer = {**record, "exits": record["exits"][:-1]}
    with pytest.raises(PlanMismatchError, match="plan.json does not match"):
        StagedSession(build.model, fewer)
    other_buckets = {**record, "planner_config": {**record["planner_config"], "batch_buckets": [1, 4, 16]}}
    with pytest.raises(PlanMismatchError, match="is missing"):
        StagedSession(build.model, other_buckets)
    with pytest.raises(PlanMismatchError, match="not a bucketed"):
        StagedSession(insert_exits(model, plan.exits, "logits", "nested"), record | {"exit_layout": "nested"})
    broken = tmp_path / "plan.json"
    broken.write_text("{not json")
    with pytest.raises(PlanMismatchError, match="cannot read plan.json"):
        StagedSession(build.model, broken)
    with pytest.raises(MocoError, match="CUDA graphs need the CUDA execution provider"):
        StagedSession(build.model, record, providers=["cpu"], cuda_graph=True)
    staged = StagedSession(build.model, json.loads(json.dumps(record)), providers=["cpu"])
    with pytest.raises(MocoError, match="lacks the model input"):
        staged.run({"y": np.zeros((2, 8), np.float32)})
