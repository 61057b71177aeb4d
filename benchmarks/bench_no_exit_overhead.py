"""Benchmark: what exits cost when no row takes them, on the reference CNN and a 4x wider one.

    python benchmarks/bench_no_exit_overhead.py [--widths 16 32 64 --widths 64 128 256]
    python benchmarks/bench_no_exit_overhead.py --zoo convnext mlp ...

Each net gets an exit at every candidate cut (what the reference plan at 1% opens), every threshold
+inf: rows run the rules and cross every If boundary but never leave, so compiled / original latency
is the price of the exits alone.  Latency depends on shapes, not weights: the 16/32/64 net is the
trained reference (`models/artifacts/fashion_resnet.pt`), wider ones are random-initialised
`FashionResNet`s (seed 0; training a 64/128/256 net takes about 16x the reference's compute).
Measured at batch 1 and 64 with onnxruntime's CPU provider, original and compiled alternating in
one process, at two optimisation levels: all (default; the NCHWc layout transformer on) and
extended (no layout transformer), which shows how much of the overhead is the layout stopping at
the If boundary (DESIGN.md).  Writes the section "No-exit overhead" of ``benchmarks/RESULTS.md``;
with ``--zoo``, the named ``models.zoo_export`` architectures instead (random-initialised, legacy
export), the section "No-exit overhead, model zoo": what an exit costs on nets of 0.2-8 MFLOPs, where
a fixed cost per exit and batch shows (``PlannerConfig.exit_fixed_cost``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import machine_description, write_section  # noqa: E402
from models.export_fashion_resnet import load_calibration, load_trained  # noqa: E402
from models.fashion_resnet import FashionResNet  # noqa: E402
from models.zoo_export import ARCHITECTURES, export, input_names, model_inputs  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.calibration.calibrate import cut_column  # noqa: E402
from moco_compile.passes.calibration.pooling import pooling_cost, variant_width, variants_for  # noqa: E402
from moco_compile.passes.calibration.rules import LinearScores  # noqa: E402
from moco_compile.passes.graph.rewrite import apply_plan  # noqa: E402
from moco_compile.passes.planning.config import DEFAULT_EXIT_LAYOUT  # noqa: E402
from moco_compile.passes.planning.types import Exit, ExitPlan  # noqa: E402
from moco_compile.prepare import cut_points_of  # noqa: E402
from moco_compile.runtime.latency import compare_latency  # noqa: E402

LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
REFERENCE_WIDTHS = (16, 32, 64)


def net(widths: tuple[int, ...]) -> torch.nn.Module:
    if widths == REFERENCE_WIDTHS:
        return load_trained()
    torch.manual_seed(0)
    return FashionResNet(widths).eval()


def closed_exits(imported, inputs: dict[str, np.ndarray]) -> ExitPlan:
    """A plan with an exit at every candidate cut: the cheapest pooling for its shape, a log-softmax rule,
    every class off."""
    _, cuts = cut_points_of(imported, {name: values[:64] for name, values in inputs.items()}, 64)
    classes = imported.num_classes
    exits = []
    for cut in cuts:
        pooling = variants_for(cut.shape)[0]
        width = variant_width(cut.shape, pooling)
        rule = LinearScores(np.zeros((width, classes), np.float32), np.zeros(classes, np.float32), "log_softmax")
        exits.append(Exit(cut, cut_column(cut), pooling, rule, np.full(classes, np.inf, np.float32),
                          pooling_cost(cut.shape, pooling) + rule.flops))
    return ExitPlan(exits, cuts[0].flops_before + cuts[0].flops_after)


def session(model, level: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure(imported, inputs: dict[str, np.ndarray], label: str) -> dict:
    """Original and compiled-with-closed-exits latency at both optimisation levels, batch 1 and 64."""
    plan = closed_exits(imported, inputs)
    compiled = apply_plan(imported.model, plan, imported.output, DEFAULT_EXIT_LAYOUT)
    results = {"exits": len(plan.exits), "mflops": plan.total_flops / 1e6}
    for level in LEVELS:
        sessions = {"original": session(imported.model, level), "compiled": session(compiled, level)}
        for batch, rows, seconds in ((1, 1000, 6.0), (64, None, 10.0)):
            timing = compare_latency(sessions, {name: values[:rows] for name, values in inputs.items()}, batch,
                                     min_seconds=seconds)
            results[(level, batch)] = timing
            print(label, level, batch, {k: f"{1e3 * v:.3f} ms" for k, v in timing.items()},
                  f"{timing['compiled'] / timing['original']:.3f}x", flush=True)
    return results


def zoo_net(architecture: str, images: np.ndarray):
    """A zoo architecture, random-initialised (seed 0), exported with the legacy exporter, and its inputs."""
    torch.manual_seed(0)
    module = ARCHITECTURES[architecture]().eval()
    return import_model(export(module, "legacy")), model_inputs(input_names(module), images)


def table(results: dict, name_of) -> list[str]:
    lines = ["| net | MFLOPs | exits | optimisation | batch | original ms | compiled ms | overhead | us per exit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for net, result in results.items():
        for level in LEVELS:
            for batch in (1, 64):
                timing = result[(level, batch)]
                extra = 1e6 * (timing["compiled"] - timing["original"]) / result["exits"]
                lines.append(f"| {name_of(net)} | {result['mflops']:.2f} | {result['exits']} | {level} | {batch} "
                             f"| {1e3 * timing['original']:.3f} | {1e3 * timing['compiled']:.3f} "
                             f"| {100 * (timing['compiled'] / timing['original'] - 1):+.1f}% | {extra:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs=3, action="append",
                        help="channels of the three stages (repeatable; default: 16 32 64 and 64 128 256)")
    parser.add_argument("--zoo", nargs="+", choices=list(ARCHITECTURES),
                        help="measure these zoo architectures instead (random-initialised, legacy export)")
    args = parser.parse_args()
    images = load_calibration()["images"][:4096]
    command = f"Command: `{' '.join(['python benchmarks/bench_no_exit_overhead.py', *sys.argv[1:]])}`"
    if args.zoo:
        results = {a: measure(*zoo_net(a, images), a) for a in args.zoo}
        text = "\n".join([command, f"Machine: {machine_description()}", "",
                          "An exit at every candidate cut of each zoo net, every threshold +inf (rules run, no row "
                          "leaves); random-initialised (seed 0), legacy export; compiled / original latency, same "
                          "process, alternating; us per exit: the difference per batch over the exits.", "",
                          *table(results, str)])
        print(text)
        write_section("No-exit overhead, model zoo", text)
        return
    nets = [tuple(w) for w in args.widths] if args.widths else [REFERENCE_WIDTHS, (64, 128, 256)]
    results = {}
    for widths in nets:  # the exporter names the input after forward's argument
        imported = import_model(net(widths), example_input=torch.from_numpy(images[:2]))
        results[widths] = measure(imported, {imported.input_names[0]: images}, str(widths))
    text = "\n".join([command, f"Machine: {machine_description()}", "",
                      "An exit at every candidate cut, every threshold +inf (rules run, no row leaves); compiled / "
                      "original latency, same process, alternating. The 16/32/64 net is the trained reference, wider "
                      "nets are random-initialised (latency depends on shapes, not weights).", "",
                      *table(results, lambda widths: "/".join(map(str, widths)))])
    print(text)
    write_section("No-exit overhead", text)


if __name__ == "__main__":
    main()
