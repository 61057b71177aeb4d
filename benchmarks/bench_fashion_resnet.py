"""Benchmark: the reference CNN compiled by moco, measured on the full Fashion-MNIST test split.

Run (needs Debian's dataset-fashion-mnist for the 10,000 test images)::

    python benchmarks/bench_fashion_resnet.py [--budgets 0.005 0.0075 0.01 0.02]

Compiles on the 10,000 held-out calibration images, then on the 10,000 test
images reports compute reduction, accuracy before/after, disagreement, and
onnxruntime latency at batch 1 and 64 of compiled vs original in the same
process (ratios), plus the overhead of a compiled graph in which no row exits, and the build for
batch-1 serving (``--serving-batch 1``) at batch 1 beside the default build.
Writes the section "Reference CNN" of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx.utils import Extractor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import machine_description, write_section  # noqa: E402
from models.export_fashion_resnet import ONNX_PATH, load_calibration  # noqa: E402
from models.fashion_mnist import load_split  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.graph.rewrite import apply_plan  # noqa: E402
from moco_compile.passes.planning.config import PlannerConfig  # noqa: E402
from moco_compile.runtime.latency import compare_latency  # noqa: E402
from moco_compile.runtime.session import make_session  # noqa: E402


def _as_inputs(inputs: np.ndarray | Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """A bare array is the reference CNN's ``images`` input."""
    return {"images": inputs} if isinstance(inputs, np.ndarray) else inputs


def run_batched(session, inputs: np.ndarray | Mapping[str, np.ndarray], batch: int = 64,
                names: list[str] | None = None) -> list[np.ndarray]:
    """``session``'s outputs (``names``, default all) on every row of ``inputs``, run ``batch`` rows at a time."""
    inputs = _as_inputs(inputs)
    rows = len(next(iter(inputs.values())))
    parts = [session.run(names, {name: values[s:s + batch] for name, values in inputs.items()})
             for s in range(0, rows, batch)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def latency_ratios(original, compiled, inputs: np.ndarray | Mapping[str, np.ndarray],
                   seconds: tuple[float, float] = (8.0, 15.0)) -> dict[int, dict[str, float]]:
    """Seconds per batch of 1 (on 2,000 rows) and of 64 rows, original and compiled alternating in this
    process for about ``seconds`` per batch size, and compiled / original."""
    inputs = _as_inputs(inputs)
    sessions = {"original": make_session(original, ["CPUExecutionProvider"]),
                "compiled": make_session(compiled, ["CPUExecutionProvider"])}
    result = {}
    for batch, rows, limit in ((1, 2000, seconds[0]), (64, None, seconds[1])):
        timing = compare_latency(sessions, {name: values[:rows] for name, values in inputs.items()}, batch,
                                 min_seconds=limit)
        result[batch] = {**timing, "ratio": timing["compiled"] / timing["original"]}
    return result


def prefix_ceiling(original, plan, exits: np.ndarray, images: np.ndarray, seconds: float = 10.0) -> dict:
    """What batch 1 could realize with exits that cost nothing: the original cut at each exit (onnx's
    Extractor), timed at batch 1 against the whole model in this process; a row that leaves at exit k
    costs prefix k's time.  Returns each prefix's share of the time and of the FLOPs, and the ideal
    time ratio and its realized / FLOPs reduction on the rows' ``exits``."""
    extractor = Extractor(onnx.shape_inference.infer_shapes(original))
    sessions = {"original": make_session(original, ["CPUExecutionProvider"])}
    for e in plan.exits:
        sessions[e.cut.tensor] = make_session(extractor.extract_model(["images"], [e.cut.tensor]),
                                              ["CPUExecutionProvider"])
    timing = compare_latency(sessions, {"images": images[:2000]}, 1, min_seconds=seconds)
    time_share = np.array([timing[e.cut.tensor] / timing["original"] for e in plan.exits] + [1.0])
    flops_share = np.array([e.cut.flops_before / plan.total_flops for e in plan.exits] + [1.0])
    taken = np.where(exits < 0, len(plan.exits), exits)
    ideal, flops = time_share[taken].mean(), flops_share[taken].mean()
    return {"time_share": time_share[:-1], "flops_share": flops_share[:-1], "ratio": ideal,
            "realized_over_flops": (1 - ideal) / (1 - flops)}


def batch1_build(original, default_model, calibration, images: np.ndarray, full_predictions: np.ndarray,
                 labels: np.ndarray, budget: float) -> dict:
    """The build for batch-1 serving (exits priced on this machine at batch 1, whole-batch layout) at
    ``budget``: its plan's figures on the test split, and batch-1 seconds of the original, the default
    build and it, timed together."""
    result = compile(ONNX_PATH, calibration, max_disagreement=budget, measure_latency=False, serving_batch=1,
                     planner_config=PlannerConfig(exit_layout="whole-batch"))
    session = make_session(result.model, ["CPUExecutionProvider"])
    logits, exits = run_batched(session, images)
    predictions = logits.argmax(1)
    sessions = {name: make_session(model, ["CPUExecutionProvider"]) for name, model in
                (("original", original), ("default build", default_model), ("batch-1 build", result.model))}
    pricing = result.report["target"]["priced_from"]
    return {"exits": len(result.plan.exits),
            "compute_reduction": 1 - result.plan.row_flops(exits).mean() / result.plan.total_flops,
            "disagreement": float((predictions != full_predictions).mean()),
            "accuracy_change": float((predictions == labels).mean() - (full_predictions == labels).mean()),
            "exit_us": 1e6 * pricing["exit_fixed_seconds"],
            "exit_fixed_cost": result.report["target"]["exit_fixed_cost"],
            "seconds": compare_latency(sessions, {"images": images[:2000]}, 1, min_seconds=30.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.005, 0.0075, 0.01, 0.02])
    parser.add_argument("--latency-budget", type=float, default=0.01)
    args = parser.parse_args()
    calibration = load_calibration()
    test_images, test_labels = load_split("test")
    original = import_model(ONNX_PATH).model
    original_session = make_session(original, ["CPUExecutionProvider"])
    full_logits, = run_batched(original_session, test_images)
    full_predictions = full_logits.argmax(1)
    accuracy_before = float((full_predictions == test_labels).mean())

    rows, latency, compiled_for_latency, exits_for_latency = [], None, None, None
    for budget in args.budgets:
        result = compile(ONNX_PATH, calibration, max_disagreement=budget, measure_latency=False)
        session = make_session(result.model, ["CPUExecutionProvider"])
        logits, exits = run_batched(session, test_images)
        predictions = logits.argmax(1)
        flops = result.plan.row_flops(exits)
        rows.append({
            "budget": budget, "exits": len(result.plan.exits),
            "compute_reduction": 1 - flops.mean() / result.plan.total_flops,
            "exit_rate": float((exits >= 0).mean()),
            "disagreement": float((predictions != full_predictions).mean()),
            "accuracy_after": float((predictions == test_labels).mean()),
            "certified_p": result.plan.certificate["p_value"],
        })
        print(rows[-1], flush=True)
        if budget == args.latency_budget:
            compiled_for_latency, exits_for_latency = result, exits
    if compiled_for_latency is not None:
        result, exits = compiled_for_latency, exits_for_latency
    latency = latency_ratios(original, result.model, test_images)
    ceiling = prefix_ceiling(original, result.plan, exits, test_images)
    closed = [replace(e, thresholds=np.full_like(e.thresholds, np.inf)) for e in result.plan.exits]
    overhead = latency_ratios(original, apply_plan(original, replace(result.plan, exits=closed), "logits",
                                                   result.exit_layout), test_images)
    chosen = next(r for r in rows if r["budget"] == result.plan.certificate["max_disagreement"])
    ideal = chosen["compute_reduction"]
    batch1 = batch1_build(original, result.model, calibration, test_images, full_predictions, test_labels,
                          result.plan.certificate["max_disagreement"])

    lines = [
        "Command: `python benchmarks/bench_fashion_resnet.py`",
        f"Machine: {machine_description()}",
        "",
        "Model: `models/artifacts/fashion_resnet.onnx` (ResNet-14 style, 16/32/64 channels, "
        f"{result.plan.total_flops / 1e6:.1f} MFLOPs per image); calibration: the 10,000 held-out "
        "training images (`models/artifacts/fashion_calib.npz`); evaluation: the official 10,000-image "
        "test split, which moco never saw. Confidence 95%.",
        "",
        f"Full model test accuracy: {100 * accuracy_before:.2f}%",
        "",
        "| budget (max disagreement) | exits | compute reduction | rows exiting | disagreement | "
        "accuracy after | accuracy change |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {100 * r['budget']:.2g}% | {r['exits']} | {100 * r['compute_reduction']:.1f}% | "
                     f"{100 * r['exit_rate']:.1f}% | {100 * r['disagreement']:.2f}% | "
                     f"{100 * r['accuracy_after']:.2f}% | "
                     f"{100 * (r['accuracy_after'] - accuracy_before):+.2f} pp |")
    lines += [
        "",
        f"Latency (onnxruntime CPU, same process, compiled at budget {100 * result.plan.certificate['max_disagreement']:.1f}%):",
        "",
        "| batch | original ms | compiled ms | compiled / original | realized reduction | "
        "realized / FLOPs reduction |",
        "|---|---|---|---|---|---|",
    ]
    for batch, timing in latency.items():
        realized = 1 - timing["ratio"]
        lines.append(f"| {batch} | {1e3 * timing['original']:.3f} | {1e3 * timing['compiled']:.3f} | "
                     f"{timing['ratio']:.3f} | {100 * realized:.1f}% | {realized / ideal:.2f} |")
    shares = ", ".join(f"{e.cut.tensor} {100 * t:.0f}% of the time ({100 * f:.0f}% of the FLOPs)"
                       for e, t, f in zip(result.plan.exits, ceiling["time_share"], ceiling["flops_share"]))
    lines += ["", f"Batch 1 with exits that cost nothing (the original cut at each exit, timed at batch 1 against the "
              f"whole model; a row pays the prefix up to its exit): {shares}. On the test split's exits that is "
              f"{ceiling['ratio']:.3f} of the original's time, realized / FLOPs reduction "
              f"{ceiling['realized_over_flops']:.2f}: what the exits' own nodes leave to gain at batch 1."]
    lines += ["", f"Built for batch-1 serving (`moco compile --serving-batch 1`: exits priced by timing this model and "
              f"closed exits at batch 1 on this machine, {batch1['exit_us']:.1f} us per exit = "
              f"{batch1['exit_fixed_cost'] / 1e6:.2f}M FLOP-equivalents against 0.25M by default; whole-batch layout), "
              f"same budget: {batch1['exits']} exit{'' if batch1['exits'] == 1 else 's'}, "
              f"{100 * batch1['compute_reduction']:.1f}% compute reduction, "
              f"{100 * batch1['disagreement']:.2f}% disagreement, accuracy {100 * batch1['accuracy_change']:+.2f} pp. "
              "Batch 1 in one process (2,000 test rows):", "",
              "| graph | ms | / original | realized / FLOPs reduction |", "|---|---|---|---|"]
    for name, reduction in (("original", None), ("default build", ideal),
                            ("batch-1 build", batch1["compute_reduction"])):
        ratio = batch1["seconds"][name] / batch1["seconds"]["original"]
        lines.append(f"| {name} | {1e3 * batch1['seconds'][name]:.3f} | {ratio:.3f} | "
                     + ("-" if reduction is None else f"{(1 - ratio) / reduction:.2f}") + " |")
    lines += ["", "Overhead when no row exits (all thresholds +inf, same exits and Ifs):", "",
              "| batch | original ms | compiled, no exits ms | ratio |", "|---|---|---|---|"]
    for batch, timing in overhead.items():
        lines.append(f"| {batch} | {1e3 * timing['original']:.3f} | {1e3 * timing['compiled']:.3f} | "
                     f"{timing['ratio']:.3f} |")
    write_section("Reference CNN (Fashion-MNIST)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
