"""Command line: ``moco compile``, ``inspect``, ``calibrate``, ``report``, ``evaluate``, ``export-triton``,
``serve-triton``, ``profile-target``, ``profile-memory``, ``optimize-memory``."""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from moco_compile.cli_common import FORCE_HELP, fail as _fail
from moco_compile.constants import LABELS
from moco_compile.errors import MocoError
from moco_compile.moe.cli import app as moe_app
from moco_compile.passes.planning.config import DEFAULT_BATCH_BUCKETS
from moco_compile.runtime.triton.repository import ENTRY_INSTANCES

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="moco: compile classifiers into one ONNX graph where easy inputs exit early.")
console = Console()
app.add_typer(moe_app, name="moe")
ENGINE_HELP = "local: this process; ray: the sharded data on a Ray cluster (pip install 'moco-compile[ray]')"
RAY_ADDRESS_HELP = "Ray cluster to join (host:port, or 'auto'); default: start a local one"


@app.callback()
def _check_onnxruntime() -> None:
    if importlib.util.find_spec("onnxruntime") is None:
        _fail(MocoError("onnxruntime is not installed: pip install 'moco-compile[cpu]' (or 'moco-compile[gpu]' "
                        "for onnxruntime-gpu; never both, they install the same module)"))


@app.command("compile")
def compile_command(
    model: Path = typer.Argument(..., help="ONNX classifier to compile, or a Hugging Face save_pretrained "
                                 "directory of a text or image classifier"),
    calib: str = typer.Option(..., "--calib", help=f".npz with one array per model input (+ optional '{LABELS}'); "
                              "for a Hugging Face text classifier's directory also a .csv/.jsonl with a 'text' "
                              "(and 'label') column or a .txt of one text per line, tokenized by its saved "
                              "tokenizer; for an image classifier's, a folder of images (or of one folder per "
                              "class), processed by its saved image processor; with --engine ray, a directory or "
                              "glob of .parquet/.npz shards (local or a URI)"),
    out: Path = typer.Option(..., "--out", help="output directory (model.onnx, plan.json, report.json)"),
    max_disagreement: float = typer.Option(0.01, help="budget: fraction of inputs whose class may change"),
    confidence: float = typer.Option(0.95, help="confidence of the certified budget"),
    max_accuracy_drop: Optional[float] = typer.Option(None, help="optional accuracy budget (needs labels)"),
    ood_guard: Optional[float] = typer.Option(None, "--ood-guard", help="out-of-distribution guard: share of "
                                              "calibration-like rows each exit's distance check may send to the "
                                              "full network, e.g. 0.01; rows unlike the calibration data then "
                                              "run the full network"),
    output: Optional[str] = typer.Option(None, "--output", help="classifier output name, if several"),
    max_exits: Optional[int] = typer.Option(None, "--max-exits", help="at most this many exits (default 24); "
                                            "on CUDA each exit costs a device-to-host sync per batch (0.17 ms "
                                            "on an H100), so serve GPUs with 1 or 2"),
    exit_layout: Optional[str] = typer.Option(None, "--exit-layout", help="nested (default on CPU, but "
                                              "whole-batch with --serving-batch 1 and flat with a larger "
                                              "one): each exit "
                                              "runs the rest inside an If, rows that leave skip it (at most 30 "
                                              "exits); flat: no If, any number of exits (on CPU up to 15% slower "
                                              "at batch 1, within 1.5% at batch 64, 2-3% cheaper when no row "
                                              "leaves); whole-batch: nested, but a batch leaves only when all "
                                              "its rows decided (for batch-1 serving: 2-3% faster than nested "
                                              "there); bucketed (GPU targets): "
                                              "nested, the continuing rows padded to --batch-buckets"),
    exit_heads: Optional[str] = typer.Option(None, "--exit-heads", help="heads an exit's rule may be: linear,mlp "
                                             "(default: a one-hidden-layer MLP where cross-validation finds it "
                                             "admits more rows) or linear (softmax probes only)"),
    target: Optional[str] = typer.Option(None, "--target", help="the machine that serves the graph: cpu "
                                         "(default: moco's CPU figures), cuda (measured H100 figures) or "
                                         "cuda:<device> (with --target-profile); exits are priced for it"),
    serving_batch: Optional[int] = typer.Option(None, "--serving-batch", help="rows per batch you serve, what a "
                                                "GPU target's exits are priced at (default 64): an exit's fixed "
                                                "time per batch is shared by the batch's rows; on the cpu target "
                                                "(no profile) moco times the model and its exits on this machine "
                                                "at that batch to price them"),
    batch_buckets: Optional[str] = typer.Option(None, "--batch-buckets", help="comma-separated batch sizes the "
                                                "rows continuing past an exit are padded to on GPU targets "
                                                f"(default {','.join(map(str, DEFAULT_BATCH_BUCKETS))})"),
    target_profile: Optional[Path] = typer.Option(None, "--target-profile", help="the JSON file `moco "
                                                  "profile-target` wrote on the serving machine: its measured "
                                                  "constants price the exits"),
    allow_no_exit: bool = typer.Option(False, help="emit the unchanged graph when no plan meets the budget"),
    seed: int = typer.Option(0, help="seed of the calibration split"),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="time the compiled graph against the "
                                 "original at batch 1 and 64 on this CPU (about 10%% of the compile, 2-15 s)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP.format(what="output directory")),
    engine: str = typer.Option("local", "--engine", help=ENGINE_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_workers: int = typer.Option(2, "--ray-workers", help="Ray actors, each with one onnxruntime session"),
    ray_max_rows: Optional[int] = typer.Option(None, "--ray-max-rows", help="plan and certify on at most this many "
                                               "rows (a seeded sample; default: all, in bounded driver memory)"),
) -> None:
    """Compile MODEL into an early-exit graph and print its report."""
    from moco_compile.api import compile as compile_model
    from moco_compile.outputs import check_output_dir
    from moco_compile.passes.planning.config import PlannerConfig
    from moco_compile.reports.terminal import print_report

    try:
        check_output_dir(out, [model, calib], force)  # fail before the long work
        if exit_layout not in (None, "bucketed") and (target or "cpu") != "cpu":
            raise ValueError(f"--exit-layout {exit_layout} does not go with --target {target}: GPU targets write the "
                             "bucketed layout (the rows continuing past an exit padded to fixed batch sizes, whose "
                             "kernels keep their plans); drop --exit-layout")
        exit_layout = exit_layout or default_exit_layout(target, serving_batch)
        settings = {name: value for name, value in (("exit_layout", exit_layout), ("max_exits", max_exits),
                                                    ("exit_heads", exit_heads and tuple(exit_heads.split(","))))
                    if value is not None}
        buckets = None if batch_buckets is None else _batch_buckets(batch_buckets)
        calibration = _calibration_data(calib, engine, ray_address, ray_workers, ray_max_rows, seed, model)
        result = compile_model(model, calibration, output=output,
                               max_disagreement=max_disagreement, confidence=confidence,
                               max_accuracy_drop=max_accuracy_drop, ood_guard=ood_guard,
                               allow_no_exit=allow_no_exit, seed=seed, measure_latency=latency,
                               planner_config=PlannerConfig(**settings), target=target, serving_batch=serving_batch,
                               batch_buckets=buckets, target_profile=target_profile)
        result.save(out, inputs=[model, calib], force=force)
    except (MocoError, ValueError, OSError) as error:
        _fail(error)
    print_report(result.report, console)
    console.print(f"wrote {out}/model.onnx, plan.json, report.json, frame.arrow")


@app.command("inspect")
def inspect_command(
    model: Path = typer.Argument(..., help="ONNX classifier, or a Hugging Face save_pretrained directory"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="calibration .npz (gives input shapes); for a "
                                         "Hugging Face directory also texts or image files, as compile takes them"),
    output: Optional[str] = typer.Option(None, "--output", help="classifier output name, if several"),
) -> None:
    """List the candidate cut points of MODEL with their FLOPs (tab-separated, full names, when the
    output is not a terminal)."""
    from moco_compile.calibration_data import load_calibration
    from moco_compile.importer import import_model
    from moco_compile.prepare import cut_points_of
    from moco_compile.reports.terminal import cut_points_table, cut_points_tsv

    try:
        imported = import_model(model, output=output)
        feed = _example_feed(imported, load_calibration(calib, model) if calib else None)
        _, cuts = cut_points_of(imported, feed, batch_size=1, classify=False)
    except MocoError as error:
        _fail(error)
    if console.is_terminal:
        console.print(cut_points_table(cuts, cuts[0].flops_before + cuts[0].flops_after))
    else:
        typer.echo(cut_points_tsv(cuts))


@app.command("calibrate")
def calibrate_command(
    model: Path = typer.Argument(..., help="ONNX classifier, or a Hugging Face save_pretrained directory"),
    calib: Path = typer.Option(..., "--calib", help=f".npz with one array per model input (+ optional '{LABELS}'); "
                               "for a Hugging Face directory also texts or image files, as compile takes them"),
    out: Path = typer.Option(..., "--out", help="ActivationFrame file to write (Arrow IPC)"),
    raw: bool = typer.Option(False, help="also store the unpooled cut tensors"),
    output: Optional[str] = typer.Option(None, "--output", help="classifier output name, if several"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP.format(what="frame file")),
) -> None:
    """Store MODEL's pooled activations at every cut point as an ActivationFrame."""
    from moco_compile.api import calibrate_frame
    from moco_compile.calibration_data import load_calibration
    from moco_compile.outputs import check_output_file

    try:
        check_output_file(out, "frame", "frame", [model, calib], force)
        frame = calibrate_frame(model, load_calibration(calib, model), out, output=output, raw=raw, force=force)
    except (MocoError, ValueError, OSError) as error:
        _fail(error)
    console.print(f"wrote {out}: {frame!r}")


@app.command("report")
def report_command(
    out_dir: Path = typer.Argument(..., help="output directory of 'moco compile'"),
    html: Optional[Path] = typer.Option(None, "--html", help="where to write the page (default DIR/report.html)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP.format(what="report page")),
) -> None:
    """Render a compile's report as an HTML page with plots."""
    from moco_compile.reports.html_report import render_report

    try:
        path = render_report(out_dir, html, force=force)
    except (MocoError, OSError) as error:
        _fail(error)
    console.print(f"wrote {path}")


@app.command("evaluate")
def evaluate_command(
    build: Path = typer.Argument(..., help="output directory of 'moco compile'"),
    traffic: str = typer.Option(..., "--traffic", help=".npz sample of real traffic: one array per model "
                                f"input, rows in arrival order (+ optional '{LABELS}'); for a build of a Hugging "
                                "Face directory also texts or image files, as compile's --calib takes them; with "
                                "--engine ray, a directory or glob of .parquet/.npz shards (in arrival order by "
                                "name)"),
    original: Optional[Path] = typer.Option(None, "--original", help="the model the build was compiled from "
                                            "(default: the file or directory compile recorded)"),
    qps: float = typer.Option(100.0, "--qps", help="requests per second to project savings for"),
    days: float = typer.Option(30.0, "--days", help="period of the projection"),
    gpu_hour_price: Optional[float] = typer.Option(None, "--gpu-hour-price", help="price of a device-hour"),
    utilisation: float = typer.Option(0.6, "--utilisation", help="fraction of paid device time spent serving"),
    batch_size: int = typer.Option(64, "--batch-size", help="rows per batch, as served"),
    providers: Optional[str] = typer.Option(None, "--providers", help="comma-separated: cuda, cpu, tensorrt "
                                            "(default: CUDA when available, else CPU)"),
    require_gpu: bool = typer.Option(False, "--require-gpu", help="fail instead of falling back to CPU"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP.format(what="evaluation")),
    engine: str = typer.Option("local", "--engine", help=ENGINE_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_workers: int = typer.Option(2, "--ray-workers", help="Ray actors, each with both models' sessions"),
) -> None:
    """Shadow-run TRAFFIC through the original and the compiled model; project savings over --days."""
    import logging

    from moco_compile.build import Build
    from moco_compile.evaluation import check_evaluation_paths, evaluate_build, write_evaluation

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_evaluation_paths(build, force=force)  # fail before the long work
        source = Build.load(build).original_model(original)  # a Hugging Face directory tokenizes texts
        evaluation = evaluate_build(build, _calibration_data(traffic, engine, ray_address, ray_workers,
                                                             model=source),
                                    original=original, qps=qps, days=days,
                                    device_hour_price=gpu_hour_price, utilisation=utilisation,
                                    batch_size=batch_size, require_gpu=require_gpu,
                                    providers=providers.split(",") if providers else None)
        paths = write_evaluation(build, evaluation, force=force)
    except (MocoError, ValueError, OSError) as error:
        _fail(error)
    _print_evaluation(evaluation)
    console.print(f"wrote {paths[0]}, {paths[1]}")


def _print_evaluation(evaluation: dict) -> None:
    d, p = evaluation["disagreement"], evaluation["projection"]
    console.print(f"{evaluation['traffic_rows']:,} rows on {evaluation['provider']}: disagreement "
                  f"{d['fraction']:.2%} ({d['confidence']:.0%} interval {d['interval'][0]:.2%}-{d['interval'][1]:.2%}, "
                  f"certified budget {d['certified_budget']:.2%}), exit rate {evaluation['exit_rate']:.1%}, "
                  f"time per row {evaluation['latency_ratio']:.3f}x the original")
    cost = "" if p["cost_saved"] is None else f", {p['cost_saved']:,.2f} saved"
    console.print(f"projection over {p['days']:g} days at {p['qps']:g} requests/s: {p['device_hours_saved']:.1f} of "
                  f"{p['device_hours_original']:.1f} device-hours saved ({p['fraction_saved']:.1%}){cost}")
    for flag in evaluation["drift"]:
        console.print(f"[bold yellow]drift:[/] {flag}", highlight=False)


@app.command("export-triton")
def export_triton_command(
    build_dir: Path = typer.Argument(..., help="output directory of 'moco compile'"),
    repository: Path = typer.Option(..., "--repository", help="Triton model repository to write the model into"),
    name: Optional[str] = typer.Option(None, "--name", help="model name (default: the build directory's name)"),
    max_batch_size: int = typer.Option(64, help="largest batch Triton forms (dynamic batching prefers it)"),
    instances: int = typer.Option(1, help="model instances Triton runs"),
    kind: str = typer.Option("cpu", help="where the instances run: cpu or gpu"),
    backend: str = typer.Option("onnxruntime", help="onnxruntime (Triton's ONNX backend) or python (model.py "
                                                    "running onnxruntime; counts rows per exit as a metric)"),
    preferred_batch_sizes: Optional[str] = typer.Option(None, "--preferred-batch-sizes", help="batch sizes "
                                                        "dynamic batching aims for, e.g. 16,32,64 (default: "
                                                        "--max-batch-size)"),
    max_queue_delay_us: int = typer.Option(100, "--max-queue-delay-us", help="microseconds dynamic batching "
                                           "waits to fill a preferred batch"),
    staged: bool = typer.Option(False, "--staged", help="one model per stage of the plan (--backend: theirs) "
                                "and an entry model NAME (python, BLS) sending the continuing rows on, "
                                "batched across requests"),
    entry_instances: int = typer.Option(ENTRY_INSTANCES, "--entry-instances", help="--staged: instances of the "
                                        "entry model (each routes one call at a time)"),
    original: Optional[Path] = typer.Option(None, "--original", help="--staged, a build not laid out bucketed: "
                                            "the model it was compiled from (default: the one its report records)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP.format(what="model directory")),
) -> None:
    """Write BUILD_DIR as a model of a Triton model repository: NAME/config.pbtxt, NAME/1/model.onnx
    (with --staged: NAME and NAME_stage0, NAME_stage1, ...)."""
    from moco_compile.runtime.triton.repository import TritonSettings, export_triton
    from moco_compile.stage_models import export_triton_staged

    try:
        sizes = tuple(_batch_sizes(preferred_batch_sizes, "--preferred-batch-sizes")) if preferred_batch_sizes else ()
    except ValueError as error:
        _fail(error)
    try:
        settings = TritonSettings(max_batch_size, instances, kind, backend, sizes, max_queue_delay_us,
                                  entry_instances)
        if staged:
            targets = export_triton_staged(build_dir, repository, name, settings, force, original)
        else:
            targets = [export_triton(build_dir, repository, name, settings, force=force)]
    except (MocoError, OSError) as error:
        _fail(error)
    files = "config.pbtxt, 1/model.onnx" + (", 1/model.py" if backend == "python" else "")
    if staged:
        console.print(f"wrote {targets[0]} (entry: config.pbtxt, 1/model.py) and {len(targets) - 1} stage models "
                      f"{', '.join(target.name for target in targets[1:])} ({files})", highlight=False, soft_wrap=True)
    else:
        console.print(f"wrote {targets[0]}: {files}", highlight=False, soft_wrap=True)


@app.command("serve-triton")
def serve_triton_command(
    repository: Path = typer.Argument(..., help="Triton model repository ('moco export-triton --backend python')"),
    env: Path = typer.Option(..., "--env", help="Python environment with nvidia-pytriton==0.7.0, numpy<2 and "
                                                "onnxruntime"),
    http_port: int = typer.Option(8000, help="HTTP port on 127.0.0.1 (0: a free one)"),
    grpc_port: int = typer.Option(8001, help="gRPC port on 127.0.0.1 (0: a free one)"),
    metrics_port: int = typer.Option(8002, help="metrics port on 127.0.0.1 (0: a free one)"),
    timeout: float = typer.Option(120.0, help="seconds to wait for the server and its models to be ready"),
) -> None:
    """Serve REPOSITORY with nvidia-pytriton's tritonserver (python backend only) until Ctrl-C or SIGTERM."""
    import signal

    from moco_compile.runtime.triton.server import TritonServer

    # Ctrl-C and SIGTERM both stop the server (a shell that backgrounds the command ignores SIGINT for it)
    previous = {number: signal.signal(number, signal.default_int_handler) for number in (signal.SIGINT, signal.SIGTERM)}
    server = TritonServer(repository, env, http_port, grpc_port, metrics_port)
    try:
        server.start(timeout)
        console.print(f"serving {repository}: HTTP {server.address('http')}, gRPC {server.address('grpc')}, "
                      f"metrics {server.address('metrics')}; Ctrl-C stops", highlight=False, soft_wrap=True)
        status = server.wait()
    except KeyboardInterrupt:
        return
    except MocoError as error:
        _fail(error)
    finally:
        server.stop()
        for number, handler in previous.items():
            signal.signal(number, handler)
    _fail(MocoError(f"tritonserver exited with status {status} while serving; its last errors:\n{server.errors()}"))


@app.command("profile-target")
def profile_target_command(
    out: Path = typer.Option(..., "--out", help="the target profile to write (JSON), for `moco compile "
                             "--target-profile`"),
    providers: Optional[str] = typer.Option(None, "--providers", help="cpu or cuda (default: CUDA when this "
                                            "onnxruntime has it, else CPU); a GPU asked for but missing fails"),
    seconds: float = typer.Option(12.0, "--seconds", help="time budget of the measurements (longer: steadier)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP.format(what="target profile")),
) -> None:
    """Measure what an exit costs on this machine: its fixed time per batch, the dense compute rate
    at batch 1, 8, 64 and 256, and the bandwidth of copying rows."""
    from moco_compile.outputs import check_output_file
    from moco_compile.passes.planning.target import TargetProfile
    from moco_compile.runtime.profile_target import profile_target

    try:
        check_output_file(out, "target profile", "json", force=force)  # fail before measuring
        profile = TargetProfile.from_dict(profile_target(providers.split(",") if providers else None, seconds),
                                          "the measured profile")
        profile.to_json(out, force=force)
    except (MocoError, ValueError, OSError) as error:
        _fail(error)
    rates = ", ".join(f"{rate / 1e9:,.1f} at {batch}" for batch, rate in profile.flops_per_second.items())
    console.print(f"{escape(profile.name)} on {profile.provider} ({escape(profile.machine)}): an exit costs "
                  f"{profile.exit_fixed_seconds * 1e6:,.1f} us per batch; GFLOP/s by batch: {rates}; rows copy at "
                  f"{profile.copy_bytes_per_second / 1e9:,.1f} GB/s", highlight=False)
    console.print(f"wrote {out}; compile with --target {profile.kind} --target-profile {out}", highlight=False)


@app.command("profile-memory")
def profile_memory_command(
    model: Path = typer.Argument(..., help="ONNX model to profile"),
    out: Path = typer.Option(..., "--out", help="output directory (memory.json, memory.html)"),
    batch_sizes: str = typer.Option("1,8,64", "--batch-sizes", help="comma-separated batch sizes"),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz rows to run (needed when an input has a "
                                         "free dimension besides the batch, e.g. a sequence length)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP.format(what="output directory")),
) -> None:
    """Weights, estimated and measured peak activation memory of MODEL per batch size."""
    from moco_compile.calibration_data import load_npz
    from moco_compile.importer import load_onnx
    from moco_compile.memory.profile import check_profilable, profile_memory
    from moco_compile.memory.report import MIB, write_memory_outputs
    from moco_compile.outputs import check_output_dir

    try:
        sizes = _batch_sizes(batch_sizes)
        check_output_dir(out, [model, *([calib] if calib else [])], force)
        graph = load_onnx(model)
        check_profilable(graph)
        record = profile_memory(graph, sizes, load_npz(calib) if calib else None)
        write_memory_outputs(out, f"moco memory profile: {model.name}", record,
                             inputs=[model, *([calib] if calib else [])], force=force)
    except (MocoError, ValueError, OSError) as error:
        _fail(error)
    for b in record["batches"]:
        measured = "-" if b["measured_peak_bytes"] is None else f"{b['measured_peak_bytes'] / MIB:.2f} MiB"
        console.print(f"batch {b['batch_size']:>4}: weights {b['weight_bytes'] / MIB:.2f} MiB, peak activations "
                      f"estimated {b['estimated_peak_bytes'] / MIB:.2f} MiB, measured {measured} "
                      f"({escape(b['estimate_note'])})")
    console.print(f"wrote {out}/memory.json, memory.html")


@app.command("optimize-memory")
def optimize_memory_command(
    model: Path = typer.Argument(..., help="float ONNX classifier, or the output directory of 'moco compile' "
                                 "(the original is optimised and the build's exits put back on it)"),
    calib: Path = typer.Option(..., "--calib", help=f".npz with one array per model input (+ optional '{LABELS}'); "
                               "split into tuning and validation rows"),
    original: Optional[Path] = typer.Option(None, "--original", help="with a build directory: the model it was "
                                            "compiled from (default: the file compile recorded)"),
    out: Path = typer.Option(..., "--out", help="output directory (model.onnx, memory.json, memory.html)"),
    output: Optional[str] = typer.Option(None, "--output", help="classifier output name, if several (a build "
                                         "directory records its own)"),
    fp16: bool = typer.Option(False, "--fp16", help="store weights and compute in float16 (inputs/outputs stay "
                              "float32)"),
    int8: Optional[str] = typer.Option(None, "--int8", help="static (calibrated activations) or dynamic"),
    fuse: bool = typer.Option(False, "--fuse", help="save onnxruntime's offline graph fusions"),
    max_accuracy_drop: float = typer.Option(0.005, help="reject a step whose accuracy falls by more than this "
                                            "fraction (disagreement with the original when there are no labels)"),
    seed: int = typer.Option(0, help="seed of the tuning/validation split"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP.format(what="output directory")),
) -> None:
    """Shrink MODEL with float16 / int8 / fusions, validating each step on untouched rows."""
    from moco_compile.calibration_data import load_npz
    from moco_compile.importer import load_onnx
    from moco_compile.memory.optimize import optimize_build, optimize_memory
    from moco_compile.memory.report import write_memory_outputs
    from moco_compile.outputs import check_output_dir

    options = dict(float16=fp16, int8=int8, fuse=fuse, max_accuracy_drop=max_accuracy_drop, seed=seed)
    try:
        check_output_dir(out, [model, calib], force)
        if model.is_dir():
            result = optimize_build(model, load_npz(calib), original=original, **options)
        else:
            result = optimize_memory(load_onnx(model), load_npz(calib), output=output, **options)
        write_memory_outputs(out, f"moco memory optimisation: {model.name}", result.to_dict(), model=result.model,
                             inputs=[model, calib], force=force)
    except (MocoError, ValueError, OSError) as error:
        _fail(error)
    _print_steps(result.steps)
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    console.print(f"wrote {out}/model.onnx, memory.json, memory.html")


def _print_steps(steps: list[dict]) -> None:
    from rich.table import Table

    table = Table("step", "accuracy", "disagreement", "compute saved", "weights (MiB)", "peak b=64 est/meas (MiB)",
                  "latency b=1", "latency b=64")
    for s in steps:
        latency = s["latency_ratio"]
        measured = "-" if s["measured_peak_bytes"] is None else f"{s['measured_peak_bytes'] / 2**20:.2f}"
        table.add_row(s["step"], "-" if s["accuracy"] is None else f"{s['accuracy']:.2%}",
                      f"{s['disagreement']:.2%}",
                      "-" if s["compute_reduction"] is None else f"{s['compute_reduction']:.1%}",
                      f"{s['weight_bytes'] / 2**20:.2f}",
                      f"{s['estimated_peak_bytes'] / 2**20:.2f} / {measured}",
                      *(f"{latency[b]:.2f}x" if b in latency else "-" for b in ("1", "64")))
    console.print(table)


def _batch_sizes(text: str, option: str = "--batch-sizes") -> list[int]:
    """``option``'s comma-separated positive integers (ValueError naming ``option`` otherwise)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} takes comma-separated positive integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{option} takes comma-separated positive integers, got {text!r}")
    return sizes


def default_exit_layout(target: str | None, serving_batch: int | None) -> str | None:
    """The CPU layout for a known serving batch (None: the configuration's, nested): ``whole-batch`` for one
    row per batch (nothing to split, the fewest nodes per exit), ``flat`` for more (no If boundary: measured
    0.97-0.99x nested from batch 4 on, benchmarks/RESULTS.md "Exit layout"); GPU targets choose their own."""
    if serving_batch is None or (target or "cpu") != "cpu":
        return None
    return "whole-batch" if serving_batch == 1 else "flat"


def _batch_buckets(text: str) -> tuple[int, ...]:
    """``--batch-buckets`` as batch sizes, checked (positive, increasing, none repeated)."""
    from moco_compile.passes.planning.config import checked_buckets

    parts = [part.strip() for part in text.split(",")] if text.strip() else []
    if not all(part.isdigit() for part in parts):
        raise ValueError(f"--batch-buckets takes comma-separated whole numbers of rows, smallest first, e.g. "
                         f"{','.join(map(str, DEFAULT_BATCH_BUCKETS))}; got {text!r}")
    return checked_buckets(int(part) for part in parts)


def _calibration_data(source: str, engine: str, address: str | None, workers: int, max_rows: int | None = None,
                      seed: int = 0, model: Path | None = None):
    """The data ``--calib``/``--traffic`` names: what :func:`~moco_compile.calibration_data.load_calibration`
    reads (for ``model``), or shards for the Ray engine."""
    from moco_compile.calibration_data import load_calibration
    from moco_compile.calibration_text import is_text_calibration
    from moco_compile.scale.shards import ShardedData

    if engine == "local":
        return load_calibration(source, model)
    if engine == "ray":
        if is_text_calibration(source):
            raise MocoError(f"{source} holds texts, which the Ray engine does not tokenize: tokenize them into "
                            ".parquet/.npz shards, or compile with the local engine")
        return ShardedData(source, address, workers, max_rows=max_rows, seed=seed)
    raise MocoError(f"--engine must be 'local' or 'ray', got {engine!r}")


def _example_feed(imported, calibration) -> dict[str, np.ndarray]:
    """One row for the model's inputs: from ``calibration`` (what ``load_calibration`` read; texts and images
    are prepared for the model's inputs), else zeros where the inputs' shapes are fixed."""
    from moco_compile.calibration_data import CalibrationSpec, for_inputs

    spec = CalibrationSpec(imported.model, imported.num_classes)
    rows = for_inputs(calibration, imported.input_names)
    calibration = rows if rows is None or isinstance(rows, Mapping) else next(iter(rows))
    if calibration is not None:
        checked = spec.check(calibration, "calibration data")
        return {name: checked[name][:1] for name in spec.inputs}
    feed = {}
    for name, (dtype, shape) in spec.inputs.items():
        if any(dim is None for dim in shape[1:]):
            raise MocoError(f"input {name!r} has dynamic axes {list(shape)}: pass --calib so moco "
                            "can measure shapes on a real row")
        feed[name] = np.zeros((1, *shape[1:]), dtype)
    return feed


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="moco")


if __name__ == "__main__":
    sys.exit(main())
