"""Benchmark: which plan families the planner should build, on the same random calibration draws.

    python benchmarks/bench_plan_families.py [--models fashion_resnet minilm6_tweets] [--size 4000 5000]
        [--draws 10 6] [--budgets 0.01 0.02 0.03] [--no-write]

For each model, one pool of rows is calibrated once (``benchmarks/draws.py``); each draw is a seeded random
subset of ``--size`` pool rows, planned by ``plan_exits`` as ``compile`` runs it with the first
configuration of :data:`CONFIGS`; the other configurations plan the same draw on the same candidates and
splits (``ExitPlanner.fit``: only which families are built and how one is chosen differ), so every
difference between configurations is the families', paired draw by draw.  Every figure is measured on the
pool rows the draw did not take: compute reduction in FLOPs (prefix + rules) and with moco's exit overhead
charged (what moco plans for), realized disagreement with the full model.

Why it exists: the rule-quality tables (``bench_rule_quality.py``, one split per budget) had one threshold
per cut (a max-softmax baseline) ahead of moco's families on the 3-class text reference by up to 4.4
points; whether a ``"per-cut"`` family closes that gap on repeated draws, and what choosing among more
families costs elsewhere, is measured here.  Writes the section "Plan families on repeated draws" of
``benchmarks/RESULTS.md``.
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
from moco_compile.passes.planning.config import Budget, DEFAULT_FAMILIES, PlannerConfig  # noqa: E402

TITLE = "Plan families on repeated draws"
REFERENCE = f"{', '.join(DEFAULT_FAMILIES)} (cross-validated choice)"
WITH_PER_CUT = DEFAULT_FAMILIES[:-1] + ("per-cut",) + DEFAULT_FAMILIES[-1:]  # per-cut before per-class, as in FAMILIES
CONFIGS = {
    REFERENCE: PlannerConfig(families=DEFAULT_FAMILIES),
    f"{', '.join(WITH_PER_CUT)} (cross-validated choice)": PlannerConfig(families=WITH_PER_CUT),
    "per-cut only": PlannerConfig(families=("per-cut",)),
    "shared-all only": PlannerConfig(families=("shared-all",)),
}
MEASURES = {"compute_reduction": "FLOPs (prefix + rules)",
            "overhead_compute_reduction": "FLOPs + exit overhead (what moco plans for)"}


def draw_record(pool: d.Pool, sample: d.Draw, budget: Budget) -> dict:
    """Per configuration, moco's record of the draw (the first configuration plans it, the others reuse
    its candidates and splits)."""
    configs = list(CONFIGS.items())
    base = d.plan_draw(pool, sample, budget, configs[0][1])
    records = {configs[0][0]: d.moco_record(pool, sample, budget, base)}
    for name, config in configs[1:]:
        records[name] = d.moco_record(pool, sample, budget, d.plan_with(pool, sample, budget, config, base))
    return records


def table(records: list[dict], key: str, budget: float) -> list[str]:
    lines = ["| families | compute reduction, median (min-max) | minus the first row per draw, median (min-max) | "
             ">= the first row | family certified (draws) | realized disagreement mean / max | over budget |",
             "|---|---|---|---|---|---|---|"]
    reference = np.array([r[REFERENCE][key] for r in records])
    for name in CONFIGS:
        values = np.array([r[name][key] for r in records])
        diff = values - reference
        disagreement = np.array([r[name]["disagreement"] for r in records])
        chosen: dict[str, int] = {}
        for r in records:
            chosen[r[name]["family"] or "none"] = chosen.get(r[name]["family"] or "none", 0) + 1
        lines.append(f"| {name} | {d.median_range(values)} | {100 * np.median(diff):+.1f} pp "
                     f"({100 * diff.min():+.1f} to {100 * diff.max():+.1f}) | {int((diff >= 0).sum())}/{len(records)} | "
                     + ", ".join(f"{f} {n}" for f, n in sorted(chosen.items())) + " | "
                     f"{d.percent(disagreement.mean(), 2)} / {d.percent(disagreement.max(), 2)} | "
                     f"{int((disagreement > budget).sum())} |")
    return lines


def verdict(results: dict[tuple[str, float], list[dict]]) -> list[str]:
    """Per configuration, its paired difference to the first row over every model, budget and draw
    (with exit overhead charged: what moco plans for)."""
    lines = []
    for name in list(CONFIGS)[1:]:
        diff = 100 * np.concatenate([[r[name]["overhead_compute_reduction"] - r[REFERENCE]["overhead_compute_reduction"]
                                      for r in records] for records in results.values()])
        lines.append(f"- {name}: {np.median(diff):+.1f} pp median per draw vs the first row ({diff.min():+.1f} to "
                     f"{diff.max():+.1f}), ahead in {int((diff > 0).sum())}, behind in {int((diff < 0).sum())} of "
                     f"{len(diff)} (model, budget, draw) cells.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(d.MODELS), default=list(d.MODELS))
    parser.add_argument("--size", type=int, nargs="+", default=[4000, 5000],
                        help="calibration rows per draw: one number, or one per model")
    parser.add_argument("--draws", type=int, nargs="+", default=[10, 6],
                        help="random calibration draws: one number, or one per model")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.02, 0.03])
    d.add_draw_arguments(parser)
    args = parser.parse_args()
    for option in ("size", "draws"):
        if len(getattr(args, option)) not in (1, len(args.models)):
            parser.error(f"--{option} takes one number or one per model ({len(args.models)})")
    per_model = {name: (args.size[i % len(args.size)], args.draws[i % len(args.draws)])
                 for i, name in enumerate(args.models)}
    started = time.perf_counter()
    pools = {name: d.load_pool(name, args.scratch) for name in args.models}
    results: dict[tuple[str, float], list[dict]] = {}
    with d.progress() as bar:
        task = bar.add_task("plan families", note="",
                            total=sum(draws for _, draws in per_model.values()) * len(args.budgets))
        for name, pool in pools.items():
            size, draws = per_model[name]
            for index in range(draws):
                sample = d.draw(len(pool), size, index)
                for budget_value in args.budgets:
                    budget = Budget(budget_value, args.confidence)
                    key = {"kind": "families", "model": name, "pool_rows": len(pool), "size": size, "index": index,
                           "budget": budget_value, "confidence": args.confidence,
                           "configs": {n: d.config_key(c) for n, c in CONFIGS.items()}}
                    record = d.cached(args.scratch, key, lambda: draw_record(pool, sample, budget))
                    results.setdefault((name, budget_value), []).append(record)
                    bar.update(task, advance=1, note=f"{name} draw {index} {100 * budget_value:g}%")
    seconds = time.perf_counter() - started

    lines = [f"Command: `{d.command_line('bench_plan_families.py')}`",
             f"Machine: {machine_description()} ({d.run_time(seconds)}; planner at {d.code_state()})", "",
             "Each draw is a seeded random subset of a model's pool, planned by `plan_exits` as `compile` runs it "
             f"at {100 * args.confidence:g}% confidence with the families of the first row; the other rows "
             "plan the same draw on the same candidates and splits, so the differences are the families' (paired "
             "per draw). A family list of more than one is narrowed to one by cross-validation on the design rows "
             "(the simplest within one corrected standard error of the best), then certified at the full "
             "confidence. Figures on the pool rows the draw did not take."]
    for name, pool in pools.items():
        size, draws = per_model[name]
        lines += ["", f"### {name}", "", f"Model: {pool.model}, {pool.total_flops / 1e6:.1f} MFLOPs per {pool.unit}, "
                  f"{len(pool.cuts)} cuts. Pool: {len(pool):,} rows, {pool.rows}. {draws} draws of {size:,} rows."]
        for budget_value in args.budgets:
            for key, measure in MEASURES.items():
                lines += ["", f"Budget {100 * budget_value:g}%, compute reduction in {measure}:", ""]
                lines += table(results[name, budget_value], key, budget_value)
    lines += ["", "### Verdict", ""] + verdict(results)
    print("\n".join(lines))
    if not args.no_write:
        write_section(TITLE, "\n".join(lines))


if __name__ == "__main__":
    main()
