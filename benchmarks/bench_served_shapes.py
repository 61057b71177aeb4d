"""Early exits on the model shapes people serve, on a GPU: the steps of ``gpu_check.py``'s groups ``served``
and ``cycling``.

``served``: a ResNet-50 at 224x224 and a BERT-base encoder on 128 tokens (``served_shapes.py``, random weights
from a seed), one exit about a third of the way through the FLOPs, thresholds set so that 30%, 50% and 70% of
random rows leave, and a closed exit (threshold +inf) (``exit_profiles.py``: a systems curve, not a certified
plan).  Per shape, profile, layout and batch (1, 64, 256): median ms per batch beside the original's, measured
alternating in one process (``runtime.latency.compare_latency``, host arrays in and out); the original also
under CUDA Graph capture with fixed I/O buffers (``gpu_common.BoundRunner``); the share of rows that left and
the FLOPs reduction, from the compiled graph's ``moco_exit`` and cost metadata.

``cycling``: the reference CNN with its certified plan (``gpu_prepare.py``'s ``cnn_prepared.onnx`` and
``cnn_plan.json``), batch sizes cycling 29/37/41/53 vs fixed at their mean, per layout.

Layouts: ``nested`` and ``flat`` graphs, ``bucketed`` graphs (continuing rows padded into the smallest batch
bucket holding them), and ``staged`` (moco's stage runner ``runtime.staged.StagedSession`` over the bucketed
graph, one CUDA Graph per stage and bucket).  A layout this checkout cannot build is recorded as an error and
the rest is measured.  Dry run on a CPU, at small widths::

    MOCO_GPU_CHECK_PROVIDER=CPUExecutionProvider python benchmarks/gpu_check.py --groups served cycling --small \\
        --out /tmp/served
"""
from __future__ import annotations

import json
import tempfile
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.exit_profiles import pooled_features, pooling_for, profile_plans, random_rule, realized, third_cut
from benchmarks.gpu_common import ACCELERATOR, BoundRunner, RunAdapter, session
from benchmarks.served_shapes import OUTPUT, SHAPES, random_rows
from moco_compile.passes.graph.rewrite import apply_plan
from moco_compile.passes.planning.config import DEFAULT_BATCH_BUCKETS, PlannerConfig
from moco_compile.passes.planning.types import ExitPlan
from moco_compile.runtime.latency import compare_latency, compare_passes
from moco_compile.runtime.session import CPU, CUDA_OPTIONS

LAYOUTS = ("nested", "bucketed", "staged")
STAGED = "staged"  # not a graph layout: the stage runner over the bucketed graph
BATCHES = (1, 64, 256)
CYCLE = (29, 37, 41, 53)
ORIGINAL, CUDA_GRAPH = "original", "original_cuda_graph"
SEEDS = {"cut": 0, "sample": 1, "fresh": 2, "timing": 3}


@dataclass(frozen=True)
class Settings:
    """What a run measures: ``small`` widths (a dry run), the ``layouts``, ``seconds`` of timing per session
    and batch size, the batch sizes, and the random rows that set (``sample_rows``) and check the thresholds."""

    small: bool = False
    layouts: tuple[str, ...] = LAYOUTS
    seconds: float = 1.0
    batches: tuple[int, ...] = BATCHES
    sample_rows: int = 1024
    fresh_rows: int = 512


def _error() -> str:
    return traceback.format_exc()[-1200:]


def compiled_graphs(model: onnx.ModelProto, plans: Mapping[str, ExitPlan], output: str, layouts: tuple[str, ...],
                    errors: dict[str, str]) -> dict[str, onnx.ModelProto]:
    """``"{plan}/{layout}"`` -> the graph of each plan in each graph layout (the stage runner's bucketed graph
    too); a layout that fails is recorded in ``errors`` under the same key (and the stage runner's, when it
    has no bucketed graph).  Bucketed graphs are asked for with their buckets named
    (``apply_plan(..., batch_buckets=...)``): a checkout whose rewrite does not take them records an error
    rather than measuring another layout under the name."""
    graph_layouts = dict.fromkeys("bucketed" if layout == STAGED else layout for layout in layouts)
    graphs = {}
    for name, plan in plans.items():
        for layout in graph_layouts:
            options = {"batch_buckets": DEFAULT_BATCH_BUCKETS} if layout == "bucketed" else {}
            try:
                graphs[f"{name}/{layout}"] = apply_plan(model, plan, output, layout, **options)
            except Exception:  # a layout this checkout lacks, or one that fails: a finding, recorded
                errors[f"{name}/{layout}"] = _error()
                if layout == "bucketed" and STAGED in layouts:
                    errors[f"{name}/{STAGED}"] = "no bucketed graph to run: " + errors[f"{name}/{layout}"]
    return graphs


def staged_session(graph: onnx.ModelProto, plan: ExitPlan, provider: str):
    """moco's stage runner over a bucketed graph (CUDA Graphs on CUDA), timed like a session."""
    from moco_compile.runtime.staged import StagedSession  # issue 26's runner: absent from older checkouts

    record = {**plan.to_dict(), "exit_layout": "bucketed",  # what a bucketed build's plan.json holds
              "planner_config": PlannerConfig(exit_layout="bucketed", batch_buckets=DEFAULT_BATCH_BUCKETS).to_dict()}
    return RunAdapter(StagedSession(graph, record, providers=[provider]))


def runners(graphs: Mapping[str, onnx.ModelProto], plans: Mapping[str, ExitPlan], layouts: tuple[str, ...],
            errors: dict[str, str], provider: str = ACCELERATOR) -> dict[str, object]:
    """A session per graph whose layout was asked for, and the stage runner per bucketed graph when
    ``staged`` was; failures recorded in ``errors``."""
    out: dict[str, object] = {}
    for key, graph in graphs.items():
        name, layout = key.split("/")
        makers: dict[str, Callable[[], object]] = {}
        if layout in layouts:
            makers[key] = lambda graph=graph: session(graph.SerializeToString(), provider, **CUDA_OPTIONS)
        if layout == "bucketed" and STAGED in layouts:
            makers[f"{name}/{STAGED}"] = lambda graph=graph, name=name: staged_session(graph, plans[name], provider)
        for made, maker in makers.items():
            try:
                out[made] = maker()
            except Exception:  # recorded; the other runners are measured
                errors[made] = _error()
    return out


def exit_ids(runner, feed: Mapping[str, np.ndarray], batch: int = 64) -> np.ndarray:
    """``moco_exit`` (the last output) of ``runner`` on the rows of ``feed``, run in batches."""
    rows = len(next(iter(feed.values())))
    return np.concatenate([runner.run(None, {k: v[i:i + batch] for k, v in feed.items()})[-1]
                           for i in range(0, rows, batch)])


def realized_exits(graphs: Mapping[str, onnx.ModelProto], timed: Mapping[str, object], feed: Mapping[str, np.ndarray],
                   errors: dict[str, str]) -> dict[str, dict]:
    """Per compiled runner: the share of ``feed``'s rows that left and the FLOPs reduction (its graph's metadata)."""
    out = {}
    for key, runner in timed.items():
        name = key.split("/")[0]
        graph = graphs.get(key) or graphs[f"{name}/bucketed"]
        try:
            out[key] = realized(graph, exit_ids(runner, feed))
        except Exception:  # recorded; its timing would fail alike
            errors[key] = _error()
    return out


def latency_by_batch(original: bytes, timed: dict[str, object], model: onnx.ModelProto, settings: Settings,
                     errors: dict[str, str], provider: str = ACCELERATOR) -> dict[str, dict[str, float]]:
    """Median ms per batch of every runner in ``timed`` (the original among them) and of the original under
    CUDA Graph capture (bound to one batch shape, so made per batch size), alternating, per batch size."""
    out = {}
    for batch in settings.batches:
        rows = random_rows(model, max(2 * batch, 16), SEEDS["timing"])
        sessions = dict(timed)
        try:
            graph_name = CUDA_GRAPH if provider != CPU else "original_io_binding"
            sessions[graph_name] = BoundRunner(original, {k: v[:batch] for k, v in rows.items()}, provider,
                                               **CUDA_OPTIONS)
        except Exception:  # onnxruntime refuses capture: recorded, the others measured
            errors[f"{CUDA_GRAPH}@{batch}"] = _error()
        try:
            timing = compare_latency(sessions, rows, batch, min_seconds=settings.seconds)
            out[str(batch)] = {name: 1e3 * seconds for name, seconds in timing.items()}
        except Exception:
            errors[f"latency@{batch}"] = _error()
        print(f"  batch {batch}:", {k: round(v, 3) for k, v in out.get(str(batch), {}).items()}, flush=True)
    return out


def served_shape(shape: str, settings: Settings, provider: str = ACCELERATOR) -> dict:
    """The whole measurement of one served shape (module docstring)."""
    model = SHAPES[shape](small=settings.small)
    cut = third_cut(model, random_rows(model, 1, SEEDS["cut"]))
    pooling = pooling_for(cut)
    classes = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    providers = [(provider, CUDA_OPTIONS), CPU] if provider != CPU else [CPU]  # as the timed sessions run
    features = pooled_features(model, cut, pooling, random_rows(model, settings.sample_rows, SEEDS["sample"]),
                               providers)
    plans = profile_plans(cut, pooling, random_rule(features, classes), features)
    errors: dict[str, str] = {}
    graphs = compiled_graphs(model, plans, OUTPUT, settings.layouts, errors)
    timed = runners(graphs, plans, settings.layouts, errors, provider)
    result = {"small": settings.small, "cut": cut.tensor, "cut_shape": list(cut.shape),
              "fraction_before": cut.fraction_before, "pooling": pooling,
              "original_mflops": (cut.flops_before + cut.flops_after) / 1e6, "sample_rows": settings.sample_rows,
              "thresholds": {name: float(plan.exits[0].thresholds[0]) for name, plan in plans.items()},
              "cuda_options": CUDA_OPTIONS,
              "realized": realized_exits(graphs, timed, random_rows(model, settings.fresh_rows, SEEDS["fresh"]),
                                         errors)}
    print(shape, json.dumps(result)[:600], flush=True)
    original = model.SerializeToString()
    timed = {ORIGINAL: session(original, provider, **CUDA_OPTIONS),
             **{key: runner for key, runner in timed.items() if key in result["realized"]}}
    result["latency_ms"] = latency_by_batch(original, timed, model, settings, errors, provider)
    result["errors"] = errors
    return result


def cycling(art: Path, settings: Settings, provider: str = ACCELERATOR, repeats: int = 10) -> dict:
    """ms per call of the reference CNN's original and compiled graphs when the batch size cycles through
    :data:`CYCLE` and when it stays at their mean, each graph warmed on every shape first."""
    model = onnx.load(art / "cnn" / "cnn_prepared.onnx")
    saved = json.loads((art / "cnn" / "cnn_plan.json").read_text())
    plan = ExitPlan.from_dict(saved)
    with np.load(art / "cnn" / "cnn_test.npz") as data:
        images = data["images"]
    name = model.graph.input[0].name
    errors: dict[str, str] = {}
    graphs = compiled_graphs(model, {"certified": plan}, saved["output"], settings.layouts, errors)
    timed = {ORIGINAL: session(model.SerializeToString(), provider, **CUDA_OPTIONS),
             **runners(graphs, {"certified": plan}, settings.layouts, errors, provider)}
    result = {"realized": realized_exits(graphs, {k: v for k, v in timed.items() if k != ORIGINAL},
                                         {name: images[:512]}, errors), "ms_per_call": {}}
    if "certified/bucketed" in graphs:
        try:
            result["host_reads"] = host_reads(graphs["certified/bucketed"], [{name: images[:size]} for size in CYCLE * 5],
                                              len(plan.exits), provider)
        except Exception:
            errors["host_reads"] = _error()
    fixed = round(float(np.mean(CYCLE)))
    for label, sizes in ((f"fixed {fixed}", [fixed]), ("cycling " + "/".join(map(str, CYCLE)), list(CYCLE))):
        batches = [{name: images[:size]} for size in sizes] * (repeats * len(CYCLE) // len(sizes))
        try:
            passes = compare_passes(timed, batches, rounds=5, warmup=len(sizes))
            result["ms_per_call"][label] = {k: 1e3 * float(np.median(v)) / len(batches) for k, v in passes.items()}
        except Exception:
            errors[label] = _error()
        print(" ", label, {k: round(v, 3) for k, v in result["ms_per_call"].get(label, {}).items()}, flush=True)
    result["errors"] = errors
    return result


def host_reads(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]], exits: int, provider: str) -> dict:
    """Per run of the bucketed graph (onnxruntime's profiler): the exits reached, the NonZero nodes run
    (each reads its count back to the host once) and the copies to the host onnxruntime inserted
    (MemcpyToHost nodes: each one more sync), summed over ``batches``."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as scratch:
        options.profile_file_prefix = str(Path(scratch) / "host_reads")
        providers = [(provider, CUDA_OPTIONS), CPU] if provider != CPU else [CPU]
        profiled = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        reached = 0
        for batch in batches:
            routes = profiled.run(None, batch)[-1]
            reached += int(max((route + 1 if route >= 0 else exits) for route in routes.tolist()))
        events = json.loads(Path(profiled.end_profiling()).read_text())
    ops = [event["args"].get("op_name", "") for event in events
           if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")]
    return {"runs": len(batches), "exits_reached": reached, "nonzero_runs": ops.count("NonZero"),
            "memcpy_to_host_runs": ops.count("MemcpyToHost"), "provider": provider}


def served_steps(art: Path, settings: Settings) -> dict[str, Callable[[], dict]]:
    """``gpu_check.py``'s group ``served``: one step per served shape."""
    return {f"served_{shape}": (lambda shape=shape: served_shape(shape, settings)) for shape in SHAPES}


def cycling_steps(art: Path, settings: Settings) -> dict[str, Callable[[], dict]]:
    """``gpu_check.py``'s group ``cycling``: the reference CNN with batch sizes cycling."""
    return {"served_cycling": lambda: cycling(art, settings)}
