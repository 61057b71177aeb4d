"""``moco evaluate``: the shadow run of real traffic, its drift flags, its files and its bad inputs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from moco_compile.cli import app
from moco_compile.evaluation import evaluate_build, write_evaluation
from moco_compile.outputs import MANIFEST
from moco_compile.runtime.session import CUDA
from tests.conftest import CALIBRATION_NPZ, COMPILE_ROWS

TRAFFIC_ROWS = 1200


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """Held-out calibration images (rows the compile never saw), as a traffic file."""
    with np.load(CALIBRATION_NPZ) as data:
        rows = slice(COMPILE_ROWS, COMPILE_ROWS + TRAFFIC_ROWS)
        arrays = {"images": data["images"][rows], "labels": data["labels"][rows]}
    path = tmp_path_factory.mktemp("traffic") / "traffic.npz"
    np.savez(path, **arrays)
    return path, arrays


@pytest.fixture
def build(compiled, tmp_path):
    """A private copy of the compiled build (tests here write into it)."""
    _, out = compiled
    return shutil.copytree(out, tmp_path / "build")


def test_traffic_like_calibration_matches_the_build(compiled, build, traffic):
    result, _ = compiled
    path, arrays = traffic
    run = CliRunner().invoke(app, ["evaluate", str(build), "--traffic", str(path), "--gpu-hour-price", "2"])
    assert run.exit_code == 0, run.output
    evaluation = json.loads((build / "evaluation.json").read_text())
    disagreement = evaluation["disagreement"]
    assert disagreement["consistent_with_budget"] and evaluation["drift"] == []
    assert disagreement["interval"][0] <= disagreement["fraction"] <= disagreement["interval"][1]
    assert abs(evaluation["exit_rate"] - result.report["exit_rate"]) < 0.05
    assert abs(evaluation["compute_reduction"] - result.report["compute_reduction"]) < 0.05
    # the shadow run's classes are the two models' own: check against a direct run
    full, = ort.InferenceSession(result.report["source_model"]["path"]).run(None, {"images": arrays["images"]})
    assert evaluation["accuracy_original"] == pytest.approx((full.argmax(1) == arrays["labels"]).mean())
    projection = evaluation["projection"]
    assert projection["fraction_saved"] == pytest.approx(1 - evaluation["latency_ratio"])
    assert projection["cost_saved"] == pytest.approx(2 * projection["device_hours_saved"])
    listed = json.loads((build / MANIFEST).read_text())["files"]
    assert {"evaluation.json", "evaluation.html"} <= set(listed)
    page = (build / "evaluation.html").read_text()
    assert 'id="plot-stream"' in page and 'id="plot-projection"' in page
    again = CliRunner().invoke(app, ["evaluate", str(build), "--traffic", str(path)])
    assert again.exit_code == 2 and "--force" in again.output  # never replaced without --force
    assert CliRunner().invoke(app, ["evaluate", str(build), "--traffic", str(path), "--force"]).exit_code == 0


def test_traffic_unlike_calibration_is_flagged_where_it_starts(build, traffic):
    _, arrays = traffic
    rng = np.random.default_rng(0)
    half = TRAFFIC_ROWS // 2
    images = arrays["images"]
    noise = rng.uniform(images.min(), images.max(), size=(half, *images.shape[1:])).astype(images.dtype)
    evaluation = evaluate_build(build, {"images": np.concatenate([images[:half], noise])}, windows=6,
                                show_progress=False)
    assert evaluation["drift"]
    flagged = [w["start"] for w in evaluation["windows"] if w["exits_fell"] or w["disagreement_above_budget"]]
    assert flagged and min(flagged) >= half
    json_path, html_path = write_evaluation(build, evaluation)
    assert "drift" in html_path.read_text() and json.loads(json_path.read_text())["drift"] == evaluation["drift"]


def _evaluate(*args) -> tuple[int, str]:
    run = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    return run.exit_code, " ".join(run.output.split())


def test_not_a_build_is_refused(tmp_path, traffic):
    (tmp_path / "notes.txt").write_text("mine")
    code, output = _evaluate(tmp_path, "--traffic", traffic[0])
    assert code == 2 and "is not a moco build" in output and "Traceback" not in output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_traffic_that_does_not_fit_the_model_is_refused(build, tmp_path, traffic):
    np.savez(tmp_path / "wrong.npz", pixels=traffic[1]["images"][:10])
    code, output = _evaluate(build, "--traffic", tmp_path / "wrong.npz")
    assert code == 2 and "traffic" in output and "missing: ['images']" in output
    np.savez(tmp_path / "shape.npz", images=traffic[1]["images"][:10, :, :14])
    code, output = _evaluate(build, "--traffic", tmp_path / "shape.npz")
    assert code == 2 and "has shape [10, 1, 14, 28]" in output
    assert not (build / "evaluation.json").exists()


def test_a_changed_or_missing_original_is_refused(build, traffic, tmp_path):
    report = json.loads((build / "report.json").read_text())
    report["source_model"]["sha256"] = "0" * 64
    (build / "report.json").write_text(json.dumps(report))
    code, output = _evaluate(build, "--traffic", traffic[0])
    assert code == 2 and "changed since the build was compiled" in output
    report["source_model"] = None
    (build / "report.json").write_text(json.dumps(report))
    code, output = _evaluate(build, "--traffic", traffic[0])
    assert code == 2 and "pass --original" in output
    code, output = _evaluate(build, "--traffic", traffic[0], "--original", tmp_path / "gone.onnx")
    assert code == 2 and "does not exist" in output


def test_unavailable_gpu_fails_only_when_required(build, traffic):
    code, output = _evaluate(build, "--traffic", traffic[0], "--providers", "cuda", "--require-gpu")
    if CUDA in ort.get_available_providers():
        assert code == 0, output
    else:
        assert code == 2 and "GPU was required" in output and "moco-compile[gpu]" in output


@pytest.mark.parametrize("option, value, message", [("--utilisation", "0", "--utilisation must be in (0, 1]"),
                                                    ("--qps", "-1", "--qps must be positive"),
                                                    ("--providers", "tpu", "unknown execution provider")])
def test_bad_settings_are_refused(build, traffic, option, value, message):
    code, output = _evaluate(build, "--traffic", traffic[0], option, value)
    assert code == 2 and message in output
