"""Benchmark: certified compute reduction against calibration-set size, moco vs a max-softmax baseline.

    python benchmarks/bench_calibration_size.py [--models fashion_resnet minilm6_tweets]
        [--sizes 300 500 1000 2000 5000] [--draws 5 [N per model]] [--budgets 0.01 0.02] [--no-write]

Each model is calibrated once over a pool of rows (``benchmarks/draws.py``: the reference CNN's
10,000 shipped calibration images + the official 10,000-image test split; ``minilm6_tweets``'s
6,000 calibration + 4,000 test rows).  For every calibration size, ``--draws`` seeded random draws
of that many pool rows are compiled (everything ``compile`` does but the ONNX rewrite:
``plan_exits`` with the default ``PlannerConfig`` and ``allow_no_exit=True``) and, on the same
draw, the baseline: a softmax probe per cut on half of the rows, one shared max-probability
threshold certified Learn-then-Test on the other half at the same confidence
(``draws.shared_threshold_baseline``).  Both are measured on the pool rows the draw did not take
(moco's routing and FLOP count).  Writes the section "Calibration size: moco vs a max-softmax
baseline" of ``benchmarks/RESULTS.md`` and ``benchmarks/calibration_size.png``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import draws as d  # noqa: E402
from benchmarks.results import machine_description, write_section  # noqa: E402
from moco_compile.passes.planning.config import Budget  # noqa: E402

HERE = Path(__file__).resolve().parent
TITLE = "Calibration size: moco vs a max-softmax baseline"
PNG = HERE / "calibration_size.png"


def run(pool: d.Pool, sizes: list[int], draws: int, budgets: list[float], confidence: float, scratch: Path,
        bar, task) -> dict:
    """Per (size, budget): a list of per-draw {"moco": record, "baseline": record}."""
    results: dict = {}
    for size in sizes:
        for index in range(draws):
            sample = d.draw(len(pool), size, index)
            for budget_value in budgets:
                budget = Budget(budget_value, confidence)
                moco = d.moco_outcome(scratch, pool, sample, budget)
                poolings = moco["poolings"] or d.default_poolings(pool)
                key = {"kind": "baseline", "model": pool.name, "pool_rows": len(pool), "size": size,
                       "index": index, "budget": budget_value, "confidence": confidence, "poolings": poolings}
                baseline = d.cached(scratch, key, lambda: d.shared_threshold_baseline(pool, sample, budget, poolings))
                results.setdefault((size, budget_value), []).append({"moco": moco, "baseline": baseline})
                bar.update(task, advance=1, note=f"{pool.name} n={size} draw {index} {100 * budget_value:g}%: "
                           f"moco {100 * moco['compute_reduction']:.1f}% "
                           f"baseline {100 * baseline['compute_reduction']:.1f}%")
    return results


MEASURES = {"compute_reduction": "FLOPs (prefix + rules)",
            "overhead_compute_reduction": "FLOPs + exit overhead (what moco plans for)"}


def table(pool: d.Pool, results: dict, sizes: list[int], budget: float, key: str) -> list[str]:
    lines = ["| calibration rows | moco: compute reduction, median (min-max) | baseline: median (min-max) | "
             "moco - baseline per draw, median (min-max) | moco >= baseline | draws with exits: moco / baseline | "
             "max realized disagreement: moco / baseline |",
             "|---|---|---|---|---|---|---|"]
    for size in sizes:
        rows = results[size, budget]
        moco = np.array([r["moco"][key] for r in rows])
        base = np.array([r["baseline"][key] for r in rows])
        diff = moco - base
        lines.append(
            f"| {size:,} | {d.median_range(moco)} | {d.median_range(base)} | "
            f"{100 * np.median(diff):+.1f} pp ({100 * diff.min():+.1f} to {100 * diff.max():+.1f}) | "
            f"{int((diff >= 0).sum())}/{len(rows)} | "
            f"{sum(r['moco']['exits'] > 0 for r in rows)}/{len(rows)} / "
            f"{sum(r['baseline']['exits'] > 0 for r in rows)}/{len(rows)} | "
            f"{d.percent(max(r['moco']['disagreement'] for r in rows), 2)} / "
            f"{d.percent(max(r['baseline']['disagreement'] for r in rows), 2)} |")
    return lines


def heads_table(results: dict, sizes: list[int], budget: float) -> list[str]:
    """Per size, how many draws certified both head sets and kept MLP heads in the plan (issue 28 item 5:
    small sets fall back to the softmax probes when the richer heads do not pay)."""
    lines = ["| calibration rows | both head sets certified | plan keeps MLP heads | "
             "plan's exits with an MLP head / all exits |", "|---|---|---|---|"]
    for size in sizes:
        rows = [r["moco"] for r in results[size, budget]]
        lines.append(f"| {size:,} | {sum(r['head_sets'] > 1 for r in rows)}/{len(rows)} | "
                     f"{sum(r['mlp_exits'] > 0 for r in rows)}/{len(rows)} | "
                     f"{sum(r['mlp_exits'] for r in rows)} / {sum(r['exits'] for r in rows)} |")
    return lines


def verdict(all_results: dict, sizes: list[int], budgets: list[float],
            key: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """(cells where moco's median < the baseline's, cells where the median per-draw difference is
    negative, 300-row cells where the baseline found exits and moco did not, a sentence per
    model/budget on the smallest size)."""
    behind, behind_paired, missing, smallest = [], [], [], []
    for name, results in all_results.items():
        for budget in budgets:
            for size in sizes:
                rows = results[size, budget]
                moco = np.median([r["moco"][key] for r in rows])
                base = np.median([r["baseline"][key] for r in rows])
                if moco < base:
                    behind.append(f"{name} {100 * budget:g}% n={size:,} ({100 * moco:.1f}% vs {100 * base:.1f}%)")
                paired = np.median([r["moco"][key] - r["baseline"][key] for r in rows])
                if paired < 0:
                    behind_paired.append(f"{name} {100 * budget:g}% n={size:,} ({100 * paired:+.2f} pp)")
            rows = results[min(sizes), budget]
            lost = sum(r["baseline"]["exits"] > 0 and r["moco"]["exits"] == 0 for r in rows)
            if lost:
                missing.append(f"{name} {100 * budget:g}%: {lost}/{len(rows)} draws")
            smallest.append(f"{name} at {100 * budget:g}%, {min(sizes):,} rows: moco found exits in "
                            f"{sum(r['moco']['exits'] > 0 for r in rows)}/{len(rows)} draws, the baseline in "
                            f"{sum(r['baseline']['exits'] > 0 for r in rows)}/{len(rows)}")
    return behind, behind_paired, missing, smallest


def plot(pools: dict, all_results: dict, sizes: list[int], budgets: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(all_results), len(budgets), figsize=(5.2 * len(budgets), 4.0 * len(all_results)),
                             squeeze=False, sharex=True)
    for row, (name, results) in enumerate(all_results.items()):
        for col, budget in enumerate(budgets):
            ax = axes[row][col]
            for method, colour, label in (("moco", "tab:blue", "moco (default planner)"),
                                          ("baseline", "tab:orange", "max-softmax, shared t, LTT on half")):
                values = [100 * np.array([r[method]["compute_reduction"] for r in results[size, budget]])
                          for size in sizes]
                charged = [100 * np.median([r[method]["overhead_compute_reduction"] for r in results[size, budget]])
                           for size in sizes]
                ax.plot(sizes, [np.median(v) for v in values], "o-", color=colour, label=f"{label}: median")
                ax.plot(sizes, charged, "s--", color=colour, alpha=0.7, label="median, exit overhead charged")
                ax.fill_between(sizes, [v.min() for v in values], [v.max() for v in values], color=colour,
                                alpha=0.18, label="min-max over draws")
                for size, v in zip(sizes, values):
                    ax.scatter(np.full(len(v), size), v, s=8, color=colour, alpha=0.6)
            d.size_axis(ax, sizes)
            ax.set_title(f"{name}, budget {100 * budget:g}% (95% confidence)")
            ax.set_ylabel("compute reduction on undrawn rows (%)")
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(PNG, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(d.MODELS), default=list(d.MODELS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 500, 1000, 2000, 5000])
    parser.add_argument("--draws", type=int, nargs="+", default=[5],
                        help="random calibration draws per size: one number, or one per model")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.02])
    d.add_draw_arguments(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    pools = {name: d.load_pool(name, args.scratch) for name in args.models}
    if len(args.draws) not in (1, len(args.models)):
        parser.error(f"--draws takes one number or one per model ({len(args.models)}), got {len(args.draws)}")
    draws = dict(zip(args.models, args.draws * len(args.models) if len(args.draws) == 1 else args.draws))
    all_results = {}
    with d.progress() as bar:
        task = bar.add_task("calibration draws", total=sum(draws.values()) * len(args.sizes) * len(args.budgets),
                            note="")
        for name, pool in pools.items():
            all_results[name] = run(pool, args.sizes, draws[name], args.budgets, args.confidence, args.scratch, bar,
                                    task)
    seconds = time.perf_counter() - started

    lines = [f"Command: `{d.command_line('bench_calibration_size.py')}`",
             f"Machine: {machine_description()} ({d.run_time(seconds)}; planner at {d.code_state()})", "",
             "For each model, one pool of rows is calibrated once; the calibration draws are seeded random "
             "subsets of the pool of each size (how many per size: see each table). **moco**: `plan_exits` on the drawn rows exactly as "
             "`compile` runs it (default `PlannerConfig`, `allow_no_exit=True`; only the ONNX rewrite and its "
             "verification are left out). **Baseline** (a plain max-softmax threshold certified on a single split "
             "of half the rows, Learn-then-Test): a softmax probe per cut (moco's `SoftmaxRuleFitter`, on the "
             "pooled features moco's candidate uses at that cut in that draw) fitted on one half of the drawn "
             "rows to predict the full model's class; one shared max-probability threshold over all cuts (a row "
             "leaves at the first cut whose max probability >= t); 400 thresholds from the fitting half's max "
             "probabilities, strictest first, tested in that order on the other half by the fixed-sequence exact "
             f"binomial test at the full {100 * args.confidence:g}%. The comparison is paired: the baseline's test "
             "half is drawn from the rows moco certifies on (it is exactly those rows whenever moco splits half and "
             "half, as from 1,000 rows), so the difference is the method's, not the luck of the split. Both use "
             "moco's routing and FLOP count (`route_scores`, `stage_costs`: the prefix plus the rule of every exit "
             "reached) and are measured on **the pool rows the draw did not take** (compute reduction and realized "
             "disagreement with the full model). Two measures: **FLOPs** alone, and **FLOPs + exit overhead**, "
             "where every built exit a row reaches also costs the overhead moco plans with (`PlannerConfig."
             "boundary_cost` = 100 FLOP-equivalents per cut-tensor element: the copy of continuing rows and layout "
             "changes an exit costs in onnxruntime). moco optimises the second, which is what a deployment pays; "
             "the baseline opens every cut whatever it costs.", ""]
    for name, pool in pools.items():
        lines += [f"### {name}", "",
                  f"Model: {pool.model}, {pool.total_flops / 1e6:.1f} MFLOPs per {pool.unit}, {len(pool.cuts)} cuts. "
                  f"Pool: {len(pool):,} rows, {pool.rows}; full-model accuracy on the pool "
                  f"{100 * (pool.predictions == pool.labels).mean():.2f}%.", ""]
        for budget in args.budgets:
            for key, measure in MEASURES.items():
                lines += [f"Budget {100 * budget:g}% disagreement, {100 * args.confidence:g}% confidence "
                          f"({draws[name]} draws per size), compute reduction in {measure}:", ""] + \
                    table(pool, all_results[name], args.sizes, budget, key) + [""]
            lines += [f"Budget {100 * budget:g}%, exit heads (MLP heads are tried at every size; cross-validation "
                      "on the design rows decides, and both sets are certified at half the error rate each when it "
                      "cannot and the test rows are enough):", ""] + \
                heads_table(all_results[name], args.sizes, budget) + [""]
    target = ("Target: moco >= the baseline at every size and budget, and a plan with exits at "
              f"{min(args.sizes):,} rows where the baseline finds one.")
    lines += ["### Verdict", "", target, ""]
    cells = len(args.sizes) * len(args.budgets) * len(pools)
    for key, measure in MEASURES.items():
        behind, behind_paired, missing, smallest = verdict(all_results, args.sizes, args.budgets, key)
        lines += [f"In {measure}: " + ("**met** on medians: moco's median is at least the baseline's in every cell."
                                       if not behind else f"**not met** on medians in {len(behind)} of {cells} "
                                       "cells: " + "; ".join(behind) + ".") + " Paired (median of the per-draw "
                  "differences, the comparison this design is built for): " + (
                      "moco >= the baseline in every cell." if not behind_paired else
                      f"behind in {len(behind_paired)} of {cells} cells: " + "; ".join(behind_paired) + "."), ""]
    second = ("At the smallest size moco has exits in every draw where the baseline does. " if not missing else
              "At the smallest size the baseline found exits where moco did not: " + "; ".join(missing) + ". ") + \
        "; ".join(smallest) + "."
    lines += [second, "", f"![compute reduction vs calibration size]({PNG.name})"]
    print("\n".join(lines))
    if not args.no_write:
        plot(pools, all_results, args.sizes, args.budgets)
        write_section(TITLE, "\n".join(lines))


if __name__ == "__main__":
    main()
