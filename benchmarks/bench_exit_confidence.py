"""Benchmark: exited rows' probabilities with and without confidence scales, vs the full model's.

Run (needs Debian's dataset-fashion-mnist)::

    python benchmarks/bench_exit_confidence.py [--budget 0.01]

Compiles two networks on the 10,000 held-out calibration images: the reference CNN (its output is
logits) and the same network ending in ``Softmax(logits / 4)`` (a softmax-ending model whose
probabilities are soft, as an underconfident or label-smoothed network's are; constructed here).
On the Fashion-MNIST test split, for the rows that exit early: mean top probability and expected
calibration error (ECE, 15 bins, against the labels) of the compiled graph as built (confidence
scales), of the same plan built without scales (exited rows carry the softmax of the exit's
margins, as before), and of the full model on the same rows; and the mean gap between a row's top
probability and the full model's probability of that class.  Writes the section "Exited rows'
probabilities (reference CNN)" of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from scipy.special import softmax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_fashion_resnet import run_batched  # noqa: E402
from benchmarks.results import machine_description, write_section  # noqa: E402
from models.export_fashion_resnet import ONNX_PATH, load_calibration  # noqa: E402
from models.fashion_mnist import load_split  # noqa: E402
from models.onnx_heads import with_soft_probabilities  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.calibration.exit_confidence import expected_calibration_error  # noqa: E402
from moco_compile.passes.graph.rewrite import apply_plan  # noqa: E402
from moco_compile.runtime.session import make_session  # noqa: E402

SOFTNESS = 4.0


def run(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    return run_batched(make_session(model, ["CPUExecutionProvider"]), images)


def as_probabilities(values: np.ndarray, logits: bool) -> np.ndarray:
    return softmax(values.astype(np.float64), axis=1) if logits else values.astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=float, default=0.01)
    args = parser.parse_args()
    calibration = load_calibration()
    images, labels = load_split("test")
    reference = import_model(ONNX_PATH).model
    rows = []
    soft = with_soft_probabilities(reference, SOFTNESS)
    for name, model, logits in (("reference CNN (logits)", reference, True),
                                (f"reference CNN, Softmax(logits / {SOFTNESS:g})", soft, False)):
        result = compile(model, calibration, max_disagreement=args.budget, measure_latency=False,
                         show_progress=False)
        output = result.model.graph.output[0].name
        unscaled = apply_plan(import_model(model).model, replace(result.plan, exits=[
            replace(e, confidence_scale=None) for e in result.plan.exits]), output, result.exit_layout)
        full = as_probabilities(run(model, images)[0], logits)
        scaled_values, exits = run(result.model, images)
        plain_values, plain_exits = run(unscaled, images)
        assert (exits == plain_exits).all()
        exited = exits >= 0
        full_top, full_class = full[exited].max(axis=1), full[exited].argmax(axis=1)
        row = {"model": name, "scales": [round(e.confidence_scale, 3) for e in result.plan.exits],
               "exit_rate": float(exited.mean()), "full_top": float(full_top.mean()),
               "full_ece": expected_calibration_error(full_top, full_class == labels[exited])}
        for key, values in (("scaled", scaled_values), ("plain", plain_values)):
            probabilities = as_probabilities(values, logits)[exited]
            top, cls = probabilities.max(axis=1), probabilities.argmax(axis=1)
            row[f"{key}_top"] = float(top.mean())
            row[f"{key}_ece"] = expected_calibration_error(top, cls == labels[exited])
            row[f"{key}_gap"] = float(np.abs(top - full[exited][np.arange(len(cls)), cls]).mean())
        rows.append(row)
        print(row, flush=True)

    lines = [
        f"Command: `python benchmarks/bench_exit_confidence.py --budget {args.budget:g}`",
        f"Machine: {machine_description()}",
        "",
        "Calibration: the 10,000 held-out training images; evaluation: the 10,000 test images, rows that "
        f"exit early (budget {100 * args.budget:g}%). Top probability: of the graph's output (softmax of "
        "it for the logits model); ECE: 15 equal-width bins, against the labels; gap: mean |top probability "
        "- the full model's probability of that class|. \"margins\": the same plan built without confidence "
        "scales (exited rows carry the softmax of the exit's margins, as before); \"scaled\": as compiled. "
        f"The second network is the reference one ending in `Softmax(logits / {SOFTNESS:g})` (constructed "
        "here: a softmax-ending model with soft probabilities, as the issue measured).",
        "",
        "| model | scale per exit | rows exiting | mean top p: full model | margins | scaled | "
        "ECE: full model | margins | scaled | gap: margins | scaled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {', '.join(f'{s:g}' for s in r['scales'])} | {100 * r['exit_rate']:.1f}% | "
                     f"{r['full_top']:.3f} | {r['plain_top']:.3f} | {r['scaled_top']:.3f} | {r['full_ece']:.3f} | "
                     f"{r['plain_ece']:.3f} | {r['scaled_ece']:.3f} | {r['plain_gap']:.3f} | {r['scaled_gap']:.3f} |")
    write_section("Exited rows' probabilities (reference CNN)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
