"""Pricing exits for the serving target: profiles, the planner constants they give, `moco profile-target`,
and `moco compile --target/--serving-batch/--batch-buckets/--target-profile` (bad input refused, nothing written)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from moco_compile.cli import app
from moco_compile.passes.planning.config import PlannerConfig
from moco_compile.passes.planning.target import H100, TargetProfile, resolve_target

ROWS = 600  # enough for a 1% budget to certify (299 test rows), few enough to compile in seconds
PROBES = PlannerConfig(exit_heads=("linear",))  # pricing is under test, not heads: the cheapest ones (`_compile`)


@pytest.fixture(scope="module")
def calib_npz(tmp_path_factory, calibration):
    path = tmp_path_factory.mktemp("target") / "calib.npz"
    np.savez(path, **{key: value[:ROWS] for key, value in calibration.items()})
    return path


def _profile(**changes) -> TargetProfile:
    values = dict(name="cuda:test", provider="CUDAExecutionProvider", exit_fixed_seconds=1e-4,
                  flops_per_second={1: 1e11, 16: 1.6e12, 256: 4e12}, copy_bytes_per_second=1e12,
                  machine="a test GPU", onnxruntime="onnxruntime 1.0", measured_on="2026-01-01")
    return TargetProfile(**{**values, **changes})


def test_a_profile_reads_back_as_written(tmp_path):
    profile = _profile()
    path = tmp_path / "target.json"
    profile.to_json(path)
    assert TargetProfile.from_json(path) == profile
    assert TargetProfile.from_dict(json.loads(json.dumps(H100.to_dict()))) == H100


def test_rates_interpolate_in_log_batch_and_clamp_outside():
    profile = _profile()
    assert profile.rate(1) == 1e11 and profile.rate(16) == 1.6e12
    assert profile.rate(4) == pytest.approx(4e11)  # rate grows as the batch between 1 and 16 (time flat)
    assert profile.rate(64) == pytest.approx(math.sqrt(1.6e12 * 4e12))  # halfway in log batch: the geometric mean
    assert profile.rate(1024) == 4e12 and _profile(flops_per_second={8: 2e12}).rate(1) == 2e12


def test_the_fixed_cost_per_row_falls_with_the_serving_batch_on_the_h100():
    # the 0.16 ms per batch is shared by the batch's rows; the rate rises 60x from batch 1 to 64, then stays
    assert H100.exit_fixed_cost(1) == pytest.approx(0.16e-3 * 0.5e12)
    assert H100.exit_fixed_cost(256) == pytest.approx(0.16e-3 * 30e12 / 256)
    assert H100.exit_fixed_cost(256) < H100.exit_fixed_cost(1) / 4
    assert H100.boundary_cost(256) == pytest.approx(8 / 1.5e12 * 30e12)  # read + write of a float32 per element


def test_a_gpu_target_prices_the_planner_for_the_serving_batch_and_buckets():
    config, profile = resolve_target(PlannerConfig(), "cuda", serving_batch=256)
    assert profile is H100
    assert (config.exit_layout, config.target, config.serving_batch) == ("bucketed", "cuda:h100", 256)
    assert config.exit_fixed_cost == H100.exit_fixed_cost(256) and config.boundary_cost == H100.boundary_cost(256)
    assert resolve_target(PlannerConfig(), "cuda")[0].serving_batch == 64  # the default serving batch
    config, _ = resolve_target(PlannerConfig(), "cuda:l4", 8, (1, 4, 8), _profile())
    assert (config.target, config.batch_buckets) == ("cuda:l4", (1, 4, 8))
    assert config.exit_fixed_cost == pytest.approx(1e-4 * _profile().rate(8) / 8)


def test_the_cpu_target_keeps_todays_figures():
    for config, pricing in (resolve_target(PlannerConfig()), resolve_target(PlannerConfig(), "cpu")):
        assert config == PlannerConfig() and pricing is None
        assert (config.exit_fixed_cost, config.boundary_cost, config.exit_layout) == (250_000, 100, "nested")
    assert resolve_target(PlannerConfig(exit_layout="flat"), "cpu")[0].exit_layout == "flat"


@pytest.mark.parametrize("call, message", [
    (lambda: resolve_target(PlannerConfig(), "cuda:l4"), "no built-in constants for cuda:l4: run `moco "
     "profile-target --providers cuda --out target.json` on that machine and pass --target-profile target.json"),
    (lambda: resolve_target(PlannerConfig(), "cuda", 512), "serving batch 512 is above the largest batch bucket 256"),
    (lambda: resolve_target(PlannerConfig(), "cuda", 0), "serving batch must be a positive whole number"),
    (lambda: resolve_target(PlannerConfig(), "cpu", 0), "serving batch must be a positive whole number"),
    (lambda: resolve_target(PlannerConfig(), "tpu"), "unknown target 'tpu'"),
    (lambda: resolve_target(PlannerConfig(), "cpu", profile=_profile()), "measured on CUDAExecutionProvider"),
    (lambda: resolve_target(PlannerConfig(), "cuda", batch_buckets=()), "batch buckets are empty"),
    (lambda: _profile(exit_fixed_seconds=-1.0), "'exit_fixed_seconds' must be a finite number >= 0"),
    (lambda: _profile(flops_per_second={}), "'flops_per_second' must map at least one batch size"),
    (lambda: _profile(flops_per_second={8: math.nan}), "at batch 8 must be a finite number > 0"),
])
def test_bad_targets_and_profiles_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("copy_bytes_per_second"), "has no 'copy_bytes_per_second'"),
    (lambda d: d.update(version=99), "of version 99; this moco reads version 1"),
    (lambda d: d.update(format="other"), "is not a moco target profile"),
    (lambda d: d.update(flops_per_second={"one": 1e9}), "'flops_per_second' must map batch sizes"),
    (lambda d: d.update(copy_bytes_per_second=-5), "'copy_bytes_per_second' must be a finite number > 0"),
    (lambda d: d.update(provider="TPUExecutionProvider"), "'provider' must be one of"),
])
def test_a_malformed_profile_file_is_refused_naming_the_file_and_field(tmp_path, edit, message):
    data = H100.to_dict()
    edit(data)
    path = tmp_path / "target.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"target profile {path}.*{message}"):
        TargetProfile.from_json(path)


def _compile(model, calib, out, *options):
    return CliRunner().invoke(app, ["compile", str(model), "--calib", str(calib), "--out", str(out), "--no-latency",
                                    "--exit-heads", ",".join(PROBES.exit_heads), *options])


@pytest.mark.parametrize("options, message", [
    (["--batch-buckets", ""], "batch buckets are empty"),
    (["--batch-buckets", "0,8"], "batch bucket 0 is not a positive whole number"),
    (["--batch-buckets", "8,1"], "not in increasing order"),
    (["--batch-buckets", "1,8,8"], "batch bucket 8 is given more than once"),
    (["--batch-buckets", "a,b"], "--batch-buckets takes comma-separated whole numbers"),
    (["--target", "cuda", "--serving-batch", "512"], "serving batch 512 is above the largest batch bucket 256"),
    (["--target", "cuda", "--serving-batch", "64", "--batch-buckets", "1,8,32"],
     "serving batch 64 is above the largest batch bucket 32"),
    (["--target", "cuda:l4"], "no built-in constants for cuda:l4"),
    (["--target", "cuda", "--exit-layout", "flat"], "GPU targets write the bucketed layout"),
    (["--target-profile", "MALFORMED"], "is not valid JSON"),
    (["--serving-batch", "0"], "serving batch must be a positive whole number"),
])
def test_compile_refuses_bad_target_options_and_writes_nothing(tmp_path, reference_onnx, calib_npz, options, message):
    malformed = tmp_path / "target.json"
    malformed.write_text("{not json")
    out = tmp_path / "out"
    run = _compile(reference_onnx, calib_npz, out, *[str(malformed) if o == "MALFORMED" else o for o in options])
    assert run.exit_code == 2, run.output
    assert message in " ".join(run.output.split()) and "Traceback" not in run.output
    assert not out.exists()


def test_a_small_net_at_batch_1_on_the_h100_gets_no_exit_that_pays(tmp_path, reference_onnx, calib_npz):
    # the reference CNN's 40.6 MFLOPs per row are half of one exit's 0.16 ms at the H100's batch-1 rate
    out = tmp_path / "out"
    run = _compile(reference_onnx, calib_npz, out, "--target", "cuda", "--serving-batch", "1")
    assert run.exit_code == 2
    assert "no exit can pay for itself at batch 1 on cuda:h100" in " ".join(run.output.split())
    assert not out.exists()


def test_profile_target_on_this_cpu_writes_a_profile_and_keeps_a_users_file(tmp_path):
    out = tmp_path / "target.json"
    run = CliRunner().invoke(app, ["profile-target", "--providers", "cpu", "--out", str(out), "--seconds", "1"])
    assert run.exit_code == 0, run.output
    profile = TargetProfile.from_json(out)
    assert (profile.provider, profile.name, profile.kind) == ("CPUExecutionProvider", "cpu", "cpu")
    assert sorted(profile.flops_per_second) == [1, 8, 64, 256]
    assert all(1e7 < rate < 1e14 for rate in profile.flops_per_second.values())  # 10 MFLOP/s to 100 TFLOP/s
    assert 1e7 < profile.copy_bytes_per_second < 1e13 and 0 <= profile.exit_fixed_seconds < 0.01
    again = CliRunner().invoke(app, ["profile-target", "--providers", "cpu", "--out", str(out), "--seconds", "1"])
    assert again.exit_code == 2 and "pass --force" in again.output
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "notes"}')
    refused = CliRunner().invoke(app, ["profile-target", "--providers", "cpu", "--out", str(mine), "--force"])
    assert refused.exit_code == 2 and "was not written by moco" in " ".join(refused.output.split())
    assert mine.read_text() == '{"my": "notes"}'
    # a CPU profile prices the cpu target at the serving batch (default 1) and keeps its layout
    config, pricing = resolve_target(PlannerConfig(), profile=profile)
    assert (config.target, config.serving_batch, config.exit_layout) == ("cpu", 1, "nested")
    assert config.exit_fixed_cost == profile.exit_fixed_cost(1) and pricing == profile


@pytest.mark.slow
def test_target_cpu_plans_as_before(tmp_path, reference_onnx, calib_npz):
    plans = []
    for name, options in (("default", []), ("cpu", ["--target", "cpu"])):
        run = _compile(reference_onnx, calib_npz, tmp_path / name, *options)
        assert run.exit_code == 0, run.output
        plans.append(json.loads((tmp_path / name / "plan.json").read_text()))
    default, cpu = plans
    assert cpu["exits"] and cpu["exits"] == default["exits"] and cpu["planner_config"] == default["planner_config"]
    assert cpu["exit_layout"] == "nested" and cpu["planner_config"]["exit_fixed_cost"] == 250_000
    report = json.loads((tmp_path / "cpu" / "report.json").read_text())
    assert report["target"]["name"] == "cpu" and report["target"]["priced_from"] is None


def test_a_gpu_build_records_its_target(tmp_path, reference_onnx, calib_npz):
    run = _compile(reference_onnx, calib_npz, tmp_path / "out", "--target", "cuda", "--serving-batch", "256",
                   "--allow-no-exit")
    assert run.exit_code == 0, run.output
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    config = PlannerConfig.from_dict(plan["planner_config"])
    assert replace(config, max_exits=PlannerConfig().max_exits) == \
        resolve_target(PROBES, "cuda", 256)[0]
    assert report["target"]["name"] == "cuda:h100" and report["target"]["serving_batch"] == 256
    assert report["target"]["priced_from"]["machine"].startswith("NVIDIA H100")


def test_a_gpu_profile_where_exits_pay_writes_a_bucketed_build_the_stage_runner_serves(tmp_path, reference_onnx,
                                                                                       calib_npz, calibration):
    """A GPU whose exits cost little (1 us per batch) opens exits: the build is bucketed, verified by the
    compile, and runs staged from its directory with the graph's exits and outputs."""
    import onnxruntime as ort

    from moco_compile.runtime.staged import StagedSession

    profile_path = tmp_path / "gpu.json"
    _profile(exit_fixed_seconds=1e-6).to_json(profile_path)
    out = tmp_path / "out"
    run = _compile(reference_onnx, calib_npz, out, "--target-profile", str(profile_path), "--serving-batch", "64",
                   "--batch-buckets", "1,8,64")
    assert run.exit_code == 0, run.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["exit_layout"] == "bucketed" and plan["exits"] and plan["planner_config"]["batch_buckets"] == [1, 8, 64]
    staged = StagedSession(out / "model.onnx", out / "plan.json", providers=["cpu"])
    single = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for size in (1, 5, 64, 100):
        images = calibration["images"][-size:]
        outputs = staged.run({"images": images})
        logits, exits = single.run(None, {"images": images})
        np.testing.assert_array_equal(outputs["moco_exit"], exits)
        np.testing.assert_allclose(outputs["logits"], logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # times the model: end-to-end
def test_the_cpu_target_at_a_serving_batch_is_priced_on_the_model_itself(tmp_path, reference_onnx, calib_npz):
    """``--serving-batch 1`` without a profile: the compile times the model and closed exits on this machine
    (a ``pricing`` phase), plans with that price, records where it came from, and writes the whole-batch
    layout; ``--exit-layout nested`` keeps nested."""
    from moco_compile.passes.graph.index import all_nodes

    run = _compile(reference_onnx, calib_npz, tmp_path / "batch1", "--serving-batch", "1", "--allow-no-exit")
    assert run.exit_code == 0, run.output
    plan = json.loads((tmp_path / "batch1" / "plan.json").read_text())
    report = json.loads((tmp_path / "batch1" / "report.json").read_text())
    config, target = PlannerConfig.from_dict(plan["planner_config"]), report["target"]
    profile = TargetProfile.from_dict({"format": "moco-target-profile", "version": 1, **target["priced_from"]})
    assert plan["exit_layout"] == config.exit_layout == target["exit_layout"] == "whole-batch"
    assert (config.target, config.serving_batch) == ("cpu", 1) and "pricing" in report["phases"]["seconds"]
    assert profile.provider == "CPUExecutionProvider" and "closed exits" in profile.machine
    assert config.exit_fixed_cost == pytest.approx(profile.exit_fixed_cost(1)) == target["exit_fixed_cost"]
    assert config.boundary_cost == pytest.approx(PlannerConfig().boundary_cost)
    import onnx

    ops = {n.op_type for n in all_nodes(onnx.load(tmp_path / "batch1" / "model.onnx").graph)}
    assert not {"NonZero", "Compress", "ScatterND"} & ops
    profile.to_json(tmp_path / "priced.json")  # this machine's price again, without timing it again
    nested = _compile(reference_onnx, calib_npz, tmp_path / "nested", "--serving-batch", "1", "--exit-layout",
                      "nested", "--allow-no-exit", "--target", "cpu", "--target-profile", str(tmp_path / "priced.json"))
    assert nested.exit_code == 0, nested.output
    assert json.loads((tmp_path / "nested" / "plan.json").read_text())["exit_layout"] == "nested"


def test_a_known_cpu_serving_batch_picks_the_layout_measured_fastest_there():
    """Batch 1: whole-batch; more rows: flat (RESULTS "Exit layout"); unknown batch or a GPU target: the
    configuration's (nested on CPU, bucketed on GPU targets)."""
    from moco_compile.cli import default_exit_layout

    assert [default_exit_layout(None, batch) for batch in (None, 1, 2, 64)] == [None, "whole-batch", "flat", "flat"]
    assert default_exit_layout("cpu", 8) == "flat" and default_exit_layout("cuda", 1) is None


def test_closed_exits_for_pricing_are_the_widest_the_compile_may_write(reference_model, calibration):
    """The pricing graph: closed exits (no row leaves, outputs equal the original's) at cuts spread over
    the compute, with the MLP head on the richest pooling, or the probe's richest where heads are linear."""
    import onnxruntime as ort

    from moco_compile.importer import import_model
    from moco_compile.passes.graph.rewrite import insert_exits
    from moco_compile.prepare import cut_points_of
    from moco_compile.pricing import PRICING_EXITS, _closed_exit, _spread, measured_cpu_profile

    imported = import_model(reference_model)
    rows = {"images": calibration["images"][:64]}
    _, cuts = cut_points_of(imported, rows, 64)
    chosen = _spread(cuts, PRICING_EXITS)
    fractions = [cut.fraction_before for cut in chosen]
    assert len(chosen) == min(PRICING_EXITS, len(cuts)) == len({c.tensor for c in chosen}) >= 3
    assert fractions == sorted(fractions) and fractions[0] < 0.5 < fractions[-1]
    ordered = sorted(cuts, key=lambda c: c.flops_before)
    assert _spread(cuts, 2) == [ordered[len(cuts) // 4], ordered[3 * len(cuts) // 4]]  # the quartiles' cuts
    mlp, linear = (_closed_exit(chosen[0], 10, PlannerConfig(exit_heads=heads)) for heads in (("linear", "mlp"),
                                                                                             ("linear",)))
    assert (mlp.pooling, linear.pooling) == ("grid3+max", "grid+max")
    assert mlp.scores.hidden_weight.shape[0] == 9 * chosen[0].shape[1] + chosen[0].shape[1]
    closed = insert_exits(imported.model, [_closed_exit(c, 10, PlannerConfig()) for c in chosen], imported.output,
                          "whole-batch")
    logits, exits = ort.InferenceSession(closed.SerializeToString()).run(None, rows)
    original, = ort.InferenceSession(imported.model.SerializeToString()).run(None, rows)
    assert (exits == -1).all()
    np.testing.assert_allclose(logits, original, atol=1e-5)
    profile = measured_cpu_profile(imported.model, imported.output, cuts, 10, {"images": rows["images"][:3]}, 4,
                                   PlannerConfig(), seconds=0.5)
    assert list(profile.flops_per_second) == [4] and profile.exit_fixed_seconds >= 0
