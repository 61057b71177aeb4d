"""Benchmark: the two exit layouts of the rewrite, nested If vs flat chain, on the same certified plans.

    python benchmarks/bench_exit_layout.py [--zoo resnet-basic convnext mobilenet-v3 resnet-deep]
                                           [--epochs 2] [--train-rows 20000] [--calibration-rows 5000]

Each net is compiled once by ``moco_compile.compile`` at the default budget; its certified plan is then
written in both layouts of ``passes/graph/rewrite.py`` (``nested``: each exit nests the rest in an ``If``;
``flat``: every stage at the top level on the compacted rows).  The two graphs must give the same
outputs and exits on the test rows (checked before timing).  Latency: onnxruntime CPU, one intra-op
thread per session, original / nested / flat alternating in this process, median of 15 rounds, at batch
1 and 64, as ratios to the original; then the same plan with every threshold +inf (no row leaves),
which isolates what the layout itself costs (the If boundary stops the CPU NCHWc layout fusion,
DESIGN.md); and an exit at every candidate cut, no row leaving (``bench_no_exit_overhead.py``'s
exits: the deepest nesting each net allows).  Nets: the shipped reference CNN (calibration: the first ``--calibration-rows`` rows of
``models/artifacts/fashion_calib.npz``; checked and timed on the rows after them), and the ``--zoo`` architectures
trained as ``benchmarks/bench_zoo.py`` trains them (legacy export; timed on the test split);
``resnet-deep`` is the reference ResNet with 4 blocks per stage.  Writes the
section "Exit layout: nested If vs flat chain" of ``benchmarks/RESULTS.md``.  Layouts are checked equal on
4,096 rows and timed on the first 512 (batch 1) and 1,024 (batch 64).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_fashion_resnet import run_batched  # noqa: E402
from benchmarks.bench_no_exit_overhead import closed_exits  # noqa: E402
from benchmarks.bench_zoo import BENCH_ARCHITECTURES, trained  # noqa: E402
from benchmarks.results import machine_description, write_section  # noqa: E402
from models.export_fashion_resnet import ONNX_PATH, load_calibration  # noqa: E402
from models.fashion_mnist import load_split, train_and_calibration_splits  # noqa: E402
from models.fashion_resnet import FashionResNet  # noqa: E402
from models.zoo_export import export, input_names, model_inputs  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.constants import EXIT_OUTPUT  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.graph.rewrite import apply_plan  # noqa: E402
from moco_compile.passes.planning.config import EXIT_LAYOUTS  # noqa: E402
from moco_compile.passes.planning.types import ExitPlan  # noqa: E402
from moco_compile.runtime.latency import compare_latency  # noqa: E402
from moco_compile.runtime.session import make_session  # noqa: E402

ARCHITECTURES = {**BENCH_ARCHITECTURES, "resnet-deep": lambda: FashionResNet((16, 32, 64), 4)}
SECONDS = {1: 6.0, 64: 9.0}  # per session and batch size
ROUNDS = 15  # short passes, many rounds: the median shrugs off load that other work puts on the cores
TIMED_ROWS = {1: 512, 64: 1024}
CHECKED_ROWS = 4096


def layouts(model: onnx.ModelProto, plan: ExitPlan, output: str) -> dict[str, onnx.ModelProto]:
    """The original model and ``plan`` written in each layout."""
    return {"original": model, **{layout: apply_plan(model, plan, output, layout) for layout in EXIT_LAYOUTS}}


def check_same(graphs: dict[str, onnx.ModelProto], inputs: dict[str, np.ndarray], output: str) -> float:
    """Exit rate of the rows; fails unless both layouts give them the same exits and outputs."""
    (nested, nested_exits), (flat, flat_exits) = (
        run_batched(make_session(graphs[layout], ["CPUExecutionProvider"], threads=1), inputs,
                    names=[output, EXIT_OUTPUT]) for layout in EXIT_LAYOUTS)
    if not (nested_exits == flat_exits).all() or np.abs(nested - flat).max() > 1e-5:
        raise AssertionError("the nested and flat graphs of one plan disagree")
    return float((nested_exits >= 0).mean())


def timings(graphs: dict[str, onnx.ModelProto], inputs: dict[str, np.ndarray]) -> dict[int, dict[str, float]]:
    """Seconds per batch of each graph at batch 1 and 64, the sessions alternating."""
    sessions = {name: make_session(graph, ["CPUExecutionProvider"], threads=1) for name, graph in graphs.items()}
    result = {}
    for batch, seconds in SECONDS.items():
        rows = {name: values[:TIMED_ROWS[batch]] for name, values in inputs.items()}
        result[batch] = compare_latency(sessions, rows, batch, min_seconds=seconds, rounds=ROUNDS)
        print(batch, {k: f"{1e3 * v:.3f} ms" for k, v in result[batch].items()}, flush=True)
    return result


def measure(model: onnx.ModelProto, calibration: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict:
    """Compile, write the plan in both layouts, check them equal, time them as planned and with no row
    leaving; then no row leaving an exit at every candidate cut (the deepest nesting the net allows)."""
    plan = compile(model, calibration, measure_latency=False, show_progress=False).plan
    imported = import_model(model)
    test = {name: values[:CHECKED_ROWS] for name, values in test.items()}
    every_cut = closed_exits(imported, {name: calibration[name] for name in imported.input_names})
    figures = {"plan": len(plan.exits), "no-exit": len(plan.exits), "every-cut": len(every_cut.exits), "timings": {}}
    if plan.exits:
        graphs = layouts(imported.model, plan, imported.output)
        figures["exit_rate"] = check_same(graphs, test, imported.output)
        figures["timings"]["plan"] = timings(graphs, test)
        closed = [replace(e, thresholds=np.full_like(e.thresholds, np.inf)) for e in plan.exits]
        figures["timings"]["no-exit"] = timings(layouts(imported.model, replace(plan, exits=closed), imported.output),
                                                test)
    figures["timings"]["every-cut"] = timings(layouts(imported.model, every_cut, imported.output), test)
    return figures


def zoo_net(architecture: str, epochs: int, train: tuple[np.ndarray, np.ndarray],
            calibration: tuple[np.ndarray, np.ndarray], test: np.ndarray
            ) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A zoo architecture trained as bench_zoo trains it, legacy export; its calibration and test inputs."""
    module = trained(architecture, train, epochs, ARCHITECTURES)
    names = input_names(module)
    return (export(module, "legacy"), {**model_inputs(names, calibration[0]), "labels": calibration[1]},
            model_inputs(names, test))


def reference_net(calibration_rows: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    data = load_calibration()
    calibration = {"images": data["images"][:calibration_rows], "labels": data["labels"][:calibration_rows]}
    return onnx.load(str(ONNX_PATH)), calibration, {"images": data["images"][calibration_rows:]}


CASES = {"plan": "as planned", "no-exit": "none (thresholds +inf)",
         "every-cut": "none, an exit at every candidate cut"}


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| net | exits | rows leave | batch | original ms | nested | flat | flat / nested |",
             "|---|---|---|---|---|---|---|---|"]
    for net, figures in results.items():
        if "plan" not in figures["timings"]:
            lines.append(f"| {net} | 0 | no plan with exits certified | | | | | |")
        for case, cases in figures["timings"].items():
            label = f"{CASES[case]} ({100 * figures['exit_rate']:.1f}%)" if case == "plan" else CASES[case]
            for batch, timing in cases.items():
                nested, flat = timing["nested"] / timing["original"], timing["flat"] / timing["original"]
                lines.append(f"| {net} | {figures[case]} | {label} | {batch} | {1e3 * timing['original']:.3f} "
                             f"| {nested:.3f}x | {flat:.3f}x | {timing['flat'] / timing['nested']:.3f} |")
    return lines


def summary(results: dict[str, dict]) -> list[str]:
    """flat / nested per case and batch size: geometric mean and range over the nets."""
    lines = ["| rows leave | batch | flat / nested, geometric mean | range | nets |", "|---|---|---|---|---|"]
    for case, label in CASES.items():
        for batch in SECONDS:
            ratios = [f["timings"][case][batch]["flat"] / f["timings"][case][batch]["nested"]
                      for f in results.values() if case in f["timings"]]
            lines.append(f"| {label} | {batch} | {np.exp(np.mean(np.log(ratios))):.3f} "
                         f"| {min(ratios):.3f}-{max(ratios):.3f} | {len(ratios)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", nargs="*", choices=list(ARCHITECTURES),
                        default=["resnet-basic", "convnext", "mobilenet-v3", "resnet-deep"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-rows", type=int, default=20_000)
    parser.add_argument("--calibration-rows", type=int, default=5_000)
    args = parser.parse_args()
    results = {"reference CNN": measure(*reference_net(args.calibration_rows))}
    (train_x, train_y), (calibration_x, calibration_y) = train_and_calibration_splits()
    train = train_x[:args.train_rows], train_y[:args.train_rows]
    calibration = calibration_x[:args.calibration_rows], calibration_y[:args.calibration_rows]
    test = load_split("test")[0]
    for architecture in args.zoo:
        print(architecture, flush=True)
        results[architecture] = measure(*zoo_net(architecture, args.epochs, train, calibration, test))
    text = "\n".join([
        f"Command: `{' '.join(['python benchmarks/bench_exit_layout.py', *sys.argv[1:]])}`",
        f"Machine: {machine_description()}; other work shared the 2 cores", "",
        "One certified plan per net (default budget), written in both layouts of `passes/graph/rewrite.py`; both give "
        "the same exits and outputs on the timed rows (checked). Latency compiled / original, onnxruntime CPU, one "
        "intra-op thread per session, original, nested and flat alternating in one process, median of 15 rounds; "
        "flat / nested below 1: the flat chain is faster. \"none\": the same exits with every threshold +inf, so "
        "every row crosses every boundary (the layout's own cost); \"every candidate cut\": an exit at each "
        "(cheapest pooling, thresholds +inf), as `bench_no_exit_overhead.py` builds them. Zoo nets trained as `bench_zoo.py` trains them "
        f"({args.epochs} epochs, {args.train_rows:,} rows), legacy export, checked and timed on the test split; the "
        "reference CNN on the calibration rows after those it was compiled on (checked on 4,096 rows, timed on 512 "
        "at batch 1 and 1,024 at batch 64).", "",
        *summary(results), "", *table(results)])
    print(text)
    write_section("Exit layout: nested If vs flat chain", text)


if __name__ == "__main__":
    main()
