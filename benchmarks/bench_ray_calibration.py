"""Benchmark: calibration on Ray (``--engine ray``) vs the single-process path, on this machine.

    python benchmarks/bench_ray_calibration.py [--rows 20000] [--memory-rows 5000] [--design-rows 2000]
        [--shard-rows 500] [--cpus 2] [--no-write]

The reference CNN's shipped calibration images (tiled when more rows are asked for) are written as
``.npz`` shards of ``--shard-rows`` rows.  Measured:

1. rows/s of the calibration pass (pooled cut features + full-model predictions into an
   ActivationFrame) over ``--rows`` rows: the single-process path (one onnxruntime session, its
   default threads) and the Ray engine with 1 and 2 actors (0.5 CPU, 1 onnxruntime thread each) on a
   local cluster of ``--cpus`` CPUs.  Ray's start-up (``ray.init``) is timed separately; each Ray
   run includes starting its actors.
2. the driver's peak memory (RSS sampled every 20 ms, above its level before the run) while the
   Ray engine calibrates ``--memory-rows`` rows and 10x as many; and during the whole compile of
   each, every row certified (no ``max_rows`` sample), the rules split capped at ``--design-rows``
   (``PlannerConfig.max_design_rows``; the default 50,000 caps it the same way from 100,000 rows).
3. ``moco evaluate`` of the first compile's build over the ``--rows`` traffic rows: seconds and rows/s
   in one process and on Ray (2 actors), and the driver's peak while Ray evaluates ``--memory-rows``
   rows and 10x as many (the driver keeps each row's two classes and exit for the drift windows).
4. a projection, from the measured 2-actor rate, of the time to calibrate 100M rows on N machines.

Writes the section "Calibration on Ray" of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import machine_description, write_section  # noqa: E402
from moco_compile.api import compile  # noqa: E402
from moco_compile.calibration_data import iter_batches  # noqa: E402
from moco_compile.evaluation import evaluate_build  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.calibration.calibrate import calibrate  # noqa: E402
from moco_compile.passes.planning.config import PlannerConfig  # noqa: E402
from moco_compile.prepare import calibration_spec, cut_points_of  # noqa: E402
from moco_compile.scale.ray_engine import calibrate_on_ray  # noqa: E402
from moco_compile.scale.shards import ShardedData, list_shards  # noqa: E402

MODEL = ROOT / "models" / "artifacts" / "fashion_resnet.onnx"
CALIBRATION = ROOT / "models" / "artifacts" / "fashion_calib.npz"
TITLE = "Calibration on Ray"
TARGET_ROWS = 100_000_000


class PeakRss:
    """The process's peak resident memory above its level at the start, sampled in a thread."""

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_shards(data: dict[str, np.ndarray], rows: int, shard_rows: int, directory: Path) -> Path:
    """``rows`` rows (the data tiled) as ``.npz`` shards in ``directory``."""
    directory.mkdir(parents=True)
    total = len(data["images"])
    for index, start in enumerate(range(0, rows, shard_rows)):
        take = np.arange(start, min(start + shard_rows, rows)) % total
        np.savez(directory / f"part{index:05d}.npz", images=data["images"][take], labels=data["labels"][take])
    return directory


def on_ray(setup: dict, directory: Path, workers: int, out: Path) -> float:
    """Seconds for the Ray engine to calibrate every shard in ``directory``."""
    filesystem, shards = list_shards(str(directory))
    started = time.perf_counter()
    calibrate_on_ray(setup["model"].model, setup["model"].output, setup["cuts"], setup["spec"],
                     ShardedData(str(directory), workers=workers), filesystem, shards, out, show_progress=False)
    return time.perf_counter() - started


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    with np.load(CALIBRATION) as archive:
        data = {"images": archive["images"], "labels": archive["labels"]}
    imported = import_model(MODEL)
    spec = calibration_spec(imported)
    _, cuts = cut_points_of(imported, {key: values[:256] for key, values in data.items()}, 256)
    setup = {"model": imported, "cuts": cuts, "spec": spec}
    tiled = {key: values[np.arange(args.rows) % len(values)] for key, values in data.items()}
    started = time.perf_counter()
    calibrate(imported.model, imported.output, cuts, iter_batches(tiled, spec), scratch / "local.arrow",
              show_progress=False)
    results = {"local_seconds": time.perf_counter() - started}
    throughput_dir = write_shards(data, args.rows, args.shard_rows, scratch / "throughput")
    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    results["init_seconds"] = time.perf_counter() - started
    try:
        for workers in (1, 2):
            results[f"ray{workers}_seconds"] = on_ray(setup, throughput_dir, workers, scratch / f"frames{workers}")
        for scale in (1, 10):
            directory = write_shards(data, args.memory_rows * scale, args.shard_rows, scratch / f"memory{scale}")
            with PeakRss() as peak:
                results[f"memory{scale}_seconds"] = on_ray(setup, directory, 2, scratch / f"mframes{scale}")
            results[f"memory{scale}_mb"] = peak.growth_mb
            results[f"memory{scale}_peak_mb"] = peak.peak / 2**20
        for scale in (1, 10):
            started = time.perf_counter()
            with PeakRss() as peak:
                result = compile(MODEL, ShardedData(str(scratch / f"memory{scale}")), measure_latency=False,
                                 show_progress=False, planner_config=PlannerConfig(max_design_rows=args.design_rows),
                                 out_dir=scratch / f"build{scale}")
            results[f"compile{scale}_seconds"] = time.perf_counter() - started
            results[f"compile{scale}_mb"] = peak.growth_mb
            results[f"compile{scale}_splits"] = result.report["splits"]
            results[f"compile{scale}_reduction"] = result.report["compute_reduction"]
        results.update(measure_evaluate(scratch, tiled, throughput_dir))
    finally:
        ray.shutdown()
    return results


def measure_evaluate(scratch: Path, traffic: dict[str, np.ndarray], shards: Path) -> dict:
    """Seconds of ``moco evaluate`` of the first build over ``traffic`` in one process and over the same
    rows' shards on Ray (2 actors); the driver's peak growth while Ray evaluates the memory runs' shards."""
    build, results = scratch / "build1", {}
    started = time.perf_counter()
    evaluate_build(build, traffic, providers=["cpu"], show_progress=False)
    results["evaluate_local_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluate_build(build, ShardedData(str(shards), workers=2), providers=["cpu"], show_progress=False)
    results["evaluate_ray_seconds"] = time.perf_counter() - started
    for scale in (1, 10):
        with PeakRss() as peak:
            evaluate_build(build, ShardedData(str(scratch / f"memory{scale}"), workers=2), providers=["cpu"],
                           show_progress=False)
        results[f"evaluate{scale}_mb"] = peak.growth_mb
    return results


def report(results: dict, args: argparse.Namespace, command: str) -> str:
    rate = {name: args.rows / results[f"{name}_seconds"] for name in ("local", "ray1", "ray2")}
    per_machine = rate["ray2"]
    projection = "\n".join(
        f"| {machines} | {TARGET_ROWS / (per_machine * machines) / 3600:,.1f} h |" for machines in (1, 10, 100))
    return f"""Machine: {machine_description()}; Ray {ray.__version__}. Command: `{command}`.
The machine is shared with other jobs (2 cores): rates are indicative, not a controlled measurement.

Reference CNN (`fashion_resnet.onnx`), {args.rows:,} rows in `.npz` shards of {args.shard_rows} rows; the
calibration pass only (pooled cut features + predictions into ActivationFrame files; no planning).

| path | seconds | rows/s |
|---|---|---|
| single process (one onnxruntime session, default threads) | {results['local_seconds']:.1f} | {rate['local']:,.0f} |
| Ray, 1 actor (0.5 CPU, 1 thread) | {results['ray1_seconds']:.1f} | {rate['ray1']:,.0f} |
| Ray, 2 actors (0.5 CPU, 1 thread each) | {results['ray2_seconds']:.1f} | {rate['ray2']:,.0f} |

Ray start-up, not in the rows above: `ray.init` of a local {args.cpus}-CPU cluster
{results['init_seconds']:.1f} s; each Ray run above includes starting its actors (one onnxruntime
session each).

Driver memory while the Ray engine (2 actors) calibrates (peak RSS above the level before the run;
the driver holds shard names and row counts, never rows or features):

| rows | seconds | driver peak growth | driver RSS peak |
|---|---|---|---|
{_memory_row(args.memory_rows, results, 1)}
{_memory_row(10 * args.memory_rows, results, 10)}

The whole `moco compile --engine ray` (calibration, rule fitting, planning, rewrite, verification),
every calibrated row planned on and certified (no `--ray-max-rows` sample), the rules split capped at
{args.design_rows:,} rows (`PlannerConfig(max_design_rows={args.design_rows})`; the default 50,000 caps it
the same way from 100,000 rows on): the driver reads the rules rows and the first rows (which verify
the compiled graph) from the frame shards; one Ray task per frame shard counts what each candidate plan
does on its test and report rows, and the driver sums those counts:

| calibrated rows | rules / test / report rows | seconds | driver peak growth | compute reduction (report rows, else test rows) |
|---|---|---|---|---|
{_compile_row(args.memory_rows, results, 1)}
{_compile_row(10 * args.memory_rows, results, 10)}

The driver holds the rules rows ({_frame_bytes_per_row():,} bytes per row of frame for this model), the
first rows, and a few integers per plan; the test rows are never read on the driver, so its peak does
not grow with the data.  The smaller compile runs first in the process and also pays one-time costs
(modules loaded and buffers grown on first use), so its growth overstates the steady state.

`moco evaluate --engine ray` (the build of the {args.memory_rows:,}-row compile; original and compiled
model on every traffic row, per-row results written by the actors, summed into the evaluation on the
driver), vs the same evaluation in one process (default onnxruntime threads):

| path | traffic rows | seconds | rows/s |
|---|---|---|---|
| single process | {args.rows:,} | {results['evaluate_local_seconds']:.1f} | {args.rows / results['evaluate_local_seconds']:,.0f} |
| Ray, 2 actors | {args.rows:,} | {results['evaluate_ray_seconds']:.1f} | {args.rows / results['evaluate_ray_seconds']:,.0f} |

Driver peak growth while Ray evaluates {args.memory_rows:,} rows: {results['evaluate1_mb']:.1f} MB;
{10 * args.memory_rows:,} rows: {results['evaluate10_mb']:.1f} MB (the driver keeps each row's two classes
and exit, about 40 bytes per row, for the drift windows: linear in the traffic, not bounded).

Projection, not a measurement: hours to calibrate {TARGET_ROWS:,} rows on N machines like this one,
assuming each machine runs 2 actors at the measured 2-actor rate ({per_machine:,.0f} rows/s), the
rate scales linearly with machines (shards read from and frame shards written to shared storage
with enough bandwidth; at least as many shards as actors), and Ray's start-up and the driver's
bookkeeping are negligible at that scale:

| machines | time |
|---|---|
{projection}
"""


def _memory_row(rows: int, results: dict, scale: int) -> str:
    return (f"| {rows:,} | {results[f'memory{scale}_seconds']:.1f} | {results[f'memory{scale}_mb']:.1f} MB "
            f"| {results[f'memory{scale}_peak_mb']:.0f} MB |")


def _compile_row(rows: int, results: dict, scale: int) -> str:
    splits = results[f"compile{scale}_splits"]
    return (f"| {rows:,} | {splits['rules']:,} / {splits['test']:,} / {splits['report']:,} "
            f"| {results[f'compile{scale}_seconds']:.1f} | {results[f'compile{scale}_mb']:.1f} MB "
            f"| {100 * results[f'compile{scale}_reduction']:.1f}% |")


def _frame_bytes_per_row() -> int:
    """Bytes of one row of the reference CNN's frame (the features the planner reads)."""
    with tempfile.TemporaryDirectory() as scratch, np.load(CALIBRATION) as archive:
        imported = import_model(MODEL)
        spec = calibration_spec(imported)
        rows = {"images": archive["images"][:64]}
        _, cuts = cut_points_of(imported, rows, 64)
        frame = calibrate(imported.model, imported.output, cuts, iter_batches(rows, spec), Path(scratch) / "f.arrow",
                          show_progress=False)
        return sum(frame[column].nbytes for column in frame.columns) // len(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000, help="rows for the rows/s comparison")
    parser.add_argument("--memory-rows", type=int, default=5000, help="rows of the 1x memory run (10x follows)")
    parser.add_argument("--design-rows", type=int, default=2000, help="max_design_rows of the compiles")
    parser.add_argument("--shard-rows", type=int, default=500)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moco-bench-ray-") as scratch:
        results = measure(args, Path(scratch))
    text = report(results, args, " ".join(["python benchmarks/bench_ray_calibration.py", *sys.argv[1:]]))
    print(text)
    if not args.no_write:
        write_section(TITLE, text)


if __name__ == "__main__":
    main()
