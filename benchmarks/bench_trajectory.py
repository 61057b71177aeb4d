"""Benchmark: trajectory features, an exit reading the earlier exits' scores for the same row (issue 28, item 2).

    python benchmarks/bench_trajectory.py [--models fashion_resnet minilm6_rt] [--budgets 0.01 0.02] [--no-write]

For each reference and budget, on ``bench_rule_quality.py``'s footing (compile's split of the calibration
rows, the pooling variant moco picks per cut, moco's softmax probes cross-fitted on the rules rows,
``ExitPlanner`` design and certification at the same budget, the model's evaluation rows):

* probes: moco's softmax probe at every cut (``bench_rule_quality`` checks that this rebuild gives
  compile's plan);
* trajectory, previous cut: the probe at cut k fitted on the cut's pooled features and the previous
  cut's probe log-probabilities;
* trajectory, every earlier cut: the same with the log-probabilities of every earlier cut's probe;
* ensemble, previous cut / every earlier cut: nothing fitted, the cut's probe log-probabilities averaged
  with the previous cut's, or every earlier cut's (an ensemble of the exits so far).

A trajectory probe is cross-fitted like every rule, on the earlier probes' out-of-fold scores (on the
test and evaluation rows: the earlier probes fitted on all rules rows), and planned and certified
exactly as the probes.  Its FLOPs count its extra inputs (``2 * C`` per earlier score) but not the earlier
probes it reads where the plan leaves them closed: an upper bound on what trajectory features can give.
Writes the section "Trajectory features (earlier exits' scores)" of ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_rule_quality as rq  # noqa: E402
from benchmarks.results import machine_description, write_section  # noqa: E402
from benchmarks.rule_quality_report import CONFIG, MOCO_FITTER  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.api import calibrate_frame  # noqa: E402
from moco_compile.constants import SPLIT_COLUMN  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.calibration.calibrate import cut_column  # noqa: E402
from moco_compile.passes.calibration.pooling import pooling_cost  # noqa: E402
from moco_compile.passes.calibration.rules import SoftmaxRuleFitter, out_of_fold_scores  # noqa: E402
from moco_compile.passes.planning.config import Budget  # noqa: E402
from moco_compile.passes.planning.counts import Split  # noqa: E402
from moco_compile.passes.planning.planner import ExitPlanner  # noqa: E402
from moco_compile.passes.planning.routing import route_scores  # noqa: E402
from moco_compile.passes.planning.types import Exit  # noqa: E402
from moco_compile.prepare import cut_points_of  # noqa: E402

PARTS = ("design", "test", "eval")
METHODS = {"probes": lambda k: [],
           "trajectory, previous cut": lambda k: [k - 1] if k else [],
           "trajectory, every earlier cut": lambda k: list(range(k))}
# no fitting: the exit's log-probabilities averaged with the earlier cuts' (an ensemble of internal classifiers)
ENSEMBLES = {"ensemble, previous cut": lambda k: [k - 1] if k else [],
             "ensemble, every earlier cut": lambda k: list(range(k))}


def trajectory_fits(here: rq.Shared, cuts, variants: list[str], base: list[dict], earlier_of, classes: int
                    ) -> tuple[list[dict], np.ndarray]:
    """Per cut: scores on the design (out-of-fold), test and evaluation rows of a softmax probe on the cut's
    features and the ``earlier_of(k)`` cuts' probe log-probabilities; and each probe's extra FLOPs."""
    targets = here.predictions["design"]
    fits, extra = [], []
    for k, (cut, variant) in enumerate(zip(cuts, variants)):
        earlier = earlier_of(k)
        if not earlier:
            fits.append(base[k])
            extra.append(0.0)
            continue
        features = here.data.features(cut_column(cut), variant)
        inputs = {part: np.concatenate([features["rules" if part == "design" else part]]
                                       + [base[j][part] for j in earlier], axis=1) for part in PARTS}
        fitter = SoftmaxRuleFitter()
        scores = fitter.fit(inputs["design"], targets, classes)
        fits.append({"design": out_of_fold_scores(fitter, inputs["design"], targets, classes, CONFIG.cross_fit_folds),
                     "test": scores(inputs["test"]), "eval": scores(inputs["eval"])})
        extra.append(2.0 * classes * classes * len(earlier))
    return fits, np.array(extra)


def ensemble_scores(base: list[dict], earlier_of, classes: int) -> tuple[list[dict], np.ndarray]:
    """Per cut: the mean of its probe's log-probabilities and the ``earlier_of(k)`` cuts' (design rows: their
    out-of-fold scores), and the extra FLOPs of the mean."""
    fits, extra = [], []
    for k in range(len(base)):
        cuts = [*earlier_of(k), k]
        fits.append({part: np.mean([base[j][part] for j in cuts], axis=0) for part in PARTS})
        extra.append(float(classes * (len(cuts) - 1)))
    return fits, np.array(extra)


def plan_and_measure(here: rq.Shared, cuts, variants: list[str], base: list[dict], fits: list[dict],
                     extra: np.ndarray, budget: float, classes: int, total_flops: float) -> dict:
    """Plan and certify ``fits`` as moco plans its probes; the plan's figures on the evaluation rows."""
    candidates = [Exit(cut, cut_column(cut), variant, base[k]["scores"], np.full(classes, np.inf),
                       pooling_cost(cut.shape, variant) + base[k]["scores"].flops + 2 * classes + extra[k])
                  for k, (cut, variant) in enumerate(zip(cuts, variants))]
    planner = ExitPlanner(Budget(budget, 0.95), CONFIG, 0)
    plan = planner.fit(candidates, Split([f["design"] for f in fits], here.predictions["design"], here.labels["design"]),
                       Split([f["test"] for f in fits], here.predictions["test"], here.labels["test"]), total_flops)
    position = {cut.tensor: k for k, cut in enumerate(cuts)}
    built = [position[e.cut.tensor] for e in plan.exits]
    routing = route_scores([fits[k]["eval"] for k in built], np.array([e.thresholds for e in plan.exits]).reshape(
        len(built), classes), None, CONFIG.rounding, len(here.predictions["eval"]))
    full = here.predictions["eval"]
    compiled = np.where(routing.exit_index >= 0, routing.exit_class, full)
    labels = here.labels["eval"]
    return {"exits": len(plan.exits), "family": plan.certificate["family"],
            "compute_reduction": float(1 - plan.row_flops(routing.exit_index).mean() / total_flops),
            "disagreement": float((compiled != full).mean()),
            "accuracy_change": float((compiled == labels).mean() - (full == labels).mean())}


def run_model(name: str, budgets: list[float], scratch: Path) -> tuple[rq.Workload, dict]:
    """Every method at every budget on one reference: ``{(budget, method): figures}``."""
    scratch.mkdir(parents=True, exist_ok=True)
    workload = rq.WORKLOADS[name](scratch)
    for frame_file in ("calib.arrow", "test.arrow"):  # calibrate_frame refuses to overwrite a file
        (scratch / frame_file).unlink(missing_ok=True)
    calib = calibrate_frame(workload.onnx_path, workload.calibration, scratch / "calib.arrow",
                            batch_size=rq.BATCH_SIZE, show_progress=False).in_memory()
    evaluation = calibrate_frame(workload.onnx_path, workload.evaluation, scratch / "test.arrow",
                                 batch_size=rq.BATCH_SIZE, show_progress=False).in_memory()
    imported = import_model(workload.onnx_path)
    classes = imported.num_classes
    _, cuts = cut_points_of(imported, workload.calibration, rq.BATCH_SIZE)
    total_flops = cuts[0].flops_before + cuts[0].flops_after
    features, figures = rq.Features(calib, evaluation), {}
    for budget in budgets:
        result = compile(workload.onnx_path, workload.calibration, max_disagreement=budget, planner_config=CONFIG,
                         batch_size=rq.BATCH_SIZE, measure_latency=False, show_progress=False)
        here = rq.shared_for(np.asarray(result.frame[SPLIT_COLUMN]), features, calib, evaluation, classes, {})
        variants = here.fits.moco_variants(cuts, budget)
        base = [here.fits.get(MOCO_FITTER, cut_column(cut), variant) for cut, variant in zip(cuts, variants)]
        for method, earlier_of in {**METHODS, **ENSEMBLES}.items():
            fits, extra = trajectory_fits(here, cuts, variants, base, earlier_of, classes) if method in METHODS \
                else ensemble_scores(base, earlier_of, classes)
            figures[budget, method] = plan_and_measure(here, cuts, variants, base, fits, extra, budget, classes,
                                                       total_flops)
            print(name, budget, method, figures[budget, method], flush=True)
        probes = figures[budget, "probes"]
        if probes["exits"] != len(result.plan.exits):
            print(f"warning: the probes' rebuilt plan has {probes['exits']} exits, compile's "
                  f"{len(result.plan.exits)}", flush=True)
    return workload, figures


def section(results: dict[str, tuple[rq.Workload, dict]], budgets: list[float], minutes: float) -> str:
    lines = ["Command: `python benchmarks/bench_trajectory.py`",
             f"Machine: {machine_description()} (run took {minutes:.1f} min)", "",
             "Softmax probes at every cut (moco's, rebuilt as `bench_rule_quality.py` rebuilds them) against the "
             "same probes fitted on the cut's pooled features plus the log-probabilities of the previous cut's probe, "
             "or of every earlier cut's; cross-fitted, planned and certified by moco's `ExitPlanner` at the same "
             "budget, 95% confidence, and measured on the evaluation rows. A trajectory probe's FLOPs count its extra "
             "inputs but not the earlier probes it reads where the plan leaves them closed: an upper bound on what "
             "trajectory features give. The ensembles fit nothing: an exit's score is the mean of its probe's "
             "log-probabilities and the earlier cuts' (the same upper bound on their cost).", ""]
    for name, (workload, figures) in results.items():
        lines += [f"### {name}", "", f"Model: {workload.model}. Evaluation: {workload.evaluation_rows}.", "",
                  "| budget | method | exits | family | compute reduction | disagreement | accuracy change |",
                  "|---|---|---|---|---|---|---|"]
        for budget in budgets:
            for method in {**METHODS, **ENSEMBLES}:
                f = figures[budget, method]
                lines.append(f"| {budget:.1%} | {method} | {f['exits']} | {f['family']} | "
                             f"{f['compute_reduction']:.1%} | {f['disagreement']:.2%} | "
                             f"{100 * f['accuracy_change']:+.2f} pp |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fashion_resnet", "minilm6_rt"], choices=list(rq.WORKLOADS))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.01, 0.02])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/moco_trajectory"))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    started = time.perf_counter()
    results = {name: run_model(name, args.budgets, args.scratch / name) for name in args.models}
    body = section(results, args.budgets, (time.perf_counter() - started) / 60)
    print(body)
    if not args.no_write:
        write_section("Trajectory features (earlier exits' scores)", body)


if __name__ == "__main__":
    main()
