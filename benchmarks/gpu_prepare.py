"""Build, on this (CPU) machine, every graph that ``benchmarks/gpu_check.py`` measures on a lent GPU.

    python benchmarks/gpu_prepare.py [--out .gpu] [--models cnn text]

The GPU machine has a different torch and no Debian data, and device time is short, so nothing
is compiled there.  Written to ``--out`` (git-ignored; carried to the device over several calls,
see ``benchmarks/gpu_check.sh``), in ``cnn/`` and ``text/``:

- ``cnn_*.onnx``: the reference CNN as compiled by ``moco compile`` at its default 1% budget, and
  the graph it rewrote (``cnn_prepared.onnx``) with the certified plan (``cnn_plan.json``: the plan and
  the classifier output) for the device to lay out in any exit layout (``gpu_check.py --groups cycling``);
  its float16 variant (``moco optimize-memory --fp16``), and two no-exit graphs (thresholds +inf,
  rules run, no row leaves): one exit at the first cut and an exit at every candidate cut, beside
  the plain network they were built on (``cnn_plain.onnx``);
  ``cnn_test.npz``: 2,048 Fashion-MNIST test images and labels.
- ``wide_*.onnx``: the same no-exit graphs and the plain network for a 64/128/256 CNN, with the big weights stripped
  (latency depends on shapes, not weights; the check refills them with seeded noise).
- ``text_*.onnx``: the 6-block MiniLM Rotten Tomatoes reference, compiled at 1%, the same plan cut
  to its 1, 2 and 3 busiest exits (``text_top{k}``; the host sync per exit is the GPU's price),
  compiled and certified with at most 2 exits (``text_max2``),
  and its float16 variant; ``text_test.npz``: its committed test tokens.  To fit the device's transfer limit the
  word embeddings keep only the test rows' tokens (ids remapped: same outputs, checked here) and
  the original and compiled graphs read their weights from one shared ``text_weights.bin``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import external_data_helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_no_exit_overhead import closed_exits, net  # noqa: E402
from benchmarks.gpu_check import STRIPPED  # noqa: E402
from models.export_fashion_resnet import load_calibration  # noqa: E402
from models.fashion_mnist import load_split  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.importer import export_hf_sequence_classifier, import_model  # noqa: E402
from moco_compile.memory.optimize import optimize_memory  # noqa: E402
from moco_compile.passes.graph.index import all_graphs  # noqa: E402
from moco_compile.passes.graph.rewrite import apply_plan  # noqa: E402
from moco_compile.passes.planning.config import DEFAULT_EXIT_LAYOUT, PlannerConfig  # noqa: E402
from moco_compile.prepare import cut_points_of, model_for_plan  # noqa: E402

STRIP_BYTES = 1 << 16
TEST_ROWS = 2048
BUDGET = 0.01
SHARE_BYTES = 1 << 10
WORD_EMBEDDINGS = "word_embeddings.weight"


def strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the data of every initializer over 64 KiB (shapes and dtypes kept, marked for refilling)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for graph in all_graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.raw_data) > STRIP_BYTES:
                tensor.ClearField("raw_data")
                tensor.doc_string = STRIPPED
    return model


def no_exit_graphs(widths: tuple[int, ...], images: np.ndarray) -> dict[str, onnx.ModelProto]:
    imported = import_model(net(widths), example_input=torch.from_numpy(images[:2]))
    plan = closed_exits(imported, {imported.input_names[0]: images})
    return {"plain": imported.model,
            "closed_one": apply_plan(imported.model, replace(plan, exits=plan.exits[:1]), imported.output,
                                     DEFAULT_EXIT_LAYOUT),
            "closed_all": apply_plan(imported.model, plan, imported.output, DEFAULT_EXIT_LAYOUT)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument("--models", nargs="+", choices=("cnn", "text"), default=["cnn", "text"])
    args = parser.parse_args()
    for name in args.models:
        (args.out / name).mkdir(parents=True, exist_ok=True)
        {"cnn": prepare_cnn, "text": prepare_text}[name](args.out / name)


def prepare_cnn(out: Path) -> None:
    calibration = load_calibration()
    images, labels = load_split("test")
    np.savez_compressed(out / "cnn_test.npz", images=images[:TEST_ROWS], labels=labels[:TEST_ROWS])
    original = onnx.load("models/artifacts/fashion_resnet.onnx")
    compiled = compile(original, calibration, max_disagreement=BUDGET, measure_latency=False, show_progress=False)
    onnx.save(compiled.model, out / "cnn_compiled.onnx")
    prepared, output = model_for_plan(original, None, {"images": calibration["images"][:1]})
    onnx.save(prepared, out / "cnn_prepared.onnx")
    (out / "cnn_plan.json").write_text(json.dumps({"output": output, **compiled.plan.to_dict()}))
    onnx.save(optimize_memory(original, calibration, float16=True, max_accuracy_drop=0.5,
                              measure_latency=False).model, out / "cnn_fp16.onnx")
    for name, model in no_exit_graphs((16, 32, 64), calibration["images"][:256]).items():
        onnx.save(model, out / f"cnn_{name}.onnx")
    for name, model in no_exit_graphs((64, 128, 256), calibration["images"][:256]).items():
        onnx.save(strip_weights(model), out / f"wide_{name}.onnx")
    print(f"cnn: {len(compiled.plan.exits)} exits, {compiled.report['compute_reduction']:.1%} estimated", flush=True)


def prepare_text(out: Path) -> None:
    from models.text_classifier import load_reference_model, load_tokens

    text = export_hf_sequence_classifier(load_reference_model("minilm6_rt"))
    tokens, test = load_tokens("calibration", "rt"), load_tokens("test", "rt")
    compiled = compile(text, tokens, max_disagreement=BUDGET, measure_latency=False, show_progress=False)
    two_exits = compile(text, tokens, max_disagreement=BUDGET, measure_latency=False, show_progress=False,
                        planner_config=PlannerConfig(max_exits=2))
    gpu = compile(text, tokens, max_disagreement=BUDGET, measure_latency=False, show_progress=False,
                  target="cuda", serving_batch=64, allow_no_exit=True)  # priced for an H100 at batch 64: bucketed
    (out / "text_cuda_plan.json").write_text(json.dumps(gpu.plan_record()))
    half = optimize_memory(text, tokens, float16=True, max_accuracy_drop=0.5, measure_latency=False).model
    for name, result in (("default", compiled), ("max_exits=2", two_exits), ("--target cuda", gpu)):
        print(f"text {name}: {len(result.plan.exits)} exits, {result.report['compute_reduction']:.1%} estimated",
              flush=True)
    used = np.unique(test["input_ids"])
    graphs = {"original": text, "compiled": compiled.model, "max2": two_exits.model, "cuda": gpu.model, "fp16": half,
              **busiest_exits(text, tokens, compiled, counts=(1, 2, 3))}
    small = {name: pruned_vocabulary(model, used) for name, model in graphs.items()}
    small_test = {**test, "input_ids": np.searchsorted(used, test["input_ids"])}
    onnx.save(small.pop("fp16"), out / "text_fp16.onnx")
    save_sharing_weights(small, out, "text")
    np.savez_compressed(out / "text_test.npz", **small_test)
    check_same_outputs(text, test, out / "text_original.onnx", small_test)
    check_same_outputs(compiled.model, test, out / "text_compiled.onnx", small_test)


def busiest_exits(model: onnx.ModelProto, calibration: dict, compiled, counts: tuple[int, ...]) -> dict:
    """Graphs keeping only the ``k`` exits of the compiled plan that calibration rows took most often
    (thresholds unchanged: fewer rows leave, none that the full plan kept), for each ``k`` in ``counts``."""
    imported = import_model(model)
    cut_points_of(imported, {k: v[:256] for k, v in calibration.items() if k != "labels"}, 256)  # as compile does
    rates = np.array([item["exit_rate"] for item in compiled.report["exits"]])
    busiest = {k: [compiled.plan.exits[i] for i in sorted(np.argsort(-rates)[:k])] for k in counts}
    return {f"top{k}": apply_plan(imported.model, replace(compiled.plan, exits=exits), imported.output,
                                  compiled.exit_layout) for k, exits in busiest.items()}


def pruned_vocabulary(model: onnx.ModelProto, used: np.ndarray) -> onnx.ModelProto:
    """Keep only the word-embedding rows of the token ids in ``used`` (ids must be remapped to their
    position in ``used``): same outputs on those rows, a quarter of the file."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for graph in all_graphs(model.graph):
        for index, tensor in enumerate(graph.initializer):
            if tensor.name.endswith(WORD_EMBEDDINGS):
                graph.initializer[index].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor)[used], tensor.name))
    return model


def save_sharing_weights(models: dict[str, onnx.ModelProto], out: Path, prefix: str) -> None:
    """Write ``{prefix}_{name}.onnx`` files whose big weights live once in ``{prefix}_weights.bin``:
    a compiled graph keeps its original's tensors byte for byte, so both read the same bytes."""
    location = f"{prefix}_weights.bin"
    stored: dict[bytes, int] = {}
    with open(out / location, "wb") as weights:
        for name, model in models.items():
            for graph in all_graphs(model.graph):
                for tensor in graph.initializer:
                    if len(tensor.raw_data) < SHARE_BYTES:
                        continue
                    key = hashlib.sha1(tensor.raw_data).digest() + bytes([tensor.data_type])
                    if key not in stored:
                        stored[key] = weights.tell()
                        weights.write(tensor.raw_data)
                    external_data_helper.set_external_data(tensor, location, stored[key], len(tensor.raw_data))
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                    tensor.ClearField("raw_data")
            (out / f"{prefix}_{name}.onnx").write_bytes(model.SerializeToString())


def check_same_outputs(model: onnx.ModelProto, feed: dict, saved: Path, saved_feed: dict, rows: int = 128) -> None:
    """The saved (pruned, shared-weight) graph gives the in-memory graph's outputs on the test rows."""
    import onnxruntime as ort

    names = [i.name for i in model.graph.input]
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {k: feed[k][:rows] for k in names})
    got = ort.InferenceSession(str(saved)).run(None, {k: saved_feed[k][:rows] for k in names})
    for a, b in zip(expected, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    print(f"{saved.name}: same outputs as the in-memory graph on {rows} rows", flush=True)


if __name__ == "__main__":
    main()
