"""Benchmark: the model zoo trained briefly on Fashion-MNIST, both exporters, compiled by moco.

    python benchmarks/bench_zoo.py [--architectures convnext mlp] [--epochs 2] [--train-rows 20000]
                                   [--calibration-rows 5000] [--budget 0.01] [--keep out/bench_zoo]

Each architecture of ``models.zoo_export.ARCHITECTURES`` plus the basic-block ResNet of
``models.fashion_resnet`` (one block per stage) is trained from seed 0 for ``--epochs`` epochs on the
first ``--train-rows`` rows of the training part of Fashion-MNIST (AdamW, one-cycle), exported with the
legacy and the torch.export-based exporter, and compiled at ``--budget`` (95% confidence) on the
held-out calibration rows (never trained on).  On the 10,000-row test split: compute reduction (FLOPs
the rows cost in the compiled graph, rules included), exit rate and disagreement with the original
graph; latency compiled / original at batch 1 and 64 (onnxruntime CPU, both sessions alternating in
this process); wall time of ``moco_compile.compile``.  ``--keep`` saves each original and compiled
graph for profiling.  Writes the section "Model zoo" of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_fashion_resnet import latency_ratios, run_batched  # noqa: E402
from benchmarks.results import machine_description, write_section  # noqa: E402
from models.fashion_mnist import load_split, train_and_calibration_splits  # noqa: E402
from models.fashion_resnet import FashionResNet  # noqa: E402
from models.training import accuracy, fit  # noqa: E402
from models.zoo_export import ARCHITECTURES, EXPORTERS, export, input_names, model_inputs  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.constants import EXIT_OUTPUT  # noqa: E402
from moco_compile.errors import MocoError  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.prepare import cut_points_of  # noqa: E402
from moco_compile.runtime.session import make_session  # noqa: E402

BENCH_ARCHITECTURES = {"resnet-basic": lambda: FashionResNet((16, 32, 64), 1), **ARCHITECTURES}
LATENCY_SECONDS = (5.0, 8.0)


def adamw(module: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), weight_decay=0.05)


def trained(architecture: str, train: tuple[np.ndarray, np.ndarray], epochs: int,
            architectures: Mapping[str, Callable[[], torch.nn.Module]] = BENCH_ARCHITECTURES) -> torch.nn.Module:
    torch.manual_seed(0)
    module = architectures[architecture]()
    images, labels = train
    return fit(module, model_inputs(input_names(module), images), labels, epochs, adamw, max_lr=3e-3)


def candidate_cuts(model: onnx.ModelProto, names: list[str]) -> int:
    imported = import_model(model)
    return len(cut_points_of(imported, model_inputs(names, np.zeros((1, 1, 28, 28), np.float32)), 1)[1])


def no_exit_reason(certificate: dict) -> str:
    """The first clause of why a build has no exits."""
    reason = certificate.get("reason")  # absent when every plan with exits failed the test
    return reason.removeprefix("no exits: ").split(":")[0] if reason else "no plan with exits certified"


def measure(model: onnx.ModelProto, names: list[str], calibration: tuple[np.ndarray, np.ndarray],
            test_images: np.ndarray, budget: float, keep: Path | None) -> dict:
    """Compile ``model`` and measure the build on the test split (see the module docstring)."""
    images, labels = calibration
    started = time.perf_counter()
    try:
        result = compile(model, {**model_inputs(names, images), "labels": labels}, max_disagreement=budget,
                         allow_no_exit=True, measure_latency=False, show_progress=False)
    except MocoError as error:
        return {"error": str(error).splitlines()[0], "compile_s": time.perf_counter() - started}
    compile_s = time.perf_counter() - started
    test = model_inputs(names, test_images)
    full, = run_batched(make_session(model, ["CPUExecutionProvider"]), test, names=["logits"])
    logits, exits = run_batched(make_session(result.model, ["CPUExecutionProvider"]), test,
                                names=["logits", EXIT_OUTPUT])
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(keep / "original.onnx"))
        onnx.save(result.model, str(keep / "compiled.onnx"))
    latency = latency_ratios(model, result.model, test, LATENCY_SECONDS)
    return {"cuts": candidate_cuts(model, names), "exits": len(result.plan.exits),
            "mflops": result.plan.total_flops / 1e6,
            "compute_reduction": 1 - result.plan.row_flops(exits).mean() / result.plan.total_flops,
            "exit_rate": float((exits >= 0).mean()),
            "disagreement": float((logits.argmax(1) != full.argmax(1)).mean()),
            "note": "" if result.plan.exits else no_exit_reason(result.plan.certificate), "compile_s": compile_s,
            "latency_1": latency[1]["ratio"], "latency_64": latency[64]["ratio"],
            "original_ms_1": 1e3 * latency[1]["original"], "original_ms_64": 1e3 * latency[64]["original"]}


def table_row(architecture: str, exporter: str, accuracy_: float, figures: dict) -> str:
    if "error" in figures:
        return f"| {architecture} | {exporter} | {100 * accuracy_:.1f} | not compiled: {figures['error']} " \
               f"| | | | | | | {figures['compile_s']:.0f} | |"
    return (f"| {architecture} | {exporter} | {100 * accuracy_:.1f} | {figures['mflops']:.2f} | {figures['cuts']} "
            f"| {figures['exits']} | {100 * figures['compute_reduction']:.1f}% | {100 * figures['exit_rate']:.1f}% "
            f"| {100 * figures['disagreement']:.2f}% | {figures['latency_1']:.2f}x ({figures['original_ms_1']:.3f} ms) "
            f"| {figures['latency_64']:.2f}x ({figures['original_ms_64']:.2f} ms) | {figures['compile_s']:.0f} "
            f"| {figures['note']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architectures", nargs="+", choices=list(BENCH_ARCHITECTURES),
                        default=list(BENCH_ARCHITECTURES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-rows", type=int, default=20_000)
    parser.add_argument("--calibration-rows", type=int, default=5_000)
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--keep", type=Path, help="save each original and compiled graph under this folder")
    args = parser.parse_args()
    (train_x, train_y), (calibration_x, calibration_y) = train_and_calibration_splits()
    test_x, test_y = load_split("test")
    calibration = calibration_x[:args.calibration_rows], calibration_y[:args.calibration_rows]
    lines = []
    for architecture in args.architectures:
        started = time.perf_counter()
        module = trained(architecture, (train_x[:args.train_rows], train_y[:args.train_rows]), args.epochs)
        names = input_names(module)
        test_accuracy = accuracy(module, model_inputs(names, test_x), test_y)
        print(f"{architecture}: test accuracy {test_accuracy:.4f}, trained in {time.perf_counter() - started:.0f} s",
              flush=True)
        for exporter in EXPORTERS:
            keep = args.keep / f"{architecture}-{exporter}" if args.keep else None
            figures = measure(export(module, exporter), names, calibration, test_x, args.budget, keep)
            lines.append(table_row(architecture, exporter, test_accuracy, figures))
            print(lines[-1], flush=True)
    text = "\n".join([
        f"Command: `{' '.join(['python benchmarks/bench_zoo.py', *sys.argv[1:]])}`",
        f"Machine: {machine_description()}", "",
        f"Each architecture trained from seed 0 for {args.epochs} epochs on {args.train_rows:,} training rows "
        f"(AdamW, one-cycle to 3e-3), exported with both exporters and compiled at {args.budget:.1%} disagreement "
        f"/ 95% confidence on {args.calibration_rows:,} held-out calibration rows. Accuracy, compute reduction "
        "(FLOPs per row in the compiled graph, rules included), exit rate and disagreement with the original "
        "graph on the 10,000-row test split; latency compiled / original (original's time per batch in "
        "brackets), onnxruntime CPU, both sessions alternating in one process; compile: wall time of "
        "`moco_compile.compile` (calibration, planning, rewrite, verification).", "",
        "| model | exporter | accuracy | MFLOPs | cuts | exits | compute reduction | exit rate | disagreement "
        "| latency batch 1 | latency batch 64 | compile s | no exits because |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *lines])
    print(text)
    write_section("Model zoo", text)


if __name__ == "__main__":
    main()
