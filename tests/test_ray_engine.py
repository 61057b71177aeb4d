"""The Ray engine (``--engine ray``) on a local Ray cluster: the same answer as the single-process
path on the reference CNN, a dead worker retried, and clear errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from typer.testing import CliRunner

import moco_compile
from moco_compile.api import compile
from moco_compile.calibration_data import iter_batches
from moco_compile.cli import app
from moco_compile.errors import CalibrationDataError, MocoError
from moco_compile.evaluation import evaluate_build
from moco_compile.frame import load_frames
from moco_compile.importer import import_model
from moco_compile.passes.calibration.calibrate import calibrate
from moco_compile.passes.planning.config import Budget, PlannerConfig
from moco_compile.passes.planning.pipeline import plan_exits, plan_rows
from moco_compile.passes.planning.splits import SPLITS, assign_splits
from moco_compile.prepare import calibration_spec, cut_points_of
from moco_compile.scale.driver import ShardedRows, planning_rows
from moco_compile.scale.ray_engine import ShardCalibrator, calibrate_on_ray, shard_frame_name
from moco_compile.scale.shards import ShardedData, list_shards

from conftest import REFERENCE_ONNX
from tests.plan_settings import CHEAPEST_PLAN

pytestmark = pytest.mark.slow  # the fast tier (`pytest -m "not slow"`) leaves this file out

REPO = Path(moco_compile.__file__).resolve().parents[1]
ROWS = (500, 400, 300)  # rows per shard: an .npz, a Parquet file, an .npz
THRESHOLD_TOLERANCE = 1e-4  # on log-probabilities: the engines batch rows differently (onnxruntime rounding)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: 2 CPUs, loopback, workers import this checkout."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(calibration) -> dict[str, np.ndarray]:
    rows = sum(ROWS)
    return {"images": calibration["images"][:rows], "labels": calibration["labels"][:rows]}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, data) -> Path:
    """The rows as three shards in two formats; sorted names keep the rows' order."""
    directory = tmp_path_factory.mktemp("shards")
    bounds = np.cumsum((0,) + ROWS)
    for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = {key: values[start:stop] for key, values in data.items()}
        if index == 1:
            images = pa.FixedSizeListArray.from_arrays(pa.array(part["images"].reshape(-1)), 28 * 28)
            pq.write_table(pa.table({"images": images, "labels": part["labels"]}), directory / f"part{index}.parquet")
        else:
            np.savez(directory / f"part{index}.npz", **part)
    return directory


@pytest.fixture(scope="module")
def builds(cluster, shard_dir, data, tmp_path_factory) -> dict:
    """The reference CNN compiled from the same rows in this process and on Ray (written out)."""
    out = tmp_path_factory.mktemp("builds") / "ray"
    sharded = compile(REFERENCE_ONNX, ShardedData(str(shard_dir)), out_dir=out, measure_latency=False,
                      show_progress=False, planner_config=CHEAPEST_PLAN)
    local = compile(REFERENCE_ONNX, data, measure_latency=False, show_progress=False, planner_config=CHEAPEST_PLAN)
    return {"local": local, "ray_plan": sharded.plan, "ray_frame": sharded.frame, "ray_dir": out}


def test_same_answer_as_single_process(builds):
    local, plan, frame = builds["local"], builds["ray_plan"], builds["ray_frame"]
    assert [e.cut.tensor for e in plan.exits] == [e.cut.tensor for e in local.plan.exits]
    for ours, theirs in zip(plan.exits, local.plan.exits):
        assert ours.pooling == theirs.pooling
        np.testing.assert_allclose(ours.thresholds, theirs.thresholds, atol=THRESHOLD_TOLERANCE)
    for key in ("family", "chosen_plan", "disagreements", "test_rows", "p_value", "max_disagreement"):
        assert plan.certificate[key] == local.plan.certificate[key], key
    assert len(frame) == len(local.frame) == sum(ROWS)
    np.testing.assert_array_equal(frame["predictions"], local.frame["predictions"])


def test_evaluate_on_ray_matches_single_process(builds, shard_dir, data):
    local = evaluate_build(builds["ray_dir"], data, providers=["cpu"], show_progress=False)
    result = CliRunner().invoke(app, ["evaluate", str(builds["ray_dir"]), "--traffic", f"{shard_dir}/part*",
                                      "--engine", "ray", "--providers", "cpu"])
    assert result.exit_code == 0, result.output
    sharded = json.loads((builds["ray_dir"] / "evaluation.json").read_text())
    assert sharded["traffic_rows"] == local["traffic_rows"] == sum(ROWS)
    assert sharded["disagreement"] == local["disagreement"]
    assert sharded["exits"] == local["exits"]
    assert sharded["accuracy_compiled"] == local["accuracy_compiled"]
    assert sharded["windows"] == local["windows"]


def test_a_planning_sample_bounds_the_rows_the_driver_plans_on(builds, shard_dir):
    sampled = compile(REFERENCE_ONNX, ShardedData(str(shard_dir), max_rows=800), measure_latency=False,
                      show_progress=False, planner_config=CHEAPEST_PLAN)
    rows = planning_rows(sum(ROWS), 400, 800, 0)
    assert sum(sampled.report["splits"].values()) == 800
    assert sampled.plan.certificate["test_rows"] < builds["ray_plan"].certificate["test_rows"]
    # the build keeps the rows the driver read: the first 400 (they verify the graph) and the rules rows
    split = sampled.frame["split"]
    assert len(sampled.frame) == 400 + (split[400:] == SPLITS.index("rules")).sum() < 800
    assert (split[400:] == SPLITS.index("rules")).all()
    rules = np.flatnonzero(assign_splits(800, 0, Budget(), PlannerConfig()) == SPLITS.index("rules"))
    kept = rows[np.union1d(np.arange(400), rules)]
    np.testing.assert_array_equal(sampled.frame["predictions"], builds["ray_frame"]["predictions"][kept])
    assert sampled.report["verification"]["rows"] == 400


def test_planning_rows_are_the_first_rows_and_a_seeded_sample():
    rows = planning_rows(100_000, 100, 1_000, seed=3)
    assert len(rows) == len(set(rows)) == 1_000 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows[:100], np.arange(100))
    assert rows[-1] < 100_000 and rows[100:].mean() > 30_000  # spread over the data, not its start
    assert not np.array_equal(rows, planning_rows(100_000, 100, 1_000, seed=4))


@pytest.fixture(scope="module")
def reference(data) -> dict:
    """The reference CNN imported, what its calibration rows must hold, and its cut points."""
    imported = import_model(REFERENCE_ONNX)
    return {"imported": imported, "spec": calibration_spec(imported), "cuts": cut_points_of(imported, data, 256)[1]}


def test_dead_worker_is_retried(cluster, shard_dir, data, reference, tmp_path):
    marker = tmp_path / "crashed"

    class CrashOnce(ShardCalibrator):
        """The first call of any actor kills its process (once: the marker file says it happened)."""

        def __call__(self, shards):
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return super().__call__(shards)

    imported, spec, cuts = reference["imported"], reference["spec"], reference["cuts"]
    filesystem, shards = list_shards(f"{shard_dir}/part*")
    paths = calibrate_on_ray(imported.model, imported.output, cuts, spec, ShardedData(str(shard_dir)), filesystem,
                             shards, tmp_path / "frames", show_progress=False, calibrator=CrashOnce)
    assert marker.exists()
    distributed = load_frames(paths)
    local = calibrate(imported.model, imported.output, cuts, iter_batches(data, spec), tmp_path / "local.arrow",
                      show_progress=False)
    assert distributed.columns == local.columns
    for column in local.columns:
        np.testing.assert_allclose(distributed[column], local[column], rtol=1e-5, atol=1e-5, err_msg=column)


def test_a_shard_that_kills_its_worker_every_time_fails_naming_it(cluster, data, reference, tmp_path):
    class AlwaysCrash(ShardCalibrator):
        """Every batch kills the process (as an onnxruntime crash or the kernel's OOM killer would)."""

        def columns(self, batch, where):
            os._exit(1)

    (tmp_path / "shards").mkdir()
    np.savez(tmp_path / "shards" / "part0.npz", images=data["images"][:8])
    imported, spec, cuts = reference["imported"], reference["spec"], reference["cuts"]
    filesystem, shards = list_shards(str(tmp_path / "shards"))
    with pytest.raises(MocoError, match=r"processing shard \S*part0.npz died on each of its 2 attempts .*out of memory"):
        calibrate_on_ray(imported.model, imported.output, cuts, spec, ShardedData(str(tmp_path), max_attempts=2),
                         filesystem, shards, tmp_path / "frames", show_progress=False, calibrator=AlwaysCrash)
    assert sorted(path.name for path in (tmp_path / "frames").iterdir()) == [
        ".part-000000.arrow.attempt-1", ".part-000000.arrow.attempt-2", ".part-000000.arrow.attempt-3"]


class DriverPeak:
    """Peak bytes this process allocates in a block: Python and numpy (tracemalloc) plus Arrow's pool."""

    def __enter__(self) -> "DriverPeak":
        self._previous = pa.default_memory_pool()
        self._pool = pa.proxy_memory_pool(self._previous)  # its own statistics
        pa.set_memory_pool(self._pool)
        tracemalloc.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = tracemalloc.get_traced_memory()[1] + self._pool.max_memory()
        tracemalloc.stop()
        pa.set_memory_pool(self._previous)


def test_certification_counts_every_row_in_the_memory_of_one_shard(cluster, builds, reference, tmp_path):
    """Planning over 4x as many frame shards (every row certified, none sampled) adds nothing to the
    driver's peak: it reads the capped rules rows, the cluster counts the rest shard by shard.  The
    plan, its certificate and its report figures equal those of the same rows counted in one process."""
    local = builds["local"].frame
    frame = local[[column for column in local.columns if column != "split"]]
    shard_bytes = sum(frame[column].nbytes for column in frame.columns)
    config = PlannerConfig(max_design_rows=300, families=("shared",), shared_step_fraction=0.01,
                           report_min_rows=9_000, exit_heads=("linear",))
    total_flops = builds["local"].plan.total_flops
    peaks = {}
    for shards in (2, 8):
        (tmp_path / str(shards)).mkdir()
        paths = [frame.save(tmp_path / str(shards) / shard_frame_name(i)) for i in range(shards)]
        rows = ShardedRows(paths, ShardedData(str(tmp_path)), first=0)
        with DriverPeak() as peak:
            planning = plan_rows(rows, reference["cuts"], 10, total_flops, Budget(), config)
        peaks[shards] = peak.bytes
        report = 960 if shards == 8 else 0  # 9,600 rows set a report split aside (10%)
        assert planning.row_split.sizes == {"rules": 300, "test": len(rows) - 300 - report, "report": report}
        assert planning.evaluated_on == ("report" if report else "test")
        in_one_process = plan_exits(load_frames(paths), reference["cuts"], 10, total_flops, Budget(), config)
        assert planning.plan.certificate == in_one_process.plan.certificate
        assert planning.evaluation == in_one_process.evaluation
        assert planning.plan.exits
    assert peaks[8] < peaks[2] + shard_bytes / 4, (peaks, shard_bytes)
    assert peaks[8] < 2 * shard_bytes, (peaks, shard_bytes)


def test_unreachable_address_is_a_clear_error(cluster, shard_dir, tmp_path):
    result = CliRunner().invoke(app, ["compile", str(REFERENCE_ONNX), "--calib", str(shard_dir), "--out",
                                      str(tmp_path / "out"), "--engine", "ray", "--ray-address", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in result.output
    assert "ray start --head" in result.output


def test_no_shards_is_a_clear_error(tmp_path):
    with pytest.raises(CalibrationDataError, match=r"holds no shard files .*Parquet"):
        compile(REFERENCE_ONNX, ShardedData(f"{tmp_path}/*.parquet"), show_progress=False)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        list_shards(str(tmp_path / "missing"))


def test_shard_columns_must_match_the_model_inputs(tmp_path, data):
    np.savez(tmp_path / "part0.npz", pixels=data["images"][:10])
    with pytest.raises(CalibrationDataError, match=r"part0.npz.*missing: \['images'\].*not model inputs: "
                                                   r"\['pixels'\]"):
        compile(REFERENCE_ONNX, ShardedData(str(tmp_path)), show_progress=False)


def test_bad_engine_settings_are_clear_errors(tmp_path):
    with pytest.raises(MocoError, match=r"max_rows \(--ray-max-rows\) must be at least 2, got 1"):
        ShardedData(str(tmp_path), max_rows=1)
    result = CliRunner().invoke(app, ["compile", str(REFERENCE_ONNX), "--calib", str(tmp_path), "--out",
                                      str(tmp_path / "out"), "--engine", "spark"])
    assert result.exit_code == 2 and "--engine must be 'local' or 'ray', got 'spark'" in result.output


def test_parquet_rows_of_the_wrong_length_are_a_clear_error(tmp_path):
    pq.write_table(pa.table({"images": pa.array([np.zeros(783, np.float32)] * 3)}), tmp_path / "part0.parquet")
    with pytest.raises(CalibrationDataError, match=r"part0.parquet, column 'images': 2349 values in 3 rows do not "
                                                   r"fill rows of shape \[1, 28, 28\]"):
        compile(REFERENCE_ONNX, ShardedData(str(tmp_path)), show_progress=False)


def test_a_bad_shard_met_by_a_worker_is_the_same_clear_error(cluster, tmp_path, data):
    np.savez(tmp_path / "part0.npz", images=data["images"][:20])
    np.savez(tmp_path / "part1.npz", images=data["images"][20:40].astype(np.int64))
    with pytest.raises(CalibrationDataError, match=r"part1.npz, batch 0: input 'images' has dtype int64, the model "
                                                   r"expects float32"):  # the driver reads 4 rows of part0
        compile(REFERENCE_ONNX, ShardedData(str(tmp_path), max_rows=8), show_progress=False)


def test_without_ray_the_engine_says_how_to_install_it(shard_dir, tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from moco_compile.cli import app\n"
            f"app(['compile', {str(REFERENCE_ONNX)!r}, '--calib', {str(shard_dir)!r}, '--out', "
            f"{str(tmp_path / 'out')!r}, '--engine', 'ray'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'moco-compile[ray]'" in done.stderr
