"""Benchmark: the "patience" plan family (leave when two exits in a row agree) against the default families.

    python benchmarks/bench_patience.py [--models fashion_resnet minilm6_rt] [--budget 0.01] [--no-write]

Each model's calibration rows are planned by ``plan_exits`` as ``compile`` plans them (seed 0), once per
configuration of :data:`CONFIGS`: the default families (cross-validated choice; ``"patience"`` is one),
the same without ``"patience"``, and ``"patience"`` alone.  Per configuration: the family
certified, its exits, the compute reduction the certificate measured on the test split, and the
compute reduction and disagreement with the full model on the model's own test rows (never seen
by planning; FLOPs, prefix + rules).  With a family list, each family's held-out saving on the
design rows' folds (what the choice reads: planning cost, mean and standard deviation over the
folds).  Pools are calibrated once and cached (``benchmarks/draws.py``).  Writes the section
"Patience family (agreement across exits)" of ``benchmarks/RESULTS.md``.
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
from moco_compile.passes.planning.counts import Split  # noqa: E402
from moco_compile.passes.planning.pipeline import plan_exits  # noqa: E402
from moco_compile.passes.planning.planner import ExitPlanner  # noqa: E402
from moco_compile.passes.planning.splits import SPLITS  # noqa: E402

TITLE = "Patience family (agreement across exits)"
WITHOUT_PATIENCE = tuple(family for family in DEFAULT_FAMILIES if family != "patience")
CONFIGS = {
    f"default ({', '.join(DEFAULT_FAMILIES)})": PlannerConfig(),
    f"without patience ({', '.join(WITHOUT_PATIENCE)})": PlannerConfig(families=WITHOUT_PATIENCE),
    "patience only": PlannerConfig(families=("patience",)),
}


def model_rows(pool: d.Pool, budget: Budget) -> tuple[list[str], dict[str, list[float]]]:
    """The table rows of one model, and the cross-validated savings per family of the richest list."""
    calibration, test = np.flatnonzero(pool.origin == 0), np.flatnonzero(pool.origin == 1)
    frame = pool.frame.take(calibration)
    rows, savings = [], {}
    for name, config in CONFIGS.items():
        planning = plan_exits(frame, pool.cuts, pool.num_classes, pool.total_flops, budget, config, seed=0)
        evaluation = d.evaluate_plan(pool, planning.plan, test)
        certificate = planning.plan.certificate
        if config.families == DEFAULT_FAMILIES:
            savings = _fold_savings(planning, pool, calibration, budget, config)
        rows.append(f"| {name} | {certificate['family']} | {len(planning.plan.exits)} | "
                    f"{d.percent(certificate['test_compute_reduction'], 2)} ({certificate['test_rows']:,} rows) | "
                    f"{d.percent(evaluation.compute_reduction, 2)} | {d.percent(evaluation.disagreement, 2)} |")
    return rows, savings


def _fold_savings(planning, pool: d.Pool, calibration: np.ndarray, budget: Budget,
                  config: PlannerConfig) -> dict[str, list[float]]:
    """Each family's held-out savings on the design rows' folds.  With MLP heads the plan's planner tried
    only the family the softmax probes chose, so the probes' choice is designed again here, as
    ``pipeline._design`` did (same rows, seed and config)."""
    savings = planning.planner.family_savings_
    if len(savings) == len(config.families) or planning.candidates.probes_only is None:
        return savings
    probes = planning.candidates.probes_only
    design = calibration[planning.split == SPLITS.index("rules")]
    planner = ExitPlanner(budget, config, seed=0)
    planner.design(probes.exits, Split(probes.design_scores, pool.predictions[design], pool.labels[design],
                                       probes.design_guard),
                   planning.plan.certificate["test_rows"], pool.total_flops)
    return planner.family_savings_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fashion_resnet", "minilm6_rt"])
    parser.add_argument("--budget", type=float, default=0.01)
    d.add_draw_arguments(parser)
    args = parser.parse_args()
    budget = Budget(args.budget, args.confidence)
    started = time.perf_counter()
    sections = []
    for name in args.models:
        pool = d.load_pool(name, args.scratch)
        rows, savings = model_rows(pool, budget)
        folds = ", ".join(f"{family} {100 * np.mean(values):.1f}% (sd {100 * np.std(values, ddof=1):.1f})"
                          for family, values in savings.items())
        sections += ["", f"### {name}", "",
                     f"Model: {pool.model}, {pool.total_flops / 1e6:.1f} MFLOPs per {pool.unit}. Rows: {pool.rows}; "
                     f"planned on the {int((pool.origin == 0).sum()):,} calibration rows, measured on the "
                     f"{int((pool.origin == 1).sum()):,} test rows.", "",
                     "| families | certified family | exits | certified plan on the test split | compute reduction, "
                     "test rows | disagreement, test rows |", "|---|---|---|---|---|---|", *rows, "",
                     f"Held-out saving per family on the design rows' folds (planning cost; "
                     f"{len(next(iter(savings.values())))} folds): {folds}."]
    lines = [f"Command: `{d.command_line('bench_patience.py')}`",
             f"Machine: {machine_description()} (run took {(time.perf_counter() - started) / 60:.1f} min; planner "
             f"at {d.code_state()})", "",
             f"Budget {100 * args.budget:g}% disagreement at {100 * args.confidence:g}% confidence. `patience`: one "
             "log-probability threshold on the exits backward elimination keeps (as `shared`), routed with "
             "agreement: past the first open exit a row leaves only when its top log-probability clears the "
             "threshold and its top class is the one it had at the open exit before (the first open exit fires "
             "on its threshold alone); certified like every family, rows whose class at either exit is tied "
             "within rounding counted against the budget.", *sections]
    print("\n".join(lines))
    if not args.no_write:
        write_section(TITLE, "\n".join(lines))


if __name__ == "__main__":
    main()
