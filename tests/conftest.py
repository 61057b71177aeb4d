"""Shared fixtures: the shipped reference CNN, its calibration data, one compile of it, and the
environment a Triton server runs from."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import venv
from pathlib import Path

import numpy as np
import onnx
import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "models" / "artifacts"
REFERENCE_ONNX = ARTIFACTS / "fashion_resnet.onnx"
CALIBRATION_NPZ = ARTIFACTS / "fashion_calib.npz"
COMPILE_ROWS = 4000
TRITON_ENV = Path(__file__).resolve().parents[1] / ".triton-env"
TRITON_PACKAGES = ["nvidia-pytriton==0.7.0", "numpy<2", "onnxruntime"]


@pytest.fixture(scope="session")
def reference_onnx() -> Path:
    return REFERENCE_ONNX


@pytest.fixture(scope="session")
def reference_model() -> onnx.ModelProto:
    return onnx.load(str(REFERENCE_ONNX))


@pytest.fixture(scope="session")
def calibration() -> dict[str, np.ndarray]:
    """The first rows of the shipped calibration set (images the network never trained on)."""
    with np.load(CALIBRATION_NPZ) as data:
        return {"images": data["images"][:COMPILE_ROWS], "labels": data["labels"][:COMPILE_ROWS]}


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, calibration, worker_id):
    """One compile of the reference CNN at the default budget, written to disk: ``(build, directory)``.

    The first pytest-xdist worker to ask compiles it, once for the whole run; every worker gets its
    own copy of the directory (tests write beside it) and the build ``Build.load`` reads from that copy,
    its graph read into ``model`` as compile returns it (plan and report come from the JSON files).
    """
    from filelock import FileLock

    from moco_compile import compile
    from moco_compile.build import Build

    run_dir = tmp_path_factory.getbasetemp()
    run_dir = run_dir if worker_id == "master" else run_dir.parent  # the workers' shared parent
    built = run_dir / "reference-build"
    with FileLock(str(run_dir / "reference-build.lock")):
        if not built.is_dir():
            compile(REFERENCE_ONNX, calibration, out_dir=built, measure_latency=False, show_progress=False)
    out = tmp_path_factory.mktemp("compiled") / "out"
    shutil.copytree(built, out)
    result = Build.load(out)
    return dataclasses.replace(result, model=onnx.load(str(result.model_path))), out


@pytest.fixture(scope="session")
def server_env() -> Path:
    """A Triton server's environment (``TRITON_PACKAGES``) in the git-ignored ``.triton-env/``: reused
    when valid, else (re)built with pip; fails with the reason."""
    from moco_compile.errors import MocoError
    from moco_compile.runtime.triton.server import triton_env

    try:
        triton_env(TRITON_ENV)
        return TRITON_ENV
    except MocoError:
        pass
    venv.EnvBuilder(with_pip=True).create(TRITON_ENV)
    subprocess.run([str(TRITON_ENV / "bin" / "python"), "-m", "pip", "install", "-q", *TRITON_PACKAGES],
                   check=True, timeout=900)
    triton_env(TRITON_ENV)
    return TRITON_ENV


@pytest.fixture(scope="session")
def compiled_outputs(compiled):
    """Runs the shared compile's model.onnx directly with onnxruntime: images -> {output name: values}."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(compiled[1] / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(names, {"images": images})))


@pytest.fixture(scope="session")
def guarded_soft(reference_model, calibration):
    """``(model, result, rows)``: the reference CNN ending in ``Softmax(logits / 4)`` (probabilities far
    softer than its rules': exited rows' confidence scales matter) compiled on the first ``rows``
    calibration rows at a 5% budget with an out-of-distribution guard at level 0.01, softmax-probe heads
    only (MLP heads distilled from these soft probabilities are calibrated already: confidence scales
    of 1.01-1.05, nothing for the scale tests to find).  Shared by the guard and the exited-confidence
    tests (one compile for both)."""
    from models.onnx_heads import with_soft_probabilities
    from moco_compile import compile
    from moco_compile.passes.planning.config import PlannerConfig

    rows = 2000
    model = with_soft_probabilities(reference_model, 4.0)
    result = compile(model, {k: v[:rows] for k, v in calibration.items()}, max_disagreement=0.05, ood_guard=0.01,
                     measure_latency=False, show_progress=False, planner_config=PlannerConfig(exit_heads=("linear",)))
    return model, result, rows


@pytest.fixture(scope="session")
def plan_split():
    """``plan_split(result, name)``: a compile's calibration split ``name`` as a ``passes.plan.Split``."""
    return _plan_split


def _plan_split(result, name: str, shuffle_predictions: bool = False):
    from moco_compile.api import SPLITS
    from moco_compile.passes.calibration.calibrate import variant_features
    from moco_compile.passes.planning.counts import Split

    rows = result.frame[result.frame["split"] == SPLITS.index(name)]
    predictions = rows["predictions"]
    if shuffle_predictions:
        predictions = np.random.default_rng(0).permutation(predictions)
    return Split([e.scores(variant_features(rows, e.column, e.pooling)) for e in result.plan.exits], predictions)


# -- under CI a skipped test is a failure --------------------------------------------------------------
# A skip hides a test that never ran (a module-level importorskip, say, when an import breaks); with
# the environment variable CI=true every skip, at collection, in setup or in the test, is reported
# as a failure that gives its reason.  Expected failures (xfail) are left alone.


def _fail_skipped(report, where: str) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get("CI") == "true":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"{report.nodeid or 'a test file'} was skipped {where} ({reason}); under CI=true a skip fails"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Under CI=true, a file or class skipped at collection is a collection error."""
    report = yield
    _fail_skipped(report, "at collection")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true, a test skipped in setup or while running fails."""
    report = yield
    _fail_skipped(report, f"in {report.when}")
    return report
