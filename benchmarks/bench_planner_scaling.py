"""Benchmark: compile time against the number of candidate cuts, and what the scalable planner gives up.

    python benchmarks/bench_planner_scaling.py [--blocks 6 16] [--budget 0.01] [--no-write]

Models: the reference CNN (7 cuts) and deeper ResNets of the same recipe
(``models/train_fashion_resnet.py``, widths 8/16/32, ``--blocks`` basic blocks per stage,
trained 2 epochs on the 50,000 training images; weights cached in ``--scratch``): 6 blocks
give 18 cuts, 16 blocks 47.  Each is compiled end to end (``moco_compile.compile``, the
shipped 10,000 calibration images, default ``PlannerConfig``) and timed by stage; then the
exhaustive search (every exit tried at every elimination round, ``"per-class"`` from every
candidate: ``PlannerConfig(elimination_candidates=None, per_class_candidates=10**6)``) plans
the same frame with the same seed, on models of at most ``--exhaustive-cuts`` cuts (it takes
hours beyond).  Both plans are evaluated on the official 10,000-image test split.
Writes "Planner scaling" in ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import machine_description, write_section  # noqa: E402
from models.export_fashion_resnet import ONNX_PATH, load_calibration  # noqa: E402
from models.fashion_mnist import load_split  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.api import calibrate_frame  # noqa: E402
from moco_compile.constants import PREDICTIONS  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.calibration.calibrate import variant_features  # noqa: E402
from moco_compile.passes.planning import pipeline as planning  # noqa: E402
from moco_compile.passes.planning.config import Budget, PlannerConfig  # noqa: E402
from moco_compile.prepare import cut_points_of  # noqa: E402

EXHAUSTIVE = PlannerConfig(elimination_candidates=None, per_class_candidates=10 ** 6)
WIDTHS = (8, 16, 32)
EPOCHS = 2


def deep_resnet(blocks: int, scratch: Path) -> Path:
    """The recipe's ResNet with ``blocks`` blocks per stage, trained briefly and exported (cached)."""
    import torch

    from models.fashion_resnet import FashionResNet
    from models.train_fashion_resnet import train

    weights, onnx_path = scratch / f"deep{blocks}.pt", scratch / f"deep{blocks}.onnx"
    if not weights.exists():
        torch.set_num_threads(1)
        model, _ = train(EPOCHS, WIDTHS, blocks_per_stage=blocks)
        torch.save(model.state_dict(), weights)
    if not onnx_path.exists():
        model = FashionResNet(WIDTHS, blocks)
        model.load_state_dict(torch.load(weights, weights_only=True))
        program = torch.onnx.export(model.eval(), (torch.rand(2, 1, 28, 28),), dynamo=True, input_names=["images"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(str(onnx_path))
    return onnx_path


class StageTimer:
    """Seconds spent in ``plan_exits``'s stages during one compile (wraps the module's functions)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        return timed


def evaluate(plan, test_frame) -> tuple[float, float]:
    evaluation = plan.evaluate([variant_features(test_frame, e.column, e.pooling) for e in plan.exits],
                               test_frame[PREDICTIONS])
    return evaluation.compute_reduction, evaluation.disagreement


def measure(name: str, onnx_path: Path, calibration: dict, test: dict, budget: Budget, exhaustive_cuts: int,
            scratch: Path) -> dict:
    timer = StageTimer()
    fit_candidates = planning.fit_candidates
    stages = [(planning.ExitPlanner, "design"), (planning.RowCounter, "count"), (planning.ExitPlanner, "certify")]
    originals = [getattr(owner, method) for owner, method in stages]
    planning.fit_candidates = timer.wrap("fit rules", fit_candidates)
    for (owner, method), function in zip(stages, originals):  # design, count the test rows, certify
        setattr(owner, method, timer.wrap("plan", function))
    try:
        started = time.perf_counter()
        result = compile(onnx_path, calibration, max_disagreement=budget.max_disagreement, measure_latency=False,
                         show_progress=False)
        total = time.perf_counter() - started
    finally:
        planning.fit_candidates = fit_candidates
        for (owner, method), function in zip(stages, originals):
            setattr(owner, method, function)
    test_path = scratch / f"{name}_test.arrow"
    test_path.unlink(missing_ok=True)
    test_frame = calibrate_frame(onnx_path, test, test_path, show_progress=False).in_memory()
    imported = import_model(onnx_path)
    _, cuts = cut_points_of(imported, {"images": calibration["images"][:64]}, 64)
    row = {"model": name, "cuts": len(cuts), "compile_s": total, **timer.seconds,
           "family": result.plan.certificate.get("family"), "exits": len(result.plan.exits)}
    row["reduction"], row["disagreement"] = evaluate(result.plan, test_frame)
    if len(cuts) <= exhaustive_cuts:
        started = time.perf_counter()
        planned = planning.plan_exits(result.frame, cuts, imported.num_classes, cuts[0].flops_before + cuts[0].flops_after,
                                      budget, EXHAUSTIVE, 0, allow_no_exit=True)
        row["exhaustive_s"] = time.perf_counter() - started
        row["exhaustive_family"] = planned.plan.certificate.get("family")
        row["exhaustive_reduction"], row["exhaustive_disagreement"] = evaluate(planned.plan, test_frame)
    print(row, flush=True)
    return row


def report(rows: list[dict], budget: Budget, command: str, minutes: float) -> str:
    lines = [f"Command: `{command}`",
             f"Machine: {machine_description()} (run took {minutes:.1f} min)", "",
             f"Budget {budget.max_disagreement:.0%} at {budget.confidence:.0%}, 10,000 calibration images, "
             "default `PlannerConfig` (ranked backward elimination: 4 exits tried per round; `per-class` from at most "
             "12 exits); exhaustive: every exit tried each round, `per-class` from every candidate. Reductions and "
             "disagreement on the official test split (estimates; only the budget is certified). Deep nets: "
             f"`FashionResNet` widths {'/'.join(map(str, WIDTHS))}, trained {EPOCHS} epochs by "
             "`models/train_fashion_resnet.py`.", "",
             "| model | cuts | compile (s) | of which fit rules | plan | family, exits | reduction / disagreement "
             "| exhaustive plan (s) | exhaustive family | exhaustive reduction / disagreement |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exhaustive = (f"{r['exhaustive_s']:.0f} | {r['exhaustive_family']} | {100 * r['exhaustive_reduction']:.1f}% / "
                      f"{100 * r['exhaustive_disagreement']:.2f}%") if "exhaustive_s" in r else "not run | - | -"
        lines.append(f"| {r['model']} | {r['cuts']} | {r['compile_s']:.0f} | {r.get('fit rules', 0):.0f} | "
                     f"{r.get('plan', 0):.0f} | {r['family']}, {r['exits']} | {100 * r['reduction']:.1f}% / "
                     f"{100 * r['disagreement']:.2f}% | {exhaustive} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="*", default=[6, 16], help="blocks per stage of deep nets")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--exhaustive-cuts", type=int, default=18)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/moco_scaling"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    args.scratch.mkdir(parents=True, exist_ok=True)
    calibration = load_calibration()
    images, labels = load_split("test")
    test = {"images": images, "labels": labels}
    budget = Budget(args.budget)
    models = [("reference CNN", ONNX_PATH)] + [(f"ResNet {3 * b} blocks", deep_resnet(b, args.scratch))
                                               for b in args.blocks]
    rows = [measure(name, path, calibration, test, budget, args.exhaustive_cuts, args.scratch)
            for name, path in models]
    text = report(rows, budget, "python benchmarks/bench_planner_scaling.py " + " ".join(sys.argv[1:]),
                  (time.perf_counter() - started) / 60)
    print(text)
    if not args.no_write:
        write_section("Planner scaling (compile time vs cuts)", text)


if __name__ == "__main__":
    main()
