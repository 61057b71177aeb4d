"""``moco moe``: trace an MoE model's routing, fit expert predictors, benchmark offloaded decoding.

    moco moe trace MODEL --text CALIB.txt --out trace/
    moco moe fit-predictors trace/ --out predictors/
    moco moe bench MODEL --predictors predictors/ --prompts PROMPTS.txt --out bench/

MODEL is a whole module saved with ``torch.save(model, path)`` whose class is importable
(loading it runs pickle: only load files you trust), shaped as ``runtime/moe/decode.py``
describes; tokens are UTF-8 bytes (a byte-level model such as the reference).  Instead of
MODEL, ``--reference moe_lm`` takes the reference moco ships
(:mod:`moco_compile.moe.reference_lm`), whose calibration text and prompts are then the
defaults of ``--text`` and ``--prompts``.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moco_compile.cli_common import FORCE_HELP, fail as _fail
from moco_compile.errors import MocoError
from moco_compile.moe.sources import input_path, load_torch_model, model_path, read_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Mixture-of-experts expert prefetching: trace routing, fit predictors, benchmark TPOT.")
console = Console()
TRACE, SPEC, GATES = "trace.arrow", "routing.json", "gates.npz"
PREDICTORS_NPZ, HIT_RATES = "predictors.npz", "hit_rates.json"
BENCH_JSON, BENCH_HTML = "bench.json", "report.html"
FORCE = typer.Option(False, "--force", help=FORCE_HELP.format(what="output directory"))
REFERENCE = typer.Option(None, "--reference", help="a reference model moco ships (moe_lm), instead of MODEL")


@contextmanager
def _progress(label: str, total: int):
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n=1: progress.advance(task, n)


@app.command("trace")
def trace_command(
    model: Optional[Path] = typer.Argument(None, help="MoE model saved with torch.save(model, path)"),
    reference: Optional[str] = REFERENCE,
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 calibration text (cut into windows of --window "
                                        "bytes; default with --reference: its calibration text)"),
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
        model, text = model_path(model, reference), input_path(text, reference, "calibration", "--text")
        check_output_dir(out, [model, text], force)
        torch.set_num_threads(1)
        loaded = load_torch_model(model)
        spec = routing_spec(loaded)
        data = np.frombuffer(read_bytes(text), dtype=np.uint8)
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
    max_rows: int = typer.Option(20_000, help="at most this many tokens fit each learned probe"),
    lookahead: Optional[int] = typer.Option(None, help="predict up to this many layers ahead, across tokens "
                                            "(default: the number of MoE layers, one token ahead)"),
    seed: int = typer.Option(0, help="seed of the held-out split and the row sample"),
    force: bool = FORCE,
) -> None:
    """Fit the predictors of the next layers' experts from layer l's hidden state; report their hit rates."""
    from moco_compile.frame import load_frame
    from moco_compile.moe.frame import RoutingSpec, check_trace
    from moco_compile.outputs import check_output_dir, staged_output_dir
    from moco_compile.moe.report import layer_labels
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
        lookahead = spec.num_layers if lookahead is None else lookahead
        if not 1 <= lookahead <= spec.num_layers:
            raise MocoError(f"--lookahead must be 1..{spec.num_layers} (at most one token ahead), got {lookahead}")
        with _progress("fitting probes", spec.num_layers * lookahead) as advance:
            predictors = fit_predictors(frame.take(~held), spec, gates, max_rows=max_rows, seed=seed,
                                        lookahead=lookahead, progress=advance)
        by_distance = [hit_rates(predictors, frame.take(held), distance) for distance in range(1, lookahead + 1)]
        flops = {name: predictors.flops(name) for name in PREDICTORS}
        with staged_output_dir(out, [trace], force) as stage:
            predictors.save(stage / PREDICTORS_NPZ)
            (stage / HIT_RATES).write_text(json.dumps({"held_out_tokens": int(held.sum()), "hit_rates": by_distance[0],
                                                       "by_distance": by_distance, "flops": flops}, indent=1) + "\n")
    except (MocoError, OSError) as error:
        _fail(error)
    table = Table("predictor", *layer_labels(spec.num_layers), "FLOPs",
                  title=f"hit rate (recall@{spec.top_k}) of the next layer on {int(held.sum()):,} held-out tokens")
    for name, values in by_distance[0].items():
        table.add_row(name, *[f"{v:.1%}" for v in values], f"{flops[name]:,.0f}")
    console.print(table)
    console.print(f"wrote {out}")


def _capacity(cache: float, num_experts: int) -> int:
    """``--cache``: a fraction of the experts (< 1) or a number of them."""
    return int(round(cache * num_experts)) if cache < 1 else int(cache)


@app.command("bench")
def bench_command(
    model: Optional[Path] = typer.Argument(None, help="MoE model saved with torch.save(model, path)"),
    reference: Optional[str] = REFERENCE,
    predictors: Path = typer.Option(..., "--predictors", help="output directory of `moco moe fit-predictors`"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="UTF-8 text file, one prompt per line (default "
                                           "with --reference: its prompt set)"),
    out: Path = typer.Option(..., "--out", help="output directory (bench.json, report.html)"),
    steps: int = typer.Option(32, help="tokens decoded greedily per prompt"),
    cache: float = typer.Option(0.5, help="device slots per layer: a fraction of the experts (< 1) or a number"),
    bandwidth: float = typer.Option(25.0, help="host-to-device link, GB/s (PCIe 4.0 x16 ~25)"),
    expert_mb: Optional[float] = typer.Option(None, "--expert-mb", help="bytes of one expert to transfer, in MB "
                                              "(default: the model's own experts)"),
    force: bool = FORCE,
) -> None:
    """Simulated TPOT of greedy decoding: all resident, on-demand, LRU cache, the offline optimum, LRU + prefetch
    and predictive caching per predictor."""
    import torch

    from moco_compile.moe.bench import decode_routing, expert_bytes, measured_timing, tpot_table
    from moco_compile.moe.report import bench_page
    from moco_compile.moe.trace import routing_spec
    from moco_compile.outputs import check_output_dir, staged_output_dir
    from moco_compile.passes.moe.expert_predictors import FittedPredictors
    from moco_compile.runtime.moe.expert_cache import check_capacity

    try:
        model, prompts = model_path(model, reference), input_path(prompts, reference, "prompts", "--prompts")
        check_output_dir(out, [model, predictors, prompts], force)
        if steps < 1 or bandwidth <= 0 or (expert_mb is not None and expert_mb <= 0):
            raise MocoError("--steps must be at least 1, --bandwidth and --expert-mb positive")
        torch.set_num_threads(1)
        loaded = load_torch_model(model)
        fitted = FittedPredictors.load(predictors / PREDICTORS_NPZ)
        fitted.spec.check(routing_spec(loaded), "predictors")
        capacity = _capacity(cache, fitted.spec.num_experts)
        check_capacity(capacity, fitted.spec.num_experts, fitted.spec.top_k)
        tokens = [list(line) for line in read_bytes(prompts).splitlines() if line.strip()]
        size = expert_mb * 1e6 if expert_mb is not None else expert_bytes(loaded)
        try:
            with _progress("decoding", steps * len(tokens)) as advance:
                routing = decode_routing(loaded, tokens, steps, advance)
        except IndexError as error:  # a position past the model's context
            raise MocoError(f"decoding failed ({error}): a prompt plus --steps {steps} tokens may exceed the "
                            "model's context; give shorter prompts or fewer --steps") from error
        timing, costs = measured_timing(loaded, tokens[:4], steps, fitted, size / (bandwidth * 1e9))
        rows = tpot_table(routing, fitted, timing, capacity, costs)
        rates = json.loads((predictors / HIT_RATES).read_text())
        settings = {"prompts": len(tokens), "tokens per prompt": steps, "cache slots per layer": capacity,
                    "experts per layer": fitted.spec.num_experts, "link GB/s": bandwidth,
                    "expert MB": round(size / 1e6, 4), "transfer ms per expert": 1e3 * timing.transfer_seconds}
        with staged_output_dir(out, [model, predictors, prompts], force) as stage:
            (stage / BENCH_JSON).write_text(json.dumps({"settings": settings, "tpot": rows, "predictor_seconds":
                                                        {name: asdict(cost) for name, cost in costs.items()}},
                                                       indent=1) + "\n")
            (stage / BENCH_HTML).write_text(bench_page(rates["hit_rates"], rates["flops"], rows, settings))
    except (MocoError, OSError, ValueError) as error:
        _fail(error)
    table = Table("policy", "TPOT ms", "cache hits", "vs on-demand", "vs LRU", "of the gap LRU -> optimum",
                  title="simulated TPOT")
    for row in rows:
        hits = "-" if row["hit_rate"] is None else f"{row['hit_rate']:.1%}"
        gap = "-" if row["gap_closed"] is None else f"{row['gap_closed']:.0%}"
        table.add_row(row["policy"], f"{row['tpot_ms']:.3f}", hits, f"{row['reduction_vs_on_demand']:.1%}",
                      f"{row['reduction_vs_lru']:.1%}", gap)
    console.print(table)
    console.print(f"wrote {out}/{BENCH_JSON}, {BENCH_HTML}")
