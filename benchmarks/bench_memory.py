"""Benchmark: memory optimisation alone and composed with early exits.

Run::

    python benchmarks/bench_memory.py [--models cnn minilm6_rt] [--budget 0.01]

For the reference CNN (Fashion-MNIST, calibration file shipped, test split from Debian's
``dataset-fashion-mnist``) and the 6-block text reference (Rotten Tomatoes): build float16,
int8 dynamic and int8 static variants with ``moco optimize-memory``'s passes (each validated on
its own held-out calibration rows), compile exits on the float32 model and on the int8 models
(quantize first, then compile: exits certified on the int8 network), then run the test split
through every variant in one process: weights' bytes, peak activation memory at batch 64
(liveness estimate; measured in a fresh process, default session), accuracy, disagreement with
the float32 original, latency at batch 1 and 64 (sessions alternate passes over the same
batches, median of ``--rounds``; ratios to float32).  Writes the section "Memory optimisation"
of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import machine_description, write_section  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.calibration_data import load_npz  # noqa: E402
from moco_compile.errors import MocoError  # noqa: E402
from moco_compile.memory.optimize import optimize_memory  # noqa: E402
from moco_compile.passes.graph.flops import measure_shapes  # noqa: E402
from moco_compile.passes.graph.verify import VerificationError  # noqa: E402
from moco_compile.passes.memory.liveness import feed_shapes, liveness, weight_bytes  # noqa: E402
from moco_compile.runtime.latency import compare_passes  # noqa: E402
from moco_compile.runtime.memory.peak import measure_peak  # noqa: E402
from moco_compile.runtime.session import make_session  # noqa: E402

SECTION = "Memory optimisation"
REUSED_EXITS = "int8 dynamic + float32 build's exits"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def cnn_data():
    from models.fashion_mnist import load_split

    calibration = load_npz(Path(__file__).resolve().parents[1] / "models/artifacts/fashion_calib.npz")
    images, labels = load_split("test")
    return onnx.load("models/artifacts/fashion_resnet.onnx"), calibration, {"images": images}, labels


def text_data(reference: str):
    from models.text_classifier import REFERENCES, load_reference_model, load_tokens
    from moco_compile.importer import export_hf_sequence_classifier

    corpus = REFERENCES[reference].corpus.name
    model = export_hf_sequence_classifier(load_reference_model(reference))
    calibration, test = load_tokens("calibration", corpus), load_tokens("test", corpus)
    return model, calibration, {k: test[k] for k in TEXT_INPUTS}, test["labels"]


def batches(inputs: dict[str, np.ndarray], size: int, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Consecutive batches; text batches trimmed to their longest row (dynamic padding)."""
    rows = len(next(iter(inputs.values())))
    out = []
    for start in range(0, rows if limit is None else min(rows, limit), size):
        batch = {k: v[start:start + size] for k, v in inputs.items()}
        if "attention_mask" in batch:
            length = max(int(batch["attention_mask"].sum(1).max()), 1)
            batch = {k: v[:, :length] for k, v in batch.items()}
        out.append(batch)
    return out


def variants(model, calibration, budget: float, log) -> dict[str, onnx.ModelProto]:
    built = {"float32": model}
    for name, options in (("float16", dict(float16=True)), ("int8 dynamic", dict(int8="dynamic")),
                          ("int8 static", dict(int8="static"))):
        started = time.perf_counter()
        built[name] = optimize_memory(model, calibration, max_accuracy_drop=0.5, measure_latency=False,
                                      **options).model
        log(f"{name}: {time.perf_counter() - started:.0f} s")
    float_build = None
    for base in ("float32", "int8 dynamic", "int8 static"):
        started = time.perf_counter()
        try:
            result = compile(built[base], calibration, max_disagreement=budget, measure_latency=False,
                             show_progress=False, allow_no_exit=True)
        except VerificationError as refused:  # dynamic int8: a row's output depends on its batch
            log(f"{base} + exits: refused by verification: {refused}")
            continue
        built[f"{base} + exits" if base != "float32" else "exits"] = result.model
        log(f"{base} + exits: compile {time.perf_counter() - started:.0f} s, "
            f"{len(result.plan.exits)} exits, {result.report['compute_reduction']:.1%} estimated")
        if base == "float32":
            float_build = result
    if float_build is not None and "int8 dynamic + exits" not in built:  # the other order: the float32 build's exits, not re-certified
        try:
            built[REUSED_EXITS] = optimize_memory(model, calibration, int8="dynamic", build=float_build,
                                                  max_accuracy_drop=0.5, measure_latency=False).model
        except MocoError as failed:  # e.g. a plan whose cuts the optimised model no longer has
            log(f"{REUSED_EXITS}: failed: {failed}")
    return built


def measure(built, test_inputs, labels, rounds: int, output: str) -> list[dict]:
    sessions = {name: make_session(model) for name, model in built.items()}
    big = batches(test_inputs, 64)
    single = batches(test_inputs, 1, limit=300)
    predictions = {name: np.concatenate([s.run([output], b)[0] for b in big]).argmax(1)
                   for name, s in sessions.items()}
    seconds64 = {k: float(np.median(v)) for k, v in compare_passes(sessions, big, rounds).items()}
    seconds1 = {k: float(np.median(v)) for k, v in compare_passes(sessions, single, rounds).items()}
    reference = predictions["float32"]
    feed = big[len(big) // 2]
    rows = []
    for name, model in built.items():
        rows.append({
            "variant": name, "weights": weight_bytes(model),
            "peak_estimated": liveness(model, feed_shapes(feed), measure_shapes(model, feed)).peak_bytes,
            "peak_measured": measure_peak(model.SerializeToString(), feed, default_session=True).run_bytes,
            "accuracy": float((predictions[name] == labels).mean()),
            "disagreement": float((predictions[name] != reference).mean()),
            "latency1": seconds1[name] / seconds1["float32"], "latency64": seconds64[name] / seconds64["float32"],
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | weights (MiB) | vs fp32 | peak b=64 est / measured (MiB) | accuracy | disagreement "
             "| latency b=1 | latency b=64 |", "|---|---|---|---|---|---|---|---|"]
    base = rows[0]["weights"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['weights'] / 2**20:.2f} | {base / r['weights']:.2f}x | "
                     f"{r['peak_estimated'] / 2**20:.1f} / {r['peak_measured'] / 2**20:.1f} | {r['accuracy']:.2%} | "
                     f"{r['disagreement']:.2%} | {r['latency1']:.2f}x | {r['latency64']:.2f}x |")
    return "\n".join(lines)


LEGEND = ("Latency: ratio to float32 in one process, sessions alternating passes over the same batches (text: "
          "each batch padded to its longest row). Peak: activations at batch 64, estimated by liveness analysis "
          "(for graphs with exits: every row continuing) and measured in a fresh process (default session, arena "
          "on). `+ exits`: the variant compiled by moco, exits certified on that variant's own activations. "
          f"`{REUSED_EXITS}`: `moco optimize-memory BUILD --int8 dynamic`, the float32 build's exits on the int8 "
          "network (measured here, not certified). Variants are built with `--max-accuracy-drop 0.5` so that "
          "every figure shows; moco's default (0.005) rejects the ones that lose more.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "minilm6_rt"])
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for name in args.models:
        def log(message: str, name=name) -> None:
            print(f"[{name}] {message}", flush=True)

        model, calibration, test_inputs, labels = cnn_data() if name == "cnn" else text_data(name)
        from moco_compile.importer import classifier_output

        built = variants(model, calibration, args.budget, log)
        rows = measure(built, test_inputs, labels, args.rounds, classifier_output(model, None))
        print(table(rows), flush=True)
        refused = [r for r in ("int8 dynamic + exits", "int8 static + exits", REUSED_EXITS) if r not in built]
        reasons = {"int8 dynamic + exits": "moco's verification refuses it: dynamic int8 sets activation ranges "
                   "per batch, so a row's output depends on the rows beside it",
                   "int8 static + exits": "moco's verification refuses it: the compiled graph's full-network rows "
                   "differ from the int8 model's, which alone is batch-independent; onnxruntime runs the quantized "
                   "operators differently inside the exits' If branches",
                   REUSED_EXITS: "failed, see the benchmark's log"}
        note = ("\n\nNot built: " + "; ".join(f"{r} ({reasons[r]})" for r in refused) + ".") if refused else ""
        write_section(f"{SECTION}: {name}", f"Command: `python benchmarks/bench_memory.py --models {name}`\n\n"
                      f"Machine: {machine_description()} (CPU execution provider). {len(labels):,} test rows, "
                      f"exits at a {args.budget:.0%} budget.\n\n{table(rows)}{note}\n\n{LEGEND}")


if __name__ == "__main__":
    main()
