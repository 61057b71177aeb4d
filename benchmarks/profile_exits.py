"""Where a compiled graph's extra time goes: onnxruntime's profile, per operator type, original vs compiled.

    python benchmarks/profile_exits.py out/bench_zoo/convnext-legacy [--runs 2000] [--write]

Reads ``original.onnx`` and ``compiled.onnx`` from the folder (``bench_zoo.py --keep`` writes them),
runs each on test-split rows at batch 1 and 64 with onnxruntime's profiler on (CPU provider, default
optimisations) and prints, per operator type, the kernel time per run (nodes inside an If branch
included; the If's own time covers its branch, so it is listed apart) and the whole run's time.  It
also lists the fused and layout operators onnxruntime made of each graph (main graph and If branches),
to show whether a fusion is lost at an If boundary.  The profiler adds a little to every kernel, so read
differences, not absolute times.  ``--write`` puts the tables in the section "Model zoo: where the
time goes (<folder>)" of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import machine_description, write_section  # noqa: E402
from models.fashion_mnist import load_split  # noqa: E402
from models.zoo_export import model_inputs  # noqa: E402
from moco_compile.passes.graph.index import all_graphs  # noqa: E402
from moco_compile.runtime.latency import batches_of  # noqa: E402

GRAPHS = ("original", "compiled")
FUSED_DOMAINS = ("com.microsoft", "com.microsoft.nchwc")


def profile(path: Path, inputs: dict, batch: int, runs: int) -> tuple[Counter, float]:
    """Kernel microseconds per run by operator type, and microseconds per whole run."""
    options = ort.SessionOptions()
    options.enable_profiling, options.log_severity_level = True, 3
    with tempfile.TemporaryDirectory() as scratch:
        options.profile_file_prefix = str(Path(scratch) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        batches = batches_of(inputs, batch)
        for i in range(runs):
            session.run(None, batches[i % len(batches)])
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels: Counter = Counter()
    run_us = 0.0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kernels[event["args"]["op_name"]] += event["dur"] / runs
        elif event.get("cat") == "Session" and event["name"] == "model_run":
            run_us += event["dur"] / runs
    return kernels, run_us


def optimized_operators(path: Path) -> list[str]:
    """Fused and layout operators in onnxruntime's optimised graph, ``branch:`` before those in If branches."""
    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.optimized_model_filepath, options.log_severity_level = str(Path(scratch) / "optimized.onnx"), 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)

    return [("" if graph is model.graph else "branch:") + node.op_type
            for graph in all_graphs(model.graph) for node in graph.node if node.domain in FUSED_DOMAINS]


def tables(folder: Path, runs: int) -> str:
    names = [i.name for i in onnx.load(str(folder / "original.onnx"), load_external_data=False).graph.input]
    inputs = model_inputs(names, load_split("test")[0][:4096])
    lines = []
    for batch in (1, 64):
        count = runs if batch == 1 else max(runs // 16, 20)
        measured = {name: profile(folder / f"{name}.onnx", inputs, batch, count) for name in GRAPHS}
        (original, original_run), (compiled, compiled_run) = measured["original"], measured["compiled"]
        lines += [f"Batch {batch} ({count} profiled runs): whole run {original_run:.1f} us original, "
                  f"{compiled_run:.1f} us compiled ({compiled_run / original_run:.2f}x).", "",
                  "| operator | original us/run | compiled us/run | difference |", "|---|---|---|---|"]
        rows = sorted(set(original) | set(compiled) - {"If"}, key=lambda op: original[op] - compiled[op])
        lines += [f"| {op} | {original[op]:.1f} | {compiled[op]:.1f} | {compiled[op] - original[op]:+.1f} |"
                  for op in rows]
        lines += [f"| If (its branch, counted above) | | {compiled['If']:.1f} | |", ""]
    for name in GRAPHS:
        operators = Counter(optimized_operators(folder / f"{name}.onnx"))
        lines += [f"Fused and layout operators, {name}: {dict(operators)}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--runs", type=int, default=2000, help="profiled runs at batch 1 (batch 64: a 16th)")
    parser.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    args = parser.parse_args()
    text = tables(args.folder, args.runs)
    print(text)
    if args.write:
        write_section(f"Model zoo: where the time goes ({args.folder.name})",
                      f"Command: `python benchmarks/profile_exits.py {args.folder} --runs {args.runs} --write`\n"
                      f"Machine: {machine_description()}\n\n{text}")


if __name__ == "__main__":
    main()
