"""Benchmark: the CPU exit layouts of the rewrite, nested If, flat chain and whole-batch, on the same certified plans.

    python benchmarks/bench_exit_layout.py [--zoo resnet-basic convnext mobilenet-v3 resnet-deep]
                                           [--text minilm6_rt] [--epochs 2] [--train-rows 20000]
                                           [--calibration-rows 5000]

Each net is compiled once by ``moco_compile.compile`` at the default budget; its certified plan is then
written in each CPU layout of ``passes/graph/rewrite.py`` (``nested``: each exit nests the rest in an ``If``;
``flat``: every stage at the top level on the compacted rows; ``whole-batch``: nested, no row split off,
the batch leaves when every row has decided).  The graphs must give the same outputs and exits on the test
rows (checked before timing).  Latency: onnxruntime CPU, one intra-op thread per session, the original and
the layouts alternating in this process, median of 15 rounds, at batch
1 and 64, as ratios to the original; then the same plan with every threshold +inf (no row leaves),
which isolates what the layout itself costs (the If boundary stops the CPU NCHWc layout fusion,
DESIGN.md); and an exit at every candidate cut, no row leaving (``bench_no_exit_overhead.py``'s
exits: the deepest nesting each net allows).  Nets: the shipped reference CNN (calibration: the first ``--calibration-rows`` rows of
``models/artifacts/fashion_calib.npz``; checked and timed on the rows after them), and the ``--zoo`` architectures
trained as ``benchmarks/bench_zoo.py`` trains them (legacy export; timed on the test split);
``resnet-deep`` is the reference ResNet with 4 blocks per stage; ``--text`` reference text classifiers
(``models/text_classifier.py``, exported by ``export_hf_sequence_classifier``; their committed calibration and
test rows).  Writes the
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
from models.text_classifier import REFERENCES, load_reference_model, reference_tokens  # noqa: E402
from models.zoo_export import export, input_names, model_inputs  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.constants import EXIT_OUTPUT  # noqa: E402
from moco_compile.importer import export_hf_sequence_classifier, import_model  # noqa: E402
from moco_compile.passes.graph.rewrite import apply_plan  # noqa: E402
from moco_compile.passes.planning.types import ExitPlan  # noqa: E402
from moco_compile.runtime.latency import compare_latency  # noqa: E402
from moco_compile.runtime.session import make_session  # noqa: E402

ARCHITECTURES = {**BENCH_ARCHITECTURES, "resnet-deep": lambda: FashionResNet((16, 32, 64), 4)}
SECONDS = {1: 6.0, 64: 9.0}  # per session and batch size
ROUNDS = 15  # short passes, many rounds: the median shrugs off load that other work puts on the cores
TIMED_ROWS = {1: 512, 64: 1024}
CHECKED_ROWS = 4096
CPU_LAYOUTS = ("nested", "flat", "whole-batch")
SECTION = "Exit layout: nested If vs flat chain"


def layouts(model: onnx.ModelProto, plan: ExitPlan, output: str) -> dict[str, onnx.ModelProto]:
    """The original model and ``plan`` written in each CPU layout."""
    return {"original": model, **{layout: apply_plan(model, plan, output, layout) for layout in CPU_LAYOUTS}}


def check_same(graphs: dict[str, onnx.ModelProto], inputs: dict[str, np.ndarray], output: str) -> float:
    """Exit rate of the rows; fails unless every layout gives them the nested graph's exits and outputs."""
    (nested, nested_exits), *others = (
        run_batched(make_session(graphs[layout], ["CPUExecutionProvider"], threads=1), inputs,
                    names=[output, EXIT_OUTPUT]) for layout in CPU_LAYOUTS)
    for layout, (values, exits) in zip(CPU_LAYOUTS[1:], others):
        if not (exits == nested_exits).all() or np.abs(values - nested).max() > 1e-5:
            raise AssertionError(f"the nested and {layout} graphs of one plan disagree")
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


def text_net(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A reference text classifier exported to ONNX; its corpus's calibration and test rows."""
    test = {key: values for key, values in reference_tokens("test", name).items() if key != "labels"}
    return export_hf_sequence_classifier(load_reference_model(name)), reference_tokens("calibration", name), test


def reference_net(calibration_rows: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    data = load_calibration()
    calibration = {"images": data["images"][:calibration_rows], "labels": data["labels"][:calibration_rows]}
    return onnx.load(str(ONNX_PATH)), calibration, {"images": data["images"][calibration_rows:]}


CASES = {"plan": "as planned", "no-exit": "none (thresholds +inf)",
         "every-cut": "none, an exit at every candidate cut"}


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| net | exits | rows leave | batch | original ms | nested | flat | whole-batch | flat / nested |",
             "|---|---|---|---|---|---|---|---|---|"]
    for net, figures in results.items():
        if "plan" not in figures["timings"]:
            lines.append(f"| {net} | 0 | no plan with exits certified | | | | | | |")
        for case, cases in figures["timings"].items():
            label = f"{CASES[case]} ({100 * figures['exit_rate']:.1f}%)" if case == "plan" else CASES[case]
            for batch, timing in cases.items():
                ratios = " | ".join(f"{timing[layout] / timing['original']:.3f}x" for layout in CPU_LAYOUTS)
                lines.append(f"| {net} | {figures[case]} | {label} | {batch} | {1e3 * timing['original']:.3f} "
                             f"| {ratios} | {timing['flat'] / timing['nested']:.3f} |")
    return lines


def summary(results: dict[str, dict]) -> list[str]:
    """Each other layout / nested per case and batch size: geometric mean and range over the nets."""
    others = CPU_LAYOUTS[1:]
    lines = ["| rows leave | batch | " + " | ".join(f"{layout} / nested, geometric mean (range)" for layout in others)
             + " | nets |", "|---|---|" + "---|" * len(others) + "---|"]
    for case, label in CASES.items():
        for batch in SECONDS:
            timed = [f["timings"][case][batch] for f in results.values() if case in f["timings"]]
            if not timed:
                continue
            cells = []
            for layout in others:
                ratios = [timing[layout] / timing["nested"] for timing in timed]
                cells.append(f"{np.exp(np.mean(np.log(ratios))):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
            lines.append(f"| {label} | {batch} | {' | '.join(cells)} | {len(timed)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", nargs="*", choices=list(ARCHITECTURES),
                        default=["resnet-basic", "convnext", "mobilenet-v3", "resnet-deep"])
    parser.add_argument("--text", nargs="*", choices=list(REFERENCES), default=["minilm6_rt"])
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
    for name in args.text:
        print(name, flush=True)
        results[name] = measure(*text_net(name))
    text = "\n".join([
        f"Command: `{' '.join(['python benchmarks/bench_exit_layout.py', *sys.argv[1:]])}`",
        f"Machine: {machine_description()}", "",
        "One certified plan per net (default budget), written in each CPU layout of `passes/graph/rewrite.py`; all "
        "give the same exits and outputs on the timed rows (checked). Latency compiled / original, onnxruntime CPU, "
        "one intra-op thread per session, the original and the layouts alternating in one process, median of 15 "
        "rounds; flat / nested below 1: the flat chain is faster. \"none\": the same exits with every threshold +inf, so "
        "every row crosses every boundary (the layout's own cost); \"every candidate cut\": an exit at each "
        "(cheapest pooling, thresholds +inf), as `bench_no_exit_overhead.py` builds them. Zoo nets trained as `bench_zoo.py` trains them "
        f"({args.epochs} epochs, {args.train_rows:,} rows), legacy export, checked and timed on the test split; the "
        "reference CNN on the calibration rows after those it was compiled on (checked on 4,096 rows, timed on 512 "
        "at batch 1 and 1,024 at batch 64); text references exported by `export_hf_sequence_classifier`, compiled on "
        "their committed calibration rows, checked and timed on their test rows.", "",
        *summary(results), "", *table(results)])
    print(text)
    write_section(SECTION, text)


if __name__ == "__main__":
    main()
