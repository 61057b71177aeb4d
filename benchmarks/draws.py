"""Random calibration draws from one pool of rows: what the calibration-size, bound-efficiency and
bound-validity benchmarks share.

The expensive part of compiling is calibration (running the model over the rows); planning is cheap
by comparison.  So each model is calibrated ONCE over a pool of rows (:func:`load_pool`, cached as an
Arrow frame in a git-ignored scratch directory), and every draw is a random subset of the pool's rows
(:func:`draw`): its frame is ``pool.frame.take(rows)``, planned by ``plan_exits`` exactly as
``compile`` does (the ONNX rewrite and its verification are the only parts left out), and every figure
is measured on the pool rows the draw did not take.  Calibration rows and test rows are
exchangeable once pooled and drawn at random, which is what the certificate assumes.

* :class:`Pool`: the frame of every pool row, the cuts, FLOPs, and pooled features per (cut, variant);
* :func:`plan_draw`: moco's planning on a draw (``plan_exits``, ``allow_no_exit=True``);
* :func:`evaluate_plan`: a plan on the undrawn rows (``ExitPlan.evaluate``, i.e.
  :func:`~moco_compile.passes.planning.routing.route_scores` and ``stage_costs``);
* :func:`family_curves` / :func:`oracle`: every plan of the built families on the undrawn rows, and the
  one with the highest compute reduction within budget there (the plan a perfect test would pick);
* :func:`shared_threshold_baseline`: a max-softmax probe per cut, one shared threshold, certified
  Learn-then-Test on half of the draw (the post-training baseline of BranchyNet / SDN);
* :func:`cached`: per-draw records cached on disk, keyed by the planner's source code, so the three
  scripts share draws and a rerun after a crash resumes.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import rule_baselines as rb  # noqa: E402
from moco_compile.constants import LABELS, PREDICTIONS  # noqa: E402
from moco_compile.errors import CalibrationDataError  # noqa: E402
from moco_compile.passes.calibration.calibrate import cut_column, variant_features  # noqa: E402
from moco_compile.passes.calibration.mlp_head import MLPScores  # noqa: E402
from moco_compile.passes.calibration.pooling import pooling_cost, variants_for  # noqa: E402
from moco_compile.passes.calibration.rules import SoftmaxRuleFitter  # noqa: E402
from moco_compile.passes.planning.config import Budget, PlannerConfig, routes_with_agreement  # noqa: E402
from moco_compile.passes.planning.counts import Split  # noqa: E402
from moco_compile.passes.planning.design import cut_elements, exit_overhead  # noqa: E402
from moco_compile.passes.planning.pipeline import Planning, plan_exits  # noqa: E402
from moco_compile.passes.planning.planner import ExitPlanner, NoPlanError  # noqa: E402
from moco_compile.passes.planning.routing import route_scores, stage_costs  # noqa: E402
from moco_compile.passes.planning.splits import SPLITS, assign_splits  # noqa: E402
from moco_compile.passes.planning.types import ExitPlan, PlanEvaluation  # noqa: E402

SCRATCH = ROOT / "out" / "draws"  # git-ignored: pool frames, exported text model, cached draw records
BATCH_SIZE = 256  # calibration batch size, compile's default
BASELINE = "max-softmax probe per cut, one shared threshold, Learn-then-Test on half the rows"
MAX_PROBABILITY_EXTRA = 4.0  # FLOPs per class after the probe's logits: softmax, max, compare (as bench_rule_quality)


# ----------------------------------------------------------------------------- the pool


@dataclass
class Pool:
    """Every pool row's pooled activations at every cut, with what the model and its cuts cost."""

    name: str
    frame: object  # ActivationFrame, in memory
    origin: np.ndarray  # per row: 0 = a calibration-file row, 1 = a test-split row
    cuts: list
    num_classes: int
    total_flops: float
    model: str  # the model, in words (markdown)
    rows: str  # the pool's rows, in words
    unit: str  # one row, as in "MFLOPs per <unit>"
    _features: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def predictions(self) -> np.ndarray:
        return self._column(PREDICTIONS)

    @property
    def labels(self) -> np.ndarray:
        return self._column(LABELS)

    def _column(self, name: str) -> np.ndarray:
        if name not in self._features:
            self._features[name] = self.frame[name]
        return self._features[name]

    def features(self, column: str, variant: str) -> np.ndarray:
        """``[pool rows, D]`` pooled features of one cut and pooling variant (cached)."""
        key = (column, variant)
        if key not in self._features:
            self._features[key] = variant_features(self.frame, column, variant)
        return self._features[key]


def _fashion_resnet(scratch: Path) -> tuple[Path, dict, dict, str, str, str]:
    from models.export_fashion_resnet import CALIBRATION_PATH, ONNX_PATH, load_calibration
    from models.fashion_mnist import load_split

    calibration = load_calibration()
    images, labels = load_split("test")
    rows = (f"the {len(calibration['labels']):,} shipped calibration images "
            f"(`{CALIBRATION_PATH.relative_to(ROOT)}`, held-out training images) and the official "
            f"{len(labels):,}-image Fashion-MNIST test split")
    return ONNX_PATH, calibration, {"images": images, "labels": labels}, \
        f"reference CNN `{ONNX_PATH.relative_to(ROOT)}`", rows, "image"


def _text_reference(name: str, scratch: Path) -> tuple[Path, dict, dict, str, str, str]:
    import onnx

    from models.text_classifier import REFERENCES, load_reference_model, load_tokens
    from moco_compile.importer import export_hf_sequence_classifier

    reference = REFERENCES[name]
    corpus = reference.corpus.name
    onnx_path = scratch / f"{name}.onnx"
    if not onnx_path.exists():  # exported as bench_rule_quality.text_reference does
        onnx.save(export_hf_sequence_classifier(load_reference_model(name)), str(onnx_path))
    calibration, test = load_tokens("calibration", corpus=corpus), load_tokens("test", corpus=corpus)
    rows = (f"the corpus's {len(calibration['labels']):,} calibration rows and {len(test['labels']):,} test "
            "rows (disjoint from training)")
    model = (f"text reference `{name}` ({reference.num_layers} MiniLM blocks, {reference.num_labels} classes, "
             f"`{reference.weights.relative_to(ROOT)}` exported by `export_hf_sequence_classifier`)")
    return onnx_path, calibration, test, model, rows, f"row padded to {calibration['input_ids'].shape[1]} tokens"


MODELS: dict[str, Callable[[Path], tuple]] = {  # the draw benchmarks' models; load_pool takes any text reference too
    "fashion_resnet": _fashion_resnet,
    "minilm6_tweets": lambda scratch: _text_reference("minilm6_tweets", scratch),
}


def _model_source(name: str) -> Callable[[Path], tuple]:
    """How to load model ``name``'s pool: one of :data:`MODELS`, or any text reference by its name."""
    from models.text_classifier import REFERENCES

    if name in MODELS:
        return MODELS[name]
    if name in REFERENCES:
        return lambda scratch: _text_reference(name, scratch)
    raise KeyError(f"no pool for {name!r}: use one of {sorted(MODELS)} or a text reference {sorted(REFERENCES)}")


def load_pool(name: str, scratch: Path = SCRATCH, show_progress: bool = True) -> Pool:
    """The pool of ``name`` (calibration rows + test rows), calibrated once and cached in ``scratch``."""
    from moco_compile.api import calibrate_frame
    from moco_compile.passes.calibration.calibrate import cut_column, piece_column
    from moco_compile.passes.calibration.pooling import pieces_for
    from moco_compile.prepare import cut_points_of
    from moco_compile.frame import load_frame
    from moco_compile.importer import import_model

    directory = scratch / name
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path, calibration, test, model, rows, unit = _model_source(name)(directory)
    inputs = {key: np.concatenate([calibration[key], test[key]]) for key in calibration}
    size = len(inputs["labels"])
    origin = np.repeat([0, 1], [len(calibration["labels"]), len(test["labels"])])
    imported = import_model(onnx_path)
    _, cuts = cut_points_of(imported, {key: value[:1] for key, value in inputs.items()}, BATCH_SIZE)
    pooled = {piece_column(cut_column(cut), piece) for cut in cuts
              for piece in pieces_for(cut.shape, cut.sequence_mask, cut.summary_token)}
    path = directory / "pool.arrow"
    frame = load_frame(path) if path.exists() else None
    if frame is None or len(frame) != size or not np.array_equal(frame[LABELS], inputs["labels"]) \
            or not pooled <= set(frame.columns):  # calibrated before a pooling piece was added
        started = time.perf_counter()
        frame = calibrate_frame(onnx_path, inputs, path, batch_size=BATCH_SIZE, show_progress=show_progress,
                                force=True)
        print(f"{name}: calibrated {size:,} pool rows in {time.perf_counter() - started:.0f} s", flush=True)
    total_flops = cuts[0].flops_before + cuts[0].flops_after
    return Pool(name, frame.in_memory(), origin, cuts, imported.num_classes, float(total_flops), model, rows,
                unit)


# ----------------------------------------------------------------------------- draws


@dataclass(frozen=True)
class Draw:
    """``size`` random pool rows for calibration (sorted), the rest for evaluation; the same
    (size, index) always gives the same rows, in every script."""

    size: int
    index: int
    calibration: np.ndarray
    evaluation: np.ndarray

    @property
    def seed(self) -> int:
        """Seed of moco's split of the drawn rows (and of the baseline's halves)."""
        return self.index


def draw(pool_rows: int, size: int, index: int) -> Draw:
    order = np.random.default_rng([size, index]).permutation(pool_rows)
    return Draw(size, index, np.sort(order[:size]), np.sort(order[size:]))


def plan_draw(pool: Pool, sample: Draw, budget: Budget, config: PlannerConfig = PlannerConfig()) -> Planning:
    """moco's planning of the drawn rows, as ``compile`` runs it (``allow_no_exit``: a plan with no
    exits instead of an error when nothing can be certified)."""
    return plan_exits(pool.frame.take(sample.calibration), pool.cuts, pool.num_classes, pool.total_flops, budget,
                      config, seed=sample.seed, allow_no_exit=True)


def evaluate_plan(pool: Pool, plan: ExitPlan, rows: np.ndarray) -> PlanEvaluation:
    """``plan`` on pool rows ``rows`` (``ExitPlan.evaluate``: moco's routing and FLOP count)."""
    features = [pool.features(e.column, e.pooling)[rows] for e in plan.exits]
    return plan.evaluate(features, pool.predictions[rows], pool.labels[rows])


def planning_splits(pool: Pool, sample: Draw, planning: Planning) -> tuple[Split, Split]:
    """The design ("rules") and test splits ``plan_exits`` planned on, as it built them."""
    split = planning.split
    design = sample.calibration[split == SPLITS.index("rules")]
    test = sample.calibration[split == SPLITS.index("test")]
    exits = planning.candidates.exits
    return (Split(planning.candidates.design_scores, pool.predictions[design], pool.labels[design]),
            Split([e.scores(pool.features(e.column, e.pooling)[test]) for e in exits], pool.predictions[test],
                  pool.labels[test]))


def same_split(sample: Draw, planning: Planning, budget: Budget, config: PlannerConfig) -> bool:
    """Whether ``plan_exits`` with ``config`` would split the drawn rows as ``planning`` did (then
    its candidates, which do not depend on how families are chosen, can be reused)."""
    try:
        return np.array_equal(assign_splits(sample.size, sample.seed, budget, config), planning.split)
    except Exception:  # too few rows for that config
        return False


def refit_planner(pool: Pool, sample: Draw, planning: Planning, budget: Budget,
                  config: PlannerConfig) -> tuple[ExitPlanner, ExitPlan | None]:
    """An ``ExitPlanner`` with ``config`` fitted on ``planning``'s candidates and splits, and its plan
    (None when not even the plan with no exits certifies; ``families_`` are built all the same)."""
    design, test = planning_splits(pool, sample, planning)
    planner = ExitPlanner(budget, config, sample.seed)
    try:
        return planner, planner.fit(planning.candidates.exits, design, test, pool.total_flops)
    except NoPlanError:
        return planner, None


def plan_with(pool: Pool, sample: Draw, budget: Budget, config: PlannerConfig, base: Planning) -> Planning:
    """``plan_exits`` with ``config``; when ``config`` splits the rows as ``base`` did, its candidates are
    reused (they do not depend on which families are built or how one is chosen and certified)."""
    if base.candidates is None or not same_split(sample, base, budget, config):
        return plan_draw(pool, sample, budget, config)
    planner, plan = refit_planner(pool, sample, base, budget, config)
    if plan is None:
        return plan_draw(pool, sample, budget, config)
    rows = sample.calibration[base.split == SPLITS.index(base.evaluated_on)]  # where compile reports its figures
    return replace(base, plan=plan, planner=planner, evaluation=evaluate_plan(pool, plan, rows))


# ----------------------------------------------------------------------------- families on the undrawn rows


@dataclass
class Curve:
    """Every plan of one family on some rows: compute reduction and disagreement with the full model."""

    reductions: np.ndarray
    disagreements: np.ndarray


def family_curves(pool: Pool, planning: Planning, families: dict[str, list[np.ndarray]],
                  rows: np.ndarray) -> dict[str, Curve]:
    """Route ``rows`` through every plan of ``families`` (threshold matrices over ``planning``'s
    candidates) with :func:`route_scores` and :func:`stage_costs`, as certification does (with agreement
    for the families routed so)."""
    candidates = planning.candidates.exits
    scores = [c.scores(pool.features(c.column, c.pooling)[rows]) for c in candidates]
    before = np.array([c.cut.flops_before for c in candidates], np.float64)
    rule_flops = np.array([c.rule_flops for c in candidates], np.float64)
    predictions = pool.predictions[rows]
    curves = {}
    for name, family in families.items():
        reductions, disagreements = [], []
        for thresholds in family:
            open_ = np.isfinite(thresholds).any(axis=1)
            costs = stage_costs(before, np.where(open_, rule_flops, 0.0), pool.total_flops)
            routing = route_scores(scores, thresholds, costs, rows=len(rows), agreement=routes_with_agreement(name))
            reductions.append(1 - routing.cost.mean() / pool.total_flops)
            disagreements.append((routing.predictions(predictions) != predictions).mean())
        curves[name] = Curve(np.array(reductions), np.array(disagreements))
    return curves


def oracle(curves: dict[str, Curve], budget: float) -> dict:
    """The plan of any family with the highest compute reduction whose disagreement on the rows
    the curves were measured on is within ``budget``."""
    best = {"compute_reduction": 0.0, "disagreement": 0.0, "family": None, "plan": -1}
    for name, curve in curves.items():
        within = np.flatnonzero(curve.disagreements <= budget)
        if len(within):
            k = within[np.argmax(curve.reductions[within])]
            if curve.reductions[k] > best["compute_reduction"]:
                best = {"compute_reduction": float(curve.reductions[k]),
                        "disagreement": float(curve.disagreements[k]), "family": name, "plan": int(k)}
    return best


# ----------------------------------------------------------------------------- the baseline


def baseline_halves(sample: Draw, budget: Budget, config: PlannerConfig = PlannerConfig()) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """The baseline's (fitting, test) halves of the drawn rows (pool indices), paired with moco's
    split of the same draw: the test half is ``size // 2`` of moco's test rows (all of them when
    moco's split is half and half, as from 1,000 rows), so both methods are certified on the same
    rows and their difference is the method's, not the luck of the split.  Random halves where
    moco cannot split the draw (too few rows for the budget)."""
    rng = np.random.default_rng([sample.seed, 1])
    half = sample.size // 2
    try:
        moco_test = sample.calibration[assign_splits(sample.size, sample.seed, budget, config) == SPLITS.index("test")]
    except CalibrationDataError:
        moco_test = sample.calibration
    test = np.sort(rng.permutation(moco_test)[:half])
    return np.setdiff1d(sample.calibration, test), test


def shared_threshold_baseline(pool: Pool, sample: Draw, budget: Budget, poolings: Sequence[str]) -> dict:
    """A max-softmax threshold certified on a single split of half the drawn rows (Learn-then-Test).

    Per cut, a softmax probe (moco's :class:`SoftmaxRuleFitter`, on ``poolings[k]``: the pooled
    features moco's candidate uses there) is fitted on one half of the drawn rows
    (:func:`baseline_halves`) to predict the full model's class.  One shared threshold ``t`` for every cut: a row leaves at the first
    cut whose max probability is >= ``t``, with that cut's argmax class.  Thresholds come from a
    grid of the fitting half's max probabilities, strictest (no exit) first, and are tested in that
    order on the other half by the fixed-sequence exact binomial test at the full confidence.
    Routing and FLOPs are moco's (:func:`route_scores`, :func:`stage_costs`: the prefix plus
    every exit's rule on the way).  Returns its figures on the undrawn rows.
    """
    fit_rows, test_rows = baseline_halves(sample, budget)
    targets = pool.predictions[fit_rows]
    probes, rule_flops = [], []
    for cut, variant in zip(pool.cuts, poolings):
        features = pool.features(cut_column(cut), variant)
        probe = SoftmaxRuleFitter().fit(features[fit_rows], targets, pool.num_classes)
        probes.append((probe, features))
        # as bench_rule_quality charges max-softmax: pooling + logits + softmax, max and compare per class
        rule_flops.append(pooling_cost(cut.shape, variant) + 2.0 * probe.weight.size + probe.bias.size
                          + MAX_PROBABILITY_EXTRA * pool.num_classes)
    before = np.array([c.flops_before for c in pool.cuts], np.float64)
    rule_flops = np.array(rule_flops)

    def probabilities(rows: np.ndarray) -> list[np.ndarray]:
        return [np.exp(probe(features[rows]).astype(np.float64)) for probe, features in probes]

    def routing(threshold: float, scores: list[np.ndarray]):
        # ">= t" as route's "margin > 0": p - nextafter(t, -inf) > 0 exactly when p >= t
        level = np.nextafter(threshold, -np.inf) if np.isfinite(threshold) else np.inf
        thresholds = np.full((len(scores), pool.num_classes), level)
        open_ = np.full(len(scores), np.isfinite(threshold))
        return route_scores(scores, thresholds, stage_costs(before, np.where(open_, rule_flops, 0.0),
                                                            pool.total_flops), rows=len(scores[0]))

    fit_probabilities = probabilities(fit_rows)
    family = rb.SharedThreshold("max_probability").family(
        rb.ProbeOutputs(fit_probabilities), targets, budget.max_disagreement, before, rule_flops, pool.total_flops)
    test_probabilities, test_predictions = probabilities(test_rows), pool.predictions[test_rows]

    def on_test(threshold: float) -> tuple[int, int]:
        compiled = routing(threshold, test_probabilities).predictions(test_predictions)
        return int((compiled != test_predictions).sum()), len(test_rows)

    chosen, _ = rb.certify_sequence(family, on_test, budget.max_disagreement, budget.confidence)
    threshold = family[chosen] if chosen >= 0 else np.inf  # even no exit fails: too few test rows
    evaluation = routing(threshold, probabilities(sample.evaluation))
    predictions = pool.predictions[sample.evaluation]
    built = np.full(len(pool.cuts), np.isfinite(threshold))
    return {"compute_reduction": float(1 - evaluation.cost.mean() / pool.total_flops),
            "overhead_compute_reduction": charged_reduction(pool, [c for c, b in zip(pool.cuts, built) if b],
                                                            rule_flops[built], evaluation.exit_index),
            "disagreement": float((evaluation.predictions(predictions) != predictions).mean()),
            "exits": int(len(pool.cuts) if np.isfinite(threshold) else 0),
            "threshold": float(threshold), "certified_index": int(chosen), "family_size": len(family)}


def charged_reduction(pool: Pool, cuts: Sequence, rule_flops: np.ndarray, exit_index: np.ndarray,
                      config: PlannerConfig = PlannerConfig()) -> float:
    """Compute reduction when every built exit a row reaches also charges the exit overhead moco
    plans with (:func:`~moco_compile.passes.planning.design.exit_overhead`: per cut-tensor element, the copy
    of the continuing rows and the layout changes an exit costs in onnxruntime, plus a fixed cost per
    exit); ``exit_index`` indexes ``cuts`` (-1: the full network)."""
    before = np.array([c.flops_before for c in cuts], np.float64)
    overhead = exit_overhead(cut_elements([c.shape for c in cuts]), config)
    costs = stage_costs(before, np.asarray(rule_flops, np.float64) + overhead, pool.total_flops)
    return float(1 - costs[exit_index].mean() / pool.total_flops)


def default_poolings(pool: Pool) -> list[str]:
    """Per cut, the first pooling variant (the baseline's fallback when moco fitted no candidates)."""
    return [variants_for(c.shape, c.sequence_mask)[0] for c in pool.cuts]


# ----------------------------------------------------------------------------- records


def moco_record(pool: Pool, sample: Draw, budget: Budget, planning: Planning) -> dict:
    """What a moco planning of a draw did, measured on the undrawn rows."""
    evaluation = evaluate_plan(pool, planning.plan, sample.evaluation)
    certificate = planning.plan.certificate
    exits = planning.plan.exits
    return {"compute_reduction": evaluation.compute_reduction, "disagreement": evaluation.disagreement,
            "overhead_compute_reduction": charged_reduction(pool, [e.cut for e in exits],
                                                            np.array([e.rule_flops for e in exits]),
                                                            evaluation.exit_index),
            "accuracy_before": evaluation.accuracy_before, "accuracy_after": evaluation.accuracy_after,
            "exits": len(planning.plan.exits), "family": certificate.get("family"),
            "test_rows": certificate.get("test_rows"),
            "test_compute_reduction": certificate.get("test_compute_reduction"),
            "poolings": None if planning.candidates is None else [c.pooling for c in planning.candidates.exits],
            **head_choice(planning)}


def head_choice(planning: Planning) -> dict:
    """Which exit heads a planning certified and kept: ``head_sets`` (how many sets were certified on the test
    rows: 2 when the design rows could not tell the MLP heads from the softmax probes) and ``mlp_exits`` (the
    certified plan's exits with an MLP head)."""
    return {"head_sets": planning.plan.certificate.get("head_sets", 1),
            "mlp_exits": sum(isinstance(e.scores, MLPScores) for e in planning.plan.exits)}


RECORDS_VERSION = 3  # bump when this module changes what a record holds or how it is computed
_DIGEST: list[str] = []


def code_digest() -> str:
    """Hash of the planner's source (every module under ``passes/``), the baselines' and
    :data:`RECORDS_VERSION`: cached records are reused only while it holds."""
    if not _DIGEST:
        digest = hashlib.sha256(f"records v{RECORDS_VERSION}".encode())
        for path in sorted((ROOT / "passes").rglob("*.py")) + [ROOT / "benchmarks" / "rule_baselines.py"]:
            digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
        _DIGEST.append(digest.hexdigest()[:16])
    return _DIGEST[0]


def _record_path(scratch: Path, key: dict) -> Path:
    text = json.dumps(key, sort_keys=True)
    return scratch / "records" / code_digest() / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"


def lookup(scratch: Path, key: dict) -> dict | None:
    """The record stored for ``key`` by this code, or None."""
    path = _record_path(scratch, key)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            return stored["record"]
    return None


def store(scratch: Path, key: dict, record: dict) -> dict:
    path = _record_path(scratch, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"key": key, "record": record}))
    temporary.replace(path)
    return record


_USAGE = {"computed": 0, "computed_seconds": 0.0, "cached": 0, "cached_seconds": 0.0, "cached_untimed": 0}


def cached(scratch: Path, key: dict, compute: Callable[[], dict]) -> dict:
    """``compute()``'s record for ``key``, from ``scratch`` when this code computed it before
    (``seconds``: how long the computation took)."""
    record = lookup(scratch, key)
    if record is None:
        started = time.perf_counter()
        record = compute()
        record["seconds"] = time.perf_counter() - started
        store(scratch, key, record)
        _USAGE["computed"] += 1
        _USAGE["computed_seconds"] += record["seconds"]
    else:
        _USAGE["cached"] += 1
        _USAGE["cached_seconds"] += record.get("seconds", 0.0)
        _USAGE["cached_untimed"] += "seconds" not in record
    return record


def run_time(seconds: float) -> str:
    """How long this run took, and how many of its draw records it read from the cache."""
    text = f"run took {seconds / 60:.1f} min"
    if _USAGE["cached"]:
        untimed = f", {_USAGE['cached_untimed']} of them stored untimed by another script" \
            if _USAGE["cached_untimed"] else ""
        text += (f"; {_USAGE['cached']} of its {_USAGE['cached'] + _USAGE['computed']} draw records were read from "
                 f"the cache, computed earlier by the same code in {_USAGE['cached_seconds'] / 60:.1f} min{untimed}")
    return text


def moco_key(pool: Pool, sample: Draw, budget: Budget, config: PlannerConfig = PlannerConfig()) -> dict:
    """The key of moco's record of one draw (shared by the three scripts)."""
    return {"kind": "moco", "model": pool.name, "pool_rows": len(pool), "size": sample.size, "index": sample.index,
            "budget": budget.max_disagreement, "confidence": budget.confidence, "config": config_key(config)}


def moco_outcome(scratch: Path, pool: Pool, sample: Draw, budget: Budget,
                 config: PlannerConfig = PlannerConfig()) -> dict:
    """moco's record of one draw (cached): :func:`plan_draw` measured on the undrawn rows."""
    return cached(scratch, moco_key(pool, sample, budget, config),
                  lambda: moco_record(pool, sample, budget, plan_draw(pool, sample, budget, config)))


def config_key(config: PlannerConfig) -> dict:
    """A PlannerConfig as the fields that differ from the default (JSON)."""
    default = PlannerConfig()
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in config.__dict__.items() if getattr(default, name) != value}


# ----------------------------------------------------------------------------- reporting helpers


def add_draw_arguments(parser) -> None:
    """The options every draw benchmark takes: --confidence, --scratch, --no-write."""
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--scratch", type=Path, default=SCRATCH, help="pool frames and cached draw records")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and figures alone")


def size_axis(ax, sizes: Sequence[int]) -> None:
    """A log x axis with one labelled tick per calibration size."""
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{s:,}" for s in sizes])
    ax.set_xlabel("calibration rows drawn")


def progress(description: str = "draws"):
    """A rich progress bar (description, bar, done/total, elapsed, remaining)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"))


def percent(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def median_range(values: Iterable[float], digits: int = 1) -> str:
    """``median (min-max)`` in percent."""
    values = np.asarray(list(values), np.float64)
    if not len(values):
        return "n/a"
    return (f"{100 * np.median(values):.{digits}f}% ({100 * values.min():.{digits}f}-"
            f"{100 * values.max():.{digits}f})")


def code_state() -> str:
    """The commit the planner ran from, and whether ``passes/`` differed from it (read when this
    module was imported, i.e. for the code this process runs).  A source tree that is not a git
    checkout names its commit in a ``SOURCE_COMMIT`` file (e.g. a ``git archive`` snapshot)."""
    return _CODE_STATE


def _code_state() -> str:
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.rstrip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD").strip()
    if not commit:
        marker = ROOT / "SOURCE_COMMIT"
        return f"commit {marker.read_text().strip()[:7]} (clean source snapshot)" if marker.exists() else \
            "an unknown source tree"
    changed = git("status", "--porcelain", "--", "passes", "benchmarks/draws.py", "benchmarks/rule_baselines.py")
    return f"commit {commit}" + (
        " with uncommitted changes to " + ", ".join(line[3:] for line in changed.splitlines()) if changed else "")


def command_line(script: str) -> str:
    return " ".join([f"python benchmarks/{script}"] + [a for a in sys.argv[1:] if a != "--no-write"])


_CODE_STATE = _code_state()
code_digest()
