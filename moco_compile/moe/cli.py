"""``moco moe``: trace an MoE model's routing, fit expert predictors, benchmark offloaded decoding.

    moco moe trace MODEL --text CALIB.txt --out trace/
    moco moe fit-predictors trace/ --out predictors/
    moco moe bench MODEL --predictors predictors/ --prompts PROMPTS.txt --out bench/

MODEL is a whole module saved with ``torch.save(model, path)`` whose class is importable
(loading it runs pickle: only load files you trust), shaped as ``runtime/moe/decode.py``
describes; tokens are UTF-8 bytes (a byte-level model such as ``models/moe_lm.py``).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moco_compile.cli_common import FORCE_HELP, fail as _fail
from moco_compile.errors import MocoError, ModelError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Mixture-of-experts expert prefetching: trace routing, fit predictors, benchmark TPOT.")
console = Console()
TRACE, SPEC, GATES = "trace.arrow", "routing.json", "gates.npz"
PREDICTORS_NPZ, HIT_RATES = "predictors.npz", "hit_rates.json"
BENCH_JSON, BENCH_HTML = "bench.json", "report.html"
FORCE = typer.Option(False, "--force", help=FORCE_HELP.format(what="output directory"))




def load_torch_model(path: Path):
    """The module ``torch.save(model, path)`` wrote, in eval mode (:class:`ModelError` otherwise)."""
    import torch

    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # pickle raises anything: wrap it with what to do
        raise ModelError(f"could not load {path} as a torch module ({type(error).__name__}: {error}); save the "
                         "whole model with torch.save(model, path), with its class importable here") from error
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{path} holds a {type(model).__name__}, not a torch module; save the whole model with "
                         "torch.save(model, path)")
    return model.eval()


def _read_text(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MocoError(f"cannot read {path}: {error}") from error
    if not data.strip():
        raise MocoError(f"{path} is empty; give a UTF-8 text file")
    return data


@contextmanager
def _progress(label: str, total: int):
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n=1: progress.advance(task, n)


@app.command("trace")
def trace_command(
    model: Path = typer.Argument(..., help="MoE model saved with torch.save(model, path)"),
    text: Path = typer.Option(..., "--text", help="UTF-8 calibration text (cut into windows of --window bytes)"),
    out: Path = typer.Option(..., "--out", help="output directory (trace.arrow, routing.json, gates.npz)"),
    window: int = typer.Option(64, help="tokens per calibration window"),
    max_windows: int = typer.Option(2000, help="at most this many windows (from the start of the text)"),
    force: bool = FORCE,
) -> None:
    """Record per token and layer the hidden state entering each MoE layer and the experts chosen."""
    import torch

    from moco_compile.moe.trace import gate_parameters, routing_spec, trace_routing
    from moco_compile.outputs import check_output_dir, staged_output_dir

    try:
        check_output_dir(out, [model, text], force)
        torch.set_num_threads(1)
        loaded = load_torch_model(model)
        spec = routing_spec(loaded)
        data = np.frombuffer(_read_text(text), dtype=np.uint8)
        if window < 2 or len(data) < window:
            raise MocoError(f"--window must be at least 2 and at most the text's {len(data)} bytes, got {window}")
        windows = data[:len(data) // window * window].reshape(-1, window)[:max_windows]
        with staged_output_dir(out, [model, text], force) as stage, _progress("tracing", len(windows)) as advance:
            frame = trace_routing(loaded, windows, stage / TRACE, progress=advance)
            spec.save(stage / SPEC)
            with open(stage / GATES, "wb") as stream:
                np.savez(stream, **gate_parameters(loaded))
            rows = len(frame)
    except (MocoError, OSError) as error:
        _fail(error)
    console.print(f"wrote {out}: {rows:,} tokens x {spec.num_layers} MoE layers ({spec.num_experts} experts, "
                  f"top-{spec.top_k})")


@app.command("fit-predictors")
def fit_predictors_command(
    trace: Path = typer.Argument(..., help="output directory of `moco moe trace`"),
    out: Path = typer.Option(..., "--out", help="output directory (predictors.npz, hit_rates.json)"),
    held_out: float = typer.Option(0.2, help="fraction of the trace's windows kept out of fitting to measure "
                                             "hit rates"),
    max_rows: int = typer.Option(20_000, help="at most this many tokens fit the learned estimator"),
    seed: int = typer.Option(0, help="seed of the held-out split and the row sample"),
    force: bool = FORCE,
) -> None:
    """Fit the predictors of layer l+1's experts from layer l's hidden state; report their hit rates."""
    from moco_compile.frame import load_frame
    from moco_compile.moe.frame import RoutingSpec, check_trace
    from moco_compile.outputs import check_output_dir, staged_output_dir
    from moco_compile.passes.moe.expert_predictors import PREDICTORS, fit_predictors, held_out_windows, hit_rates

    try:
        check_output_dir(out, [trace], force)
        if not 0 < held_out < 1:
            raise MocoError(f"--held-out must be in (0, 1), got {held_out}")
        spec = RoutingSpec.load(trace / SPEC)
        frame = load_frame(trace / TRACE)
        check_trace(frame, spec)
        with np.load(trace / GATES) as saved:
            gates = {key: saved[key] for key in saved.files}
        held = held_out_windows(frame, held_out, seed)
        with _progress("fitting layers", spec.num_layers - 1) as advance:
            predictors = fit_predictors(frame.take(~held), spec, gates, max_rows=max_rows, seed=seed,
                                        progress=advance)
        rates = hit_rates(predictors, frame.take(held))
        flops = {name: predictors.flops(name) for name in PREDICTORS}
        with staged_output_dir(out, [trace], force) as stage:
            predictors.save(stage / PREDICTORS_NPZ)
            (stage / HIT_RATES).write_text(json.dumps({"held_out_tokens": int(held.sum()), "hit_rates": rates,
                                                       "flops": flops}, indent=1) + "\n")
    except (MocoError, OSError) as error:
        _fail(error)
    table = Table("predictor", *[f"layer {t}" for t in range(1, spec.num_layers)], "FLOPs",
                  title=f"hit rate (recall@{spec.top_k}) on {int(held.sum()):,} held-out tokens")
    for name, values in rates.items():
        table.add_row(name, *[f"{v:.1%}" for v in values], f"{flops[name]:,.0f}")
    console.print(table)
    console.print(f"wrote {out}")


def _capacity(cache: float, num_experts: int) -> int:
    """``--cache``: a fraction of the experts (< 1) or a number of them."""
    return int(round(cache * num_experts)) if cache < 1 else int(cache)


@app.command("bench")
def bench_command(
    model: Path = typer.Argument(..., help="MoE model saved with torch.save(model, path)"),
    predictors: Path = typer.Option(..., "--predictors", help="output directory of `moco moe fit-predictors`"),
    prompts: Path = typer.Option(..., "--prompts", help="UTF-8 text file, one prompt per line"),
    out: Path = typer.Option(..., "--out", help="output directory (bench.json, report.html)"),
    steps: int = typer.Option(32, help="tokens decoded greedily per prompt"),
    cache: float = typer.Option(0.5, help="device slots per layer: a fraction of the experts (< 1) or a number"),
    bandwidth: float = typer.Option(25.0, help="host-to-device link, GB/s (PCIe 4.0 x16 ~25)"),
    expert_mb: Optional[float] = typer.Option(None, "--expert-mb", help="bytes of one expert to transfer, in MB "
                                              "(default: the model's own experts)"),
    force: bool = FORCE,
) -> None:
    """Simulated TPOT of greedy decoding: all resident, on-demand, LRU cache, LRU + prefetch per predictor."""
    import torch

    from moco_compile.moe.bench import decode_routing, expert_bytes, measured_timing, tpot_table
    from moco_compile.moe.report import bench_page
    from moco_compile.moe.trace import routing_spec
    from moco_compile.outputs import check_output_dir, staged_output_dir
    from moco_compile.passes.moe.expert_predictors import FittedPredictors
    from moco_compile.runtime.moe.expert_cache import check_capacity

    try:
        check_output_dir(out, [model, predictors, prompts], force)
        if steps < 1 or bandwidth <= 0 or (expert_mb is not None and expert_mb <= 0):
            raise MocoError("--steps must be at least 1, --bandwidth and --expert-mb positive")
        torch.set_num_threads(1)
        loaded = load_torch_model(model)
        fitted = FittedPredictors.load(predictors / PREDICTORS_NPZ)
        fitted.spec.check(routing_spec(loaded), "predictors")
        capacity = _capacity(cache, fitted.spec.num_experts)
        check_capacity(capacity, fitted.spec.num_experts, fitted.spec.top_k)
        text_lines = _read_text(prompts).decode("utf-8", "replace").splitlines()
        tokens = [list(line.encode("utf-8")) for line in text_lines if line.strip()]
        size = expert_mb * 1e6 if expert_mb is not None else expert_bytes(loaded)
        try:
            with _progress("decoding", steps * len(tokens)) as advance:
                routing = decode_routing(loaded, tokens, steps, advance)
        except IndexError as error:  # a position past the model's context
            raise MocoError(f"decoding failed ({error}): a prompt plus --steps {steps} tokens may exceed the "
                            "model's context; give shorter prompts or fewer --steps") from error
        timing, predictor_seconds = measured_timing(loaded, tokens[:4], steps, fitted, size / (bandwidth * 1e9))
        rows = tpot_table(routing, fitted, timing, capacity, predictor_seconds)
        rates = json.loads((predictors / HIT_RATES).read_text())
        settings = {"prompts": len(tokens), "tokens per prompt": steps, "cache slots per layer": capacity,
                    "experts per layer": fitted.spec.num_experts, "link GB/s": bandwidth,
                    "expert MB": round(size / 1e6, 4), "transfer ms per expert": 1e3 * timing.transfer_seconds}
        with staged_output_dir(out, [model, predictors, prompts], force) as stage:
            (stage / BENCH_JSON).write_text(json.dumps({"settings": settings, "tpot": rows,
                                                        "predictor_seconds": predictor_seconds}, indent=1) + "\n")
            (stage / BENCH_HTML).write_text(bench_page(rates["hit_rates"], rates["flops"], rows, settings))
    except (MocoError, OSError, ValueError) as error:
        _fail(error)
    table = Table("policy", "TPOT ms", "cache hits", "vs on-demand", "vs LRU", title="simulated TPOT")
    for row in rows:
        hits = "-" if row["hit_rate"] is None else f"{row['hit_rate']:.1%}"
        table.add_row(row["policy"], f"{row['tpot_ms']:.3f}", hits, f"{row['reduction_vs_on_demand']:.1%}",
                      f"{row['reduction_vs_lru']:.1%}")
    console.print(table)
    console.print(f"wrote {out}/{BENCH_JSON}, {BENCH_HTML}")
