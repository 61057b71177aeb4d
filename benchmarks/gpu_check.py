"""Measure moco's compiled graphs on a GPU with onnxruntime-gpu: parity with the CPU, latency, the
price of each exit's host sync, float16, TensorRT and CUDA Graphs; and early exits on the model shapes
people serve (groups ``served`` and ``cycling``, ``benchmarks/bench_served_shapes.py``).

On a lent GPU machine (``benchmarks/gpu_check.sh`` installs onnxruntime-gpu and runs this)::

    python benchmarks/gpu_check.py --artefacts .gpu --out $OUT [--groups served cycling cnn no_exit text]

A dry run here: ``MOCO_GPU_CHECK_PROVIDER=CPUExecutionProvider python benchmarks/gpu_check.py --groups served
cycling --small --out /tmp/served`` (``--small``: the served shapes at a fraction of their widths).

Back here, to write the section "GPU (CUDA)" of ``benchmarks/RESULTS.md``::

    python benchmarks/gpu_check.py --record gpu_check_*.json

The graphs come from ``benchmarks/gpu_prepare.py``.  Every step records its error instead of
stopping the run, and the JSON is rewritten after each step, so a run cut short still reports.
Latency: ``session.run`` with host arrays in and out (what a drop-in user pays, copies included),
compiled and original alternating in one process (``runtime.latency.compare_latency``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_served_shapes import LAYOUTS, Settings, cycling_steps, served_steps  # noqa: E402
from benchmarks.gpu_common import ACCELERATOR, RunAdapter, session  # noqa: E402
from moco_compile.constants import EXIT_OUTPUT, FLOPS_ORIGINAL_KEY, STAGE_FLOPS_KEY  # noqa: E402
from moco_compile.passes.graph.index import all_graphs, all_nodes  # noqa: E402
from moco_compile.runtime.latency import compare_latency  # noqa: E402
from moco_compile.runtime.session import CPU, CUDA, ExitSession, ExitStatistics, TENSORRT  # noqa: E402

STRIPPED = "moco-gpu-check: stripped, refill with noise"  # benchmarks/gpu_prepare.py marks big weights so
BATCHES = (1, 64, 256)
SECTION = "GPU (CUDA)"
CNN_OUTPUT = "logits"


def refilled(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Seeded noise in place of the weights ``gpu_prepare.strip_weights`` dropped."""
    rng = np.random.default_rng(seed)
    for graph in all_graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.doc_string == STRIPPED:
                values = rng.normal(0, 0.02, tuple(tensor.dims)).astype(np.float32)
                tensor.raw_data = values.tobytes()
                tensor.doc_string = ""
    return model


def model_source(path: Path) -> str | bytes:
    """The file's path (its external weights load beside it), or its bytes with stripped weights refilled."""
    model = onnx.load(path, load_external_data=False)
    if any(t.doc_string == STRIPPED for graph in all_graphs(model.graph) for t in graph.initializer):
        return refilled(model).SerializeToString()
    return str(path)


def run_batches(sess: ort.InferenceSession, feed: dict[str, np.ndarray], size: int = 256) -> dict[str, np.ndarray]:
    rows = len(next(iter(feed.values())))
    parts = [dict(zip([o.name for o in sess.get_outputs()], sess.run(None, text_trimmed(
        {k: v[i:i + size] for k, v in feed.items()})))) for i in range(0, rows, size)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def text_trimmed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Text batches padded to their longest row (dynamic padding); other inputs unchanged."""
    if "attention_mask" not in batch:
        return batch
    length = max(int(batch["attention_mask"].sum(1).max()), 1)
    return {k: v[:, :length] for k, v in batch.items()}


def latency(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray],
            batches=BATCHES, seconds: float = 2.0) -> dict[str, dict[str, float]]:
    """Median ms per batch of each session, per batch size (text rows trimmed per batch)."""
    out = {}
    for size in batches:
        rows = {k: v[:max(200, size * 8)] for k, v in feed.items()}
        if "attention_mask" in feed:  # compare_latency cannot trim per batch: use rows of one length band
            rows = text_trimmed(rows)
        timing = compare_latency(sessions, rows, size, min_seconds=seconds)
        out[str(size)] = {name: 1e3 * value for name, value in timing.items()}
    return out


def exit_count(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "If" for node in all_nodes(model.graph))


def parity(name: str, model: str | bytes, feed: dict[str, np.ndarray], output: str, **cuda_options) -> dict:
    """CPU vs CUDA on the same rows: exits identical, full-network rows within relative tolerance."""
    cpu = run_batches(session(model, CPU), feed)
    gpu = run_batches(session(model, ACCELERATOR, **cuda_options), feed)
    full = np.ones(len(cpu[output]), bool)
    result = {"rows": int(len(full))}
    if EXIT_OUTPUT in cpu:
        result["exit_mismatches"] = int((cpu[EXIT_OUTPUT] != gpu[EXIT_OUTPUT]).sum())
        full = (cpu[EXIT_OUTPUT] == -1) & (gpu[EXIT_OUTPUT] == -1)
        result["full_rows"] = int(full.sum())
    a, b = cpu[output][full], gpu[output][full]
    scale = np.maximum(np.abs(a).max(axis=1), 1e-6)
    result["max_relative_difference"] = float((np.abs(a - b).max(axis=1) / scale).max()) if len(a) else 0.0
    result["class_mismatches"] = int((cpu[output].argmax(1) != gpu[output].argmax(1)).sum())
    print(name, result, flush=True)
    return result


def accuracy_on_gpu(models: dict[str, Path], feed: dict[str, np.ndarray], labels: np.ndarray, output: str) -> dict:
    """Accuracy of each model on CUDA and its disagreement with the first; exit statistics for compiled ones."""
    predictions, out = {}, {}
    for name, model in models.items():
        values = run_batches(session(model_source(model)), feed)
        predictions[name] = values[output].argmax(1)
        out[name] = {"accuracy": float((predictions[name] == labels).mean())}
        if EXIT_OUTPUT in values:
            metadata = {p.key: p.value for p in onnx.load(model, load_external_data=False).metadata_props}
            statistics = ExitStatistics(stage_flops=json.loads(metadata[STAGE_FLOPS_KEY]),
                                        original_flops=float(metadata[FLOPS_ORIGINAL_KEY]))
            statistics.add(values[EXIT_OUTPUT])
            out[name].update(statistics.to_dict())
    first = next(iter(predictions.values()))
    for name in models:
        out[name]["disagreement"] = float((predictions[name] != first).mean())
    return out


def memory_child(model_path: str, feed_path: str) -> None:
    """In a fresh process: GPU memory (NVML, whole device) taken by loading the model and by runs at batch 64."""
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def used() -> int:
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used

    with np.load(feed_path) as data:
        feed = {k: data[k][:64] for k in data.files if k != "labels"}
    tiny = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "warm",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        ir_version=10, opset_imports=[onnx.helper.make_opsetid("", 17)])
    warm = session(tiny.SerializeToString())
    warm.run(None, {"x": np.ones(1, np.float32)})
    base = used()
    sess = session(model_source(Path(model_path)))
    loaded = used()
    peak = loaded
    for _ in range(3):
        sess.run(None, feed)
        peak = max(peak, used())
    print(json.dumps({"load_bytes": loaded - base, "peak_bytes": peak - base}))


def memory(model_path: Path, feed_path: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--memory", str(model_path), str(feed_path)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def cnn_steps(art: Path) -> dict:
    with np.load(art / "cnn" / "cnn_test.npz") as data:
        feed, labels = {"images": data["images"]}, data["labels"]
    original = Path("models/artifacts/fashion_resnet.onnx")  # what cnn_compiled and cnn_fp16 were built from
    compiled, half = art / "cnn" / "cnn_compiled.onnx", art / "cnn" / "cnn_fp16.onnx"
    return {
        "parity_original": lambda: parity("original", str(original), feed, CNN_OUTPUT),
        "parity_compiled": lambda: parity("compiled", str(compiled), feed, CNN_OUTPUT),
        "parity_compiled_no_tf32": lambda: parity("compiled, use_tf32=0", str(compiled), feed, CNN_OUTPUT, use_tf32=0),
        "accuracy": lambda: accuracy_on_gpu({"original": original, "compiled": compiled, "float16": half},
                                            feed, labels, CNN_OUTPUT),
        "latency": lambda: latency({"original": session(str(original)), "compiled": session(str(compiled)),
                                    # compiled graphs meet a new batch shape per exit subset: cuDNN's default
                                    # exhaustive search runs once per shape, the heuristic choice never
                                    "original_heuristic": session(str(original), cudnn_conv_algo_search="HEURISTIC"),
                                    "compiled_heuristic": session(str(compiled), cudnn_conv_algo_search="HEURISTIC"),
                                    "original_no_search": session(str(original), cudnn_conv_algo_search="DEFAULT"),
                                    "compiled_no_search": session(str(compiled), cudnn_conv_algo_search="DEFAULT")},
                                   feed),
        "conv_batch_shapes": lambda: conv_batch_shapes(str(original), feed["images"]),
        "float16_latency": lambda: latency({"float32": session(str(original)), "float16": session(str(half))},
                                           feed, (1, 64)),
        "float16_memory": lambda: {name: memory(path, art / "cnn" / "cnn_test.npz")
                                   for name, path in (("float32", original), ("float16", half))},
        "exit_session_threads": lambda: exit_session_threads(compiled, feed),
        "tensorrt": lambda: tensorrt(str(compiled)),
        "cuda_graph": lambda: {"original": cuda_graph(str(original), feed), "compiled": cuda_graph(str(compiled), feed)},
    }


def no_exit_steps(art: Path) -> dict:
    steps = {}
    with np.load(art / "cnn" / "cnn_test.npz") as data:
        images = data["images"]
    for net in ("cnn", "wide"):
        def step(net=net) -> dict:
            graphs = {name: art / "cnn" / f"{net}_{name}.onnx" for name in ("plain", "closed_one", "closed_all")}
            closed = onnx.load(graphs["closed_all"], load_external_data=False)
            result = {"exits": exit_count(closed)}
            result["latency"] = latency({k: session(model_source(p)) for k, p in graphs.items()},
                                        {closed.graph.input[0].name: images})
            return result
        steps[f"no_exit_{net}"] = step
    return steps


def staged(model: Path, plan: Path) -> RunAdapter:
    """moco's stage runner over a bucketed build (a CUDA graph per stage and bucket), timed like a session."""
    from moco_compile.runtime.staged import StagedSession

    return RunAdapter(StagedSession(model, plan, providers=[ACCELERATOR]))


def text_steps(art: Path) -> dict:
    with np.load(art / "text" / "text_test.npz") as data:
        feed = {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        labels = data["labels"]
    original, compiled, half = (art / "text" / f"text_{n}.onnx" for n in ("original", "compiled", "fp16"))
    output = onnx.load(original, load_external_data=False).graph.output[0].name
    return {
        "text_parity_compiled": lambda: parity("text compiled", str(compiled), feed, output),
        "text_parity_compiled_no_tf32": lambda: parity("text compiled, use_tf32=0", str(compiled), feed, output,
                                                       use_tf32=0),
        "text_accuracy": lambda: accuracy_on_gpu({"original": original, "compiled": compiled, "float16": half,
                                                  "max2": art / "text" / "text_max2.onnx"}, feed, labels, output),
        "text_latency": lambda: latency({"original": session(str(original)), "compiled": session(str(compiled)),
                                         "original_no_tf32": session(str(original), use_tf32=0),
                                         "compiled_no_tf32": session(str(compiled), use_tf32=0)}, feed),
        "text_fewer_exits": lambda: latency({name: session(str(art / "text" / f"text_{name}.onnx"))
                                             for name in ("original", "compiled", "max2", "top1", "top2", "top3")},
                                            feed, (64, 256, 1024)),
        "text_target_cuda": lambda: latency({"original": session(str(original)),
                                             "target_cuda": session(str(art / "text" / "text_cuda.onnx")),
                                             "target_cuda_staged": staged(art / "text" / "text_cuda.onnx",
                                                                          art / "text" / "text_cuda_plan.json")},
                                            feed, (1, 64, 256)),
        "text_float16_latency": lambda: latency({"float32": session(str(original)), "float16": session(str(half))},
                                                feed, (1, 64)),
        "text_float16_memory": lambda: {name: memory(path, art / "text" / "text_test.npz")
                                        for name, path in (("float32", original), ("float16", half))},
    }


def conv_batch_shapes(model: str, images: np.ndarray, runs: int = 40) -> dict:
    """ms per batch of the original CNN when the batch size stays fixed or changes every call, as the
    rows continuing past an exit do (onnxruntime's CUDA Conv re-plans when its input shape changes)."""
    sequences = {"fixed 37": [37], "fixed 64": [64], "cycling 29/37/41/53": [29, 37, 41, 53],
                 "cycling 32/40/48/56": [32, 40, 48, 56]}
    out = {}
    for search in ("EXHAUSTIVE", "DEFAULT"):
        sess = session(model, cudnn_conv_algo_search=search)
        for name, sizes in sequences.items():
            batches = [images[:size] for size in sizes]
            for batch in batches:
                sess.run(None, {"images": batch})
            seconds = []
            for index in range(runs):
                started = time.perf_counter()
                sess.run(None, {"images": batches[index % len(batches)]})
                seconds.append(time.perf_counter() - started)
            out[f"{name}, {search}"] = 1e3 * float(np.median(seconds))
    return out


def exit_session_threads(path: Path, feed: dict[str, np.ndarray], threads: int = 4) -> dict:
    """ExitSession on CUDA (I/O binding) from several threads at once: same outputs as one thread."""
    exit_session = ExitSession(path, providers=[ACCELERATOR], require_gpu=ACCELERATOR != CPU)
    batches = [{"images": feed["images"][i:i + 64]} for i in range(0, 512, 64)]
    expected = [exit_session.run(b)[CNN_OUTPUT] for b in batches]
    results: dict[int, list] = {}

    def work(index: int) -> None:
        results[index] = [exit_session.run(b)[CNN_OUTPUT] for b in batches]

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    same = all(np.array_equal(a, b) for outs in results.values() for a, b in zip(outs, expected))
    return {"provider": exit_session.provider, "io_binding": exit_session.io_binding, "threads": threads,
            "identical": bool(same), "statistics": exit_session.statistics.to_dict()}


def tensorrt(model: str) -> dict:
    import ctypes.util

    result = {"available": TENSORRT in ort.get_available_providers(),
              "libnvinfer": ctypes.util.find_library("nvinfer")}
    try:
        created = ort.InferenceSession(model, providers=[TENSORRT, CUDA, CPU])
        result["runs_on"] = created.get_providers()
    except Exception as error:  # onnxruntime's own exception types
        result["error"] = str(error)[-600:]
    return result


def cuda_graph(model: str, feed: dict[str, np.ndarray]) -> dict:
    """Whether onnxruntime's CUDA Graph capture accepts the graph (needs I/O bound on the device)."""
    try:
        sess = session(model, ACCELERATOR, enable_cuda_graph=1)
        binding = sess.io_binding()
        batch = ort.OrtValue.ortvalue_from_numpy(feed["images"][:64], "cuda", 0)
        binding.bind_ortvalue_input("images", batch)
        for output in sess.get_outputs():
            binding.bind_output(output.name, "cuda")
        sess.run_with_iobinding(binding)
        sess.run_with_iobinding(binding)
        return {"accepted": True}
    except Exception as error:  # onnxruntime's own exception types
        return {"accepted": False, "error": str(error)[-400:]}


def environment() -> dict:
    import shutil

    smi = shutil.which("nvidia-smi")
    gpu = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if smi else "no GPU (dry run)"
    return {"gpu": gpu, "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "python": sys.version.split()[0]}


GROUPS = {"cnn": cnn_steps, "no_exit": no_exit_steps, "text": text_steps}
SERVED_GROUPS = {"served": served_steps, "cycling": cycling_steps}  # these take the run's Settings too


def run_all(art: Path, out: Path, groups: list[str], settings: Settings = Settings()) -> None:
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    results = {"environment": environment()}
    print(results, flush=True)
    steps = {name: step for group in groups for name, step in
             (SERVED_GROUPS[group](art, settings) if group in SERVED_GROUPS else GROUPS[group](art)).items()}
    for name, step in steps.items():
        started = time.perf_counter()
        try:
            results[name] = step()
        except Exception:  # a failed step is a finding: record it and go on
            results[name] = {"error": traceback.format_exc()[-1500:]}
        results[name + "_seconds"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(results[name])[:600], flush=True)
        (out / f"gpu_check_{'_'.join(groups)}.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artefacts", type=Path, default=Path(".gpu"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--groups", nargs="+", choices=[*SERVED_GROUPS, *GROUPS], default=[*SERVED_GROUPS, *GROUPS])
    parser.add_argument("--small", action="store_true", help="served shapes at small widths (a dry run)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS),
                        help="exit layouts of the served shapes: nested, flat, bucketed, staged (the stage runner)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per served-shape session and batch size")
    parser.add_argument("--record", type=Path, nargs="+", help="write RESULTS.md's section from gpu_check_*.json")
    parser.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        memory_child(*args.memory)
    elif args.record:
        from benchmarks.gpu_report import record

        record({k: v for path in args.record for k, v in json.loads(path.read_text()).items()},
               [str(path) for path in args.record])
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = Settings(small=args.small, layouts=tuple(args.layouts), seconds=args.seconds,
                            **({"sample_rows": 512, "fresh_rows": 512} if args.small else {}))
        run_all(args.artefacts, args.out, args.groups, settings)


if __name__ == "__main__":
    main()
