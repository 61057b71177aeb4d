"""Benchmark: how much of the achievable compute the certificate keeps (bound efficiency).

    python benchmarks/bench_bound_efficiency.py [--sizes 1000 2000 4000 10000] [--draws 10]
        [--budget 0.01] [--config-sizes 4000 10000] [--no-write]

Reference CNN, one pool of 20,000 rows (the shipped calibration images + the official test split,
calibrated once, ``benchmarks/draws.py``).  For every calibration size, ``--draws`` seeded random
draws are planned by ``plan_exits`` as ``compile`` runs it, and measured on the pool rows the draw
did not take:

* certified: the compute reduction of the plan moco certified;
* oracle: the plan tuned on those evaluation rows to exactly the budget.  Every family moco builds
  on that draw's design rows (both, as ``PlannerConfig(family_selection="bonferroni")`` builds them
  on the same candidates and splits) is routed over the evaluation rows, and the plan with the
  highest compute reduction whose disagreement there is <= the budget is the oracle: what a perfect
  test (one that knew the true disagreement of every plan) would keep from the same families;
* ratio certified / oracle, and the spread (max - min over draws) of the certified compute.

At ``--config-sizes`` the same draws are also planned with other ``PlannerConfig`` settings (family
choice, test fraction, one family only) to explain the defaults with figures; configurations that
split the rows as the default does reuse its candidates (``ExitPlanner.fit`` on the same splits).
Writes the section "Bound efficiency (reference CNN)" of ``benchmarks/RESULTS.md`` and
``benchmarks/bound_efficiency.png``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import draws as d  # noqa: E402
from benchmarks.results import machine_description, write_section  # noqa: E402
from moco_compile.passes.planning.config import Budget, DEFAULT_FAMILIES, FAMILIES, PlannerConfig  # noqa: E402
from moco_compile.passes.planning.pipeline import Planning  # noqa: E402

HERE = Path(__file__).resolve().parent
TITLE = "Bound efficiency (reference CNN)"
PNG = HERE / "bound_efficiency.png"
MODEL = "fashion_resnet"
DEFAULT = "default: one family chosen by repeated cross-validation on the design rows, test 50%"
BONFERRONI = PlannerConfig(family_selection="bonferroni")
CONFIGS = {
    DEFAULT: PlannerConfig(),
    f"every default family certified, Bonferroni (delta/{len(DEFAULT_FAMILIES)} each)": BONFERRONI,
    "test_fraction 0.3": PlannerConfig(test_fraction=0.3),
    "test_fraction 0.6": PlannerConfig(test_fraction=0.6),
    "shared-all family only": PlannerConfig(families=("shared-all",)),
    "shared family only": PlannerConfig(families=("shared",)),
    "per-class family only": PlannerConfig(families=("per-class",)),
}


def with_oracle(pool: d.Pool, sample: d.Draw, budget: Budget, planning: Planning,
                config: PlannerConfig = PlannerConfig()) -> dict:
    """moco's record of ``planning`` (planned with ``config``) plus the oracle over every family
    built on its design rows."""
    record = d.moco_record(pool, sample, budget, planning)
    if planning.candidates is None:
        return {**record, "oracle": None}
    every_family = replace(config, families=FAMILIES, family_selection="bonferroni")
    planner, _ = d.refit_planner(pool, sample, planning, budget, every_family)
    curves = d.family_curves(pool, planning, planner.families_, sample.evaluation)
    record["oracle"] = d.oracle(curves, budget.max_disagreement)
    certificate = planning.plan.certificate
    if planning.plan.exits:  # the certified plan is one of the curves' plans: same routing, same figures
        on_curve = curves[certificate["family"]].reductions[certificate["chosen_plan"]]
        if not np.isclose(on_curve, record["compute_reduction"]):
            raise RuntimeError(f"certified plan measures {record['compute_reduction']} but {on_curve} on its family")
        record["oracle"]["certified_plan"] = certificate["chosen_plan"]
    return record


def draw_record(pool: d.Pool, sample: d.Draw, budget: Budget, configs: dict[str, PlannerConfig],
                scratch: Path) -> dict:
    """Per configuration: moco's record with its own oracle (the families built on its own design rows)."""
    started = time.perf_counter()
    planning = d.plan_draw(pool, sample, budget)
    seconds = time.perf_counter() - started
    default = with_oracle(pool, sample, budget, planning)
    d.store(scratch, d.moco_key(pool, sample, budget),  # moco's plain record of this draw, for the other scripts
            {**{k: v for k, v in default.items() if k != "oracle"}, "seconds": seconds})
    records = {}
    for name, config in configs.items():
        if name == DEFAULT:
            records[name] = default
            continue
        other = d.plan_with(pool, sample, budget, config, planning)
        records[name] = with_oracle(pool, sample, budget, other, config) if other.split is not planning.split else \
            {**d.moco_record(pool, sample, budget, other), "oracle": default["oracle"]}
    return records


def summary_row(label: str, records: list[dict], budget: float) -> str:
    records = [r for r in records if r["oracle"] is not None]  # None: too few rows to fit candidates
    certified = np.array([r["compute_reduction"] for r in records])
    oracle = np.array([r["oracle"]["compute_reduction"] for r in records])
    ratio = certified / oracle
    disagreement = np.array([r["disagreement"] for r in records])
    return (f"| {label} | {len(records)} | {d.median_range(certified)} | {d.median_range(oracle)} | "
            f"{np.median(ratio):.3f} ({ratio.min():.3f}-{ratio.max():.3f}) | "
            f"{100 * (certified.max() - certified.min()):.1f} | {d.percent(disagreement.mean(), 2)} / "
            f"{d.percent(disagreement.max(), 2)} | {int((disagreement > budget).sum())} |")


HEADER = ["| {} | draws | certified compute reduction, median (min-max) | oracle, median (min-max) | "
          "certified / oracle, median (min-max) | spread of certified (points) | realized disagreement mean / max "
          "| draws over budget |", "|---|---|---|---|---|---|---|---|"]


def plot(results: dict, sizes: list[int], config_results: dict, config_sizes: list[int], budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if config_sizes:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1, 1.25]})
    else:  # no configuration comparison this run
        fig, left = plt.subplots(figsize=(6.5, 4.6))
    for key, colour, label in (("certified", "tab:blue", "certified (moco default)"),
                               ("oracle", "tab:green", "oracle (best plan within budget on the evaluation rows)")):
        values = [100 * np.array([r["compute_reduction"] if key == "certified" else r["oracle"]["compute_reduction"]
                                  for r in results[size]]) for size in sizes]
        left.plot(sizes, [np.median(v) for v in values], "o-", color=colour, label=f"{label}: median")
        left.fill_between(sizes, [v.min() for v in values], [v.max() for v in values], color=colour, alpha=0.18)
        for size, v in zip(sizes, values):
            left.scatter(np.full(len(v), size), v, s=8, color=colour, alpha=0.6)
    d.size_axis(left, sizes)
    left.set_ylabel("compute reduction on undrawn rows (%)")
    left.set_title(f"Reference CNN, budget {100 * budget:g}%: certified vs oracle (band: min-max)")
    lowest = min(min(r["compute_reduction"] for r in results[size]) for size in sizes)
    left.set_ylim(bottom=100 * lowest - 3)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="upper left")

    if config_sizes:
        _plot_configs(right, config_results, config_sizes)
    fig.tight_layout()
    fig.savefig(PNG, dpi=120)
    plt.close(fig)


def _plot_configs(right, config_results: dict, config_sizes: list[int]) -> None:
    names = list(CONFIGS)
    width = 0.8 / len(config_sizes)
    for j, size in enumerate(config_sizes):
        ratios = [np.array([r["compute_reduction"] / r["oracle"]["compute_reduction"]
                            for r in (draw[name] for draw in config_results[size])]) for name in names]
        positions = np.arange(len(names)) + (j - (len(config_sizes) - 1) / 2) * width
        right.boxplot(ratios, positions=positions, widths=width * 0.8, patch_artist=True,
                      boxprops={"facecolor": f"C{j}", "alpha": 0.4}, medianprops={"color": "black"})
        right.plot([], [], color=f"C{j}", lw=6, alpha=0.4, label=f"{size:,} rows")
    right.set_xticks(np.arange(len(names)))
    right.set_xticklabels([n.split(":")[0].replace("every default family certified, ", "") for n in names], rotation=20,
                          ha="right", fontsize=8)
    right.axhline(0.85, color="grey", ls="--", lw=1)
    right.set_ylabel("certified / oracle of its own families")
    right.set_title("Planner configurations on the same draws")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 10000])
    parser.add_argument("--draws", type=int, default=10, help="random calibration draws per size")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--config-sizes", type=int, nargs="*", default=[4000, 10000],
                        help="sizes at which the planner configurations are compared")
    d.add_draw_arguments(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    pool = d.load_pool(MODEL, args.scratch)
    budget = Budget(args.budget, args.confidence)
    sizes = sorted(set(args.sizes) | set(args.config_sizes))
    results: dict[int, list[dict]] = {}
    with d.progress() as bar:
        task = bar.add_task("bound efficiency", total=len(sizes) * args.draws, note="")
        for size in sizes:
            configs = CONFIGS if size in args.config_sizes else {DEFAULT: CONFIGS[DEFAULT]}
            for index in range(args.draws):
                sample = d.draw(len(pool), size, index)
                key = {"kind": "efficiency", "model": pool.name, "pool_rows": len(pool), "size": size,
                       "index": index, "budget": budget.max_disagreement, "confidence": budget.confidence,
                       "configs": {name: d.config_key(c) for name, c in configs.items()}}
                record = d.cached(args.scratch, key, lambda: draw_record(pool, sample, budget, configs, args.scratch))
                results.setdefault(size, []).append(record)
                r = record[DEFAULT]
                bar.update(task, advance=1, note=f"n={size} draw {index}: certified {100 * r['compute_reduction']:.1f}%"
                           f" oracle {100 * r['oracle']['compute_reduction']:.1f}%")
    seconds = time.perf_counter() - started

    default_runs = {size: [r[DEFAULT] for r in results[size]] for size in sizes}
    config_runs = {size: results[size] for size in args.config_sizes}
    lines = [f"Command: `{d.command_line('bench_bound_efficiency.py')}`",
             f"Machine: {machine_description()} ({d.run_time(seconds)}; planner at {d.code_state()})", "",
             f"Model: {pool.model}, {pool.total_flops / 1e6:.1f} MFLOPs per {pool.unit}. Pool: {len(pool):,} rows, "
             f"{pool.rows}, calibrated once. Each calibration draw is a seeded random subset of the pool "
             f"({args.draws} per size), planned by `plan_exits` as `compile` runs it (only the ONNX rewrite is left "
             f"out), budget {100 * args.budget:g}% disagreement at {100 * args.confidence:g}% confidence. Every "
             "figure is measured on the pool rows the draw did not take. **Oracle**: every plan of every family "
             "moco builds on that draw's design rows (`ExitPlanner(budget, PlannerConfig(family_selection="
             "\"bonferroni\")).fit` on the same candidates and splits; the default planner certifies one of them) "
             "routed over the evaluation rows; the oracle is the one with the highest compute reduction whose "
             "disagreement there is <= the budget: what a test that knew every plan's true disagreement would "
             "keep. So certified / oracle measures what the statistics (test split size, fixed-sequence test, "
             "family choice) cost, not how good the families are. Spread = max - min of the certified compute "
             "reduction over the draws. Compute reduction counts FLOPs as moco does (prefix + the rule of every "
             "exit reached; the planning overhead term is not charged).", "",
             "Default planner, by calibration size:", "", HEADER[0].format("calibration rows"), HEADER[1]]
    lines += [summary_row(f"{size:,}", default_runs[size], args.budget) for size in sizes]
    for size in args.config_sizes:
        lines += ["", f"Planner configurations on the same {args.draws} draws of {size:,} rows (ratio to the oracle of "
                  "each configuration's own design rows: configurations that split the rows differently build "
                  "their own families):", "", HEADER[0].format("configuration"), HEADER[1]]
        lines += [summary_row(name, [draw[name] for draw in config_runs[size]], args.budget) for name in CONFIGS]
        families = {}
        for draw in config_runs[size]:
            families[draw[DEFAULT]["family"]] = families.get(draw[DEFAULT]["family"], 0) + 1
        lines += ["", f"Family the default certified at {size:,} rows: "
                  + ", ".join(f"{name} in {count}/{args.draws} draws" for name, count in sorted(families.items()))
                  + "; the oracle's family: " + ", ".join(
                      f"{name} in {count}/{args.draws}" for name, count in sorted(
                          {f: sum(r[DEFAULT]["oracle"]["family"] == f for r in config_runs[size])
                           for f in {r[DEFAULT]["oracle"]["family"] for r in config_runs[size]}}.items())) + "."]

    verdict = ["", "### Verdict", ""]
    if 10_000 in default_runs:
        ratio = np.median([r["compute_reduction"] / r["oracle"]["compute_reduction"] for r in default_runs[10_000]])
        verdict.append(f"Target >= 0.85 of the oracle at 10,000 rows: median ratio {ratio:.3f}, "
                       + ("**met**." if ratio >= 0.85 else "**not met**."))
    if 4000 in default_runs:
        values = [r["compute_reduction"] for r in default_runs[4000]]
        spread = 100 * (max(values) - min(values))
        verdict.append(f"Target spread under 8 points at 4,000 rows: {spread:.1f} points over {len(values)} draws, "
                       + ("**met**." if spread < 8 else "**not met**."))
    lines += verdict + ["", f"![certified vs oracle compute reduction]({PNG.name})"]
    print("\n".join(lines))
    if not args.no_write:
        plot(default_runs, sizes, config_runs, args.config_sizes, args.budget)
        write_section(TITLE, "\n".join(lines))


if __name__ == "__main__":
    main()
