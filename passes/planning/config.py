"""What the user asks of a plan (:class:`Budget`) and how the planner works (:class:`PlannerConfig`).

Every constant of planning lives here, documented once; ``compile(...,
planner_config=PlannerConfig(...))`` reaches them from the API.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from numbers import Real

from onnx import TensorProto

from moco_compile.errors import ModelError

from moco_compile.passes.planning.routing import Rounding

FAMILIES = ("shared-all", "shared", "patience", "per-cut", "per-class")  # every plan family, simplest first
# families whose plans are routed (designed, certified, evaluated, built) with the agreement condition of
# passes/planning/routing.route: past the first open exit a row leaves only with its class at the exit before
AGREEMENT_FAMILIES = ("patience",)
# "per-cut" is built only when listed: on repeated draws it never changed the default's plan for the worse and
# bettered it in 2 of 21 cells (benchmarks/RESULTS.md "Plan families on repeated draws"); the statistical benchmarks
# were measured without it
DEFAULT_FAMILIES = ("shared-all", "shared", "patience", "per-class")
FAMILY_SELECTIONS = ("cross-validated", "bonferroni")
EXIT_HEADS = ("linear", "mlp")  # exit heads a candidate may get (passes/calibration/rules.py, mlp_head.py)
# Subgraph levels an ONNX file can nest: protobuf parsers (onnx's and onnxruntime's) refuse
# messages nested beyond 100 levels and a subgraph costs 3 (node, attribute, graph); a graph of
# 31 nested Ifs loads, 32 do not (onnx 1.23, onnxruntime 1.32).  One level of margin.
MAX_NESTED_GRAPHS = 30
# how the rewrite lays out the stages after each exit: passes/graph/rewrite.py (nested, flat) and
# passes/graph/buckets.py (bucketed: the continuing rows padded to fixed batch sizes, for GPUs)
EXIT_LAYOUTS = ("nested", "flat", "whole-batch", "bucketed")
# the layouts that carry a row's class from exit to exit (routing with agreement): not the bucketed one, whose
# stages Triton serves as separate models
LAYOUTS_WITH_AGREEMENT = ("nested", "flat", "whole-batch")
DEFAULT_EXIT_LAYOUT = "nested"
# Batch sizes a bucketed graph pads the continuing rows to: every Conv/MatMul instance then sees one
# shape, which cuDNN's one-plan-per-node cache needs (DESIGN.md "On CUDA").
DEFAULT_BATCH_BUCKETS = (1, 8, 16, 32, 64, 128, 256)
_FLOAT_UNIT = {TensorProto.FLOAT: 2.0 ** -23, TensorProto.DOUBLE: 2.0 ** -52, TensorProto.FLOAT16: 2.0 ** -10,
               TensorProto.BFLOAT16: 2.0 ** -7}  # machine epsilon per float element type


# A budget needing more test rows than this to certify even a plan that never disagrees is refused up front:
# no calibration set is that large (rows_needed ~ ln(1 / delta) / budget: a budget of 3e-12 at 95% confidence).
MAX_TEST_ROWS = 10 ** 12
_BUDGET_FIELDS = (  # (field, may be None, what a plan must never do to need fewest rows, example)
    ("max_disagreement", False, "disagrees", "e.g. 0.01 allows 1% of inputs to change class"),
    ("confidence", False, None, "e.g. 0.95"),
    ("max_accuracy_drop", True, "costs accuracy", "e.g. 0.005 allows half a point of accuracy"),
)  # each must be a number in (0, 1); a rate (harm given) must need at most MAX_TEST_ROWS rows to certify


def routes_with_agreement(family: str) -> bool:
    """Whether plan family ``family``'s plans are routed with the agreement condition
    (:func:`~moco_compile.passes.planning.routing.route`'s ``agreement``)."""
    return family in AGREEMENT_FAMILIES


def checked_buckets(buckets: Iterable) -> tuple[int, ...]:
    """``buckets`` as a tuple of batch sizes, or ``ValueError`` saying what is wrong with them: they must
    be positive integers, strictly increasing (sorted, none repeated), at least one."""
    values = tuple(buckets)
    example = f"e.g. {','.join(map(str, DEFAULT_BATCH_BUCKETS))}"
    if not values:
        raise ValueError(f"batch buckets are empty: give at least one batch size, {example}")
    wrong = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if wrong:
        raise ValueError(f"batch bucket {wrong[0]!r} is not a positive whole number of rows; {example}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"batch bucket {repeated[0]} is given more than once; list each size once, {example}")
    if list(values) != sorted(values):
        raise ValueError(f"batch buckets {','.join(map(str, values))} are not in increasing order: list them "
                         f"smallest first, {','.join(map(str, sorted(values)))}")
    return values


def _round_up(value: float) -> float:
    """``value`` rounded up to two significant digits."""
    scale = 10.0 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / scale) * scale


@dataclass(frozen=True)
class Budget:
    """The certified promise: with probability ``confidence``, the compiled model's class
    differs from the full model's on at most ``max_disagreement`` of inputs (and, when
    ``max_accuracy_drop`` is set, at most that fraction of inputs is right before and wrong
    after; this needs labels)."""

    max_disagreement: float = 0.01
    confidence: float = 0.95
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        for name, optional, _, example in _BUDGET_FIELDS:
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not isinstance(value, Real) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}; {example}")
            if not 0 < value < 1:  # NaN fails this too
                raise ValueError(f"{name} must be in (0, 1), got {value}; {example}")
        from moco_compile.passes.planning.bounds import rows_needed  # (scipy: imported only once a budget is made)

        for name, _, harm, _ in _BUDGET_FIELDS:
            value = getattr(self, name)
            if harm is None or value is None:
                continue
            try:
                needed = rows_needed(value, self.confidence)
            except ValueError:  # more than a float can count
                needed = math.inf
            if needed > MAX_TEST_ROWS:
                smallest = _round_up(-math.expm1(math.log(self.delta) / MAX_TEST_ROWS))
                rows = f"{needed:.2e}" if math.isfinite(needed) else "more than 1e308"
                raise ValueError(
                    f"{name} {value:g} is too small to certify: at confidence {self.confidence:g} even a plan that "
                    f"never {harm} needs {rows} test rows, more than any calibration set holds (moco refuses "
                    f"budgets that need over {MAX_TEST_ROWS:.0e}); at this confidence the smallest {name} it "
                    f"certifies is about {smallest:g}: raise {name} to that or more, or lower the confidence")

    @property
    def delta(self) -> float:
        """Allowed probability that the certified statement is false."""
        return 1 - self.confidence


@dataclass(frozen=True)
class PlannerConfig:
    """How calibration rows are split and how plans are designed and certified.

    Splits (see :mod:`moco_compile.passes.planning.splits`)
        ``test_fraction``: share of the rows (after any report split) that certify the
        plan; the rest fit the rules and design the plans.  When that share is too small
        for even a perfect plan to certify, the test split grows to the fewest rows that
        can, as long as ``min_design_rows`` remain to fit rules on.  ``max_design_rows``:
        the rules split never holds more rows, the rest certify (the rules rows are read
        into memory to fit and design on; test rows are only counted, shard by shard, so
        planning's memory is bounded whatever the row count).
        ``report_min_rows``, ``report_fraction``, ``max_report_rows``: only calibration
        sets of at least ``report_min_rows`` rows set a report split aside (that share, at
        most that many rows); smaller sets report on the certifying rows, labelled so.

    Rules (see :mod:`moco_compile.passes.planning.candidates`)
        ``cross_fit_folds``: the design scores of a row come from rules fitted without it.
        ``variant_held_out``, ``variant_min_gain``: pooling variants are compared on this
        share of the fitting rows; a costlier variant must admit this much more.
        ``exit_heads``: the heads a cut's rule may be, from :data:`EXIT_HEADS`: ``"linear"`` (a
        softmax probe on the pooled features, always fitted) and ``"mlp"`` (one hidden ReLU layer,
        distilled from the full model's probabilities), which replaces the probe where its
        cross-fitted scores admit ``variant_min_gain`` more of the fitting rows at the exit's precision.
        MLP heads are tried at any row count: the plan-level choice on the design rows, then the test
        rows (``pipeline._design``), keeps them only where they pay.  Before that choice was certified,
        a floor of 1,000 fitting rows kept a loss out (reference CNN, 1,000 calibration rows: 31.4% ->
        23.3% in one of three draws); with it, 500 and 1,000 calibration rows at 1%, 5 draws each on
        the reference CNN and minilm6_tweets, compute reduction on the rows not drawn, heads tried vs
        not: +12.6, +9.9, +8.0, +4.7 and +1.3 pp in five draws, -3.3, -1.1 and -0.1 pp in three, the
        same plan in twelve.

    Plan families (see :mod:`moco_compile.passes.planning.design`)
        ``families``, simplest first: ``"shared-all"`` (one log-probability threshold,
        every candidate exit open), ``"shared"`` (one threshold on the exits backward
        elimination keeps), ``"patience"`` (the same, routed with agreement: past the first
        open exit a row leaves only with the class it had at the exit before, see
        :func:`routes_with_agreement`), ``"per-cut"`` (greedy over one threshold per kept exit) and
        ``"per-class"`` (greedy over every (cut, class) threshold); default
        :data:`DEFAULT_FAMILIES` (all but ``"per-cut"``; with ``exit_layout="bucketed"``, which
        cannot build agreement, all but ``"per-cut"`` and ``"patience"``).
        ``family_selection``: ``"cross-validated"`` chooses one family on the design rows
        (each family built on one half and scored on the other, both ways, repeated
        ``family_cv_repeats`` times; the first family listed within ``family_choice_errors``
        standard errors of the best wins, the error corrected for folds that share rows as
        Nadeau and Bengio do; ``family_cv_plans`` plans evenly spaced along each family are
        scored) and certifies it at the full confidence; ``"bonferroni"``
        certifies every family at an equal share of ``1 - confidence`` and keeps the
        certified plan that saves most.
        ``step_fraction``, ``step_multipliers``: a greedy (per-cut or per-class) threshold
        move admits this fraction of the design rows times one of the multipliers.
        ``shared_step_fraction``: a shared-threshold step admits this fraction of the open
        exits' design scores (fine steps let the test stop close to the budget).
        ``design_risk_factor``: a family grows until its design risk is this multiple
        of the budget.
        ``elimination_risk_fraction``: backward elimination compares exit sets by their
        design cost at this fraction of the budget.
        ``elimination_candidates``: with more open exits than this, each elimination round
        rebuilds the path only without the exits whose removal, thresholds kept, saves most
        (None: without every open exit, O(exits^2) paths).  ``per_class_candidates``: with
        more candidate exits than this, ``"per-cut"`` and ``"per-class"`` start their
        elimination from the exits ``"shared"`` keeps (a greedy path costs O(open exits)
        per step).
        ``boundary_cost``: planning cost, in FLOP-equivalents per element of the cut
        tensor per row reaching an exit, of what an exit adds besides its rule: the copy
        of the continuing rows, layout reorders around the If boundary and fusions lost
        across it (onnxruntime 1.32 CPU, reference CNN, batch 64: an exit no row takes
        costs about 100-200).  It keeps rarely-firing exits out of the plan; reported
        FLOPs never include it.
        ``exit_fixed_cost``: planning cost, in FLOP-equivalents per row reaching an exit,
        of what an exit costs whatever its cut's size: the ~20 nodes it adds (pooling,
        rule, NonZero, If, scatters) each cost a kernel launch, paid once per batch, so
        per row at batch 1.  onnxruntime 1.32 CPU (2 cores), exits no row takes: 16-32 us
        each at batch 1 on 0.2-3 MFLOP zoo nets (ConvNeXt-ish: 32 us, 14% of its 233 us),
        115,000-490,000 FLOPs at the 6-22 GFLOP/s such nets run at batch 1.  Without
        it, plans of nets this small were up to 1.7x slower than the original at batch 1
        while saving FLOPs; 350,000 also dropped a 1 MFLOP ViT's exit that ran 0.9x.  Nets
        of 100 MFLOPs and more hardly notice it.  Like ``boundary_cost`` it only shapes
        plans; reported FLOPs never include it.
        ``target``, ``serving_batch``: what the two costs above were priced for: ``"cpu"`` and None
        (the figures above, measured at batch 1) unless
        :func:`~moco_compile.passes.planning.target.priced_config` priced them for a device (e.g.
        ``"cuda:h100"``) serving batches of ``serving_batch`` rows.  Messages about exits that
        cannot pay name them.

    Certification (see :mod:`moco_compile.passes.planning.certify`)
        ``rounding_tolerance``, ``rounding_floor``: how far float rounding in the shipped
        graph can move a log-probability score (of magnitude 1 or more; a score ``s``
        nearer 0 moves ``|s|`` times less, plus ``rounding_floor``: see
        :class:`~moco_compile.passes.planning.routing.Rounding`).  Rows whose route such a change
        could flip count against the budget, and are the only rows the shipped graph may
        route differently from the simulation.
        ``narrow_float_ulps``: models whose cut tensors are narrower than float32 pool
        them in that precision in the graph, so the tolerance is raised to this many
        units of that float's precision (:meth:`for_cut_types`; reference CNN exported
        in float16: margins in the graph differ from the simulation by up to 3e-4, a
        third of a float16 unit).

    The compiled graph (see :mod:`moco_compile.passes.graph.rewrite`)
        ``exit_layout``: ``"nested"`` (each exit runs the rest of the network inside an
        ``If`` taken only when rows are left), ``"flat"`` (every stage at the top level on
        the rows left, 0 rows once all have exited), ``"whole-batch"`` (nested, but the batch
        leaves an exit only when every row in it has decided, else every row goes on: no row
        is split off, fewer nodes per exit; for batch-1 serving) or ``"bucketed"`` (nested, with the rows
        entering each stage padded to the smallest of ``batch_buckets`` that holds them and
        one instance of the stage per bucket: shapes a GPU's kernels keep plans for; see
        :mod:`moco_compile.passes.graph.buckets`).  ``max_exits``: at most this many exits
        in a plan; nested exits nest one subgraph level each, so there it is at most
        :data:`MAX_NESTED_GRAPHS` less the model's own nesting (:meth:`for_model_nesting`),
        and bucketed ones one more level per bucket, and one more.

    Out-of-distribution guard (see :mod:`moco_compile.passes.calibration.guard`)
        ``ood_guard``: None (no guard), or the share of calibration-like rows each exit's
        guard may turn away, in (0, 1): rows farther from the fitting rows than that
        quantile cannot leave at that exit.  ``guard_rounding``: how far float rounding in
        the shipped graph can move a guard's distance, relative to its threshold (rows
        within it may be sent on or not; raised like ``rounding_tolerance`` for narrow
        cut types).
    """

    test_fraction: float = 0.5
    min_design_rows: int = 100
    max_design_rows: int = 50_000
    report_min_rows: int = 20_000
    report_fraction: float = 0.1
    max_report_rows: int = 2_000
    cross_fit_folds: int = 3
    variant_held_out: float = 0.25
    variant_min_gain: float = 0.01
    exit_heads: tuple[str, ...] = EXIT_HEADS
    families: tuple[str, ...] = DEFAULT_FAMILIES
    family_selection: str = "cross-validated"
    family_cv_repeats: int = 3
    family_choice_errors: float = 1.0
    family_cv_plans: int = 100
    step_fraction: float = 0.005
    step_multipliers: tuple[int, ...] = (1, 4, 16, 64)
    shared_step_fraction: float = 0.001
    design_risk_factor: float = 3.0
    elimination_risk_fraction: float = 0.7
    elimination_candidates: int | None = 4
    per_class_candidates: int = 12
    max_exits: int = 24
    exit_layout: str = DEFAULT_EXIT_LAYOUT
    batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS
    boundary_cost: float = 100.0
    exit_fixed_cost: float = 250_000.0
    target: str = "cpu"
    serving_batch: int | None = None
    rounding_tolerance: float = 1e-4
    rounding_floor: float = 16 * 2.0 ** -23  # 16 units of float32 at log p = 0
    narrow_float_ulps: float = 16.0
    ood_guard: float | None = None
    guard_rounding: float = 1e-3

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if not self.families or unknown:
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {tuple(self.families)}")
        if "linear" not in self.exit_heads or any(head not in EXIT_HEADS for head in self.exit_heads):
            raise ValueError(f"exit_heads (--exit-heads) must list 'linear' and only heads of {EXIT_HEADS}, got "
                             f"{tuple(self.exit_heads)}")
        if self.family_selection not in FAMILY_SELECTIONS:
            raise ValueError(f"family_selection must be one of {FAMILY_SELECTIONS}, got {self.family_selection!r}")
        for name in ("test_fraction", "report_fraction", "variant_held_out", "step_fraction",
                     "shared_step_fraction", "elimination_risk_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.family_cv_repeats < 1 or self.family_choice_errors < 0 or self.family_cv_plans < 2:
            raise ValueError(f"family_cv_repeats must be at least 1, family_choice_errors >= 0 and "
                             f"family_cv_plans at least 2, got {self.family_cv_repeats}, "
                             f"{self.family_choice_errors} and {self.family_cv_plans}")
        if (self.elimination_candidates is not None and self.elimination_candidates < 1) \
                or self.per_class_candidates < 1:
            raise ValueError(f"elimination_candidates (or None) and per_class_candidates must be at least 1, got "
                             f"{self.elimination_candidates} and {self.per_class_candidates}")
        if self.exit_layout not in EXIT_LAYOUTS:
            raise ValueError(f"exit_layout must be one of {EXIT_LAYOUTS}, got {self.exit_layout!r}")
        if self.exit_layout not in LAYOUTS_WITH_AGREEMENT:
            if self.families == DEFAULT_FAMILIES:
                object.__setattr__(self, "families", tuple(f for f in DEFAULT_FAMILIES if not routes_with_agreement(f)))
            elif any(map(routes_with_agreement, self.families)):
                raise ValueError(f"families {tuple(self.families)} include 'patience', whose plans the "
                                 f"{self.exit_layout!r} exit layout cannot build (it does not carry a row's class "
                                 f"between exits): leave it out, or use one of {LAYOUTS_WITH_AGREEMENT}")
        checked_buckets(self.batch_buckets)
        if self.serving_batch is not None:
            if isinstance(self.serving_batch, bool) or not isinstance(self.serving_batch, int) \
                    or self.serving_batch < 1:
                raise ValueError(f"serving batch must be a positive whole number of rows, got {self.serving_batch!r}; "
                                 "e.g. 64")
            if self.exit_layout == "bucketed" and self.serving_batch > self.batch_buckets[-1]:
                raise ValueError(f"serving batch {self.serving_batch} is above the largest batch bucket "
                                 f"{self.batch_buckets[-1]}: the rows continuing past an exit are padded to a "
                                 f"bucket, so add one of at least {self.serving_batch} (--batch-buckets "
                                 f"{','.join(map(str, self.batch_buckets))},{self.serving_batch}) or serve "
                                 "smaller batches")
        if self.exit_layout != "flat" and not 1 <= self.max_exits <= MAX_NESTED_GRAPHS:
            raise ValueError(f"max_exits must be between 1 and {MAX_NESTED_GRAPHS} (the If nesting an ONNX file "
                             f"can hold) with exit_layout={self.exit_layout!r}, got {self.max_exits}; "
                             "exit_layout='flat' nests nothing")
        if self.max_exits < 1:
            raise ValueError(f"max_exits must be at least 1, got {self.max_exits}")
        if self.cross_fit_folds < 2:
            raise ValueError(f"cross_fit_folds must be at least 2, got {self.cross_fit_folds}")
        if self.min_design_rows < 2 * self.cross_fit_folds:
            raise ValueError(f"min_design_rows must be at least {2 * self.cross_fit_folds}, got {self.min_design_rows}")
        if self.max_design_rows < self.min_design_rows:
            raise ValueError(f"max_design_rows must be at least min_design_rows ({self.min_design_rows}), "
                             f"got {self.max_design_rows}")
        if self.ood_guard is not None and not 0 < self.ood_guard < 1:
            raise ValueError(f"ood_guard must be in (0, 1), got {self.ood_guard}: the share of calibration-like "
                             "rows each exit's guard may turn away, e.g. 0.01 (or None for no guard)")
        if min(self.rounding_tolerance, self.rounding_floor, self.narrow_float_ulps, self.boundary_cost,
               self.exit_fixed_cost, self.guard_rounding) < 0 \
                or self.design_risk_factor <= 0:
            raise ValueError("rounding_tolerance, rounding_floor, narrow_float_ulps, boundary_cost, exit_fixed_cost "
                             "and guard_rounding must be >= 0 and design_risk_factor > 0")

    def to_dict(self) -> dict:
        """Every field by name, JSON-ready (tuples as lists); :meth:`from_dict` reads it back."""
        return {f.name: list(value) if isinstance(value, tuple) else value
                for f in fields(self) for value in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "PlannerConfig":
        """The configuration :meth:`to_dict` wrote, validated as on creation; ``ValueError`` for a field
        this version does not know.  Fields ``data`` lacks (written by an older moco) take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown planner settings {unknown}; known: {sorted(known)}")
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in data.items()})

    @property
    def rounding(self) -> Rounding:
        """How far float rounding in the shipped graph can move each margin."""
        return Rounding(self.rounding_tolerance, self.rounding_floor, self.guard_rounding)

    def for_cut_types(self, types: Iterable[int]) -> "PlannerConfig":
        """This configuration with ``rounding_tolerance`` raised for cut tensors of element
        types (``onnx.TensorProto`` enums) narrower than float32."""
        units = [_FLOAT_UNIT[t] for t in types if _FLOAT_UNIT.get(t, 0.0) > _FLOAT_UNIT[TensorProto.FLOAT]]
        if not units:
            return self
        widest = self.narrow_float_ulps * max(units)
        return replace(self, rounding_tolerance=max(self.rounding_tolerance, widest),
                       guard_rounding=max(self.guard_rounding, widest))

    @property
    def nesting_room(self) -> int:
        """Subgraph levels left for exits: :data:`MAX_NESTED_GRAPHS`, less one per batch bucket and one
        for the batch when bucketed (a stage's instances sit in a chain of ``If`` nodes, one per bucket,
        inside an ``If`` that skips batches of 0 rows)."""
        return MAX_NESTED_GRAPHS - (len(self.batch_buckets) + 1 if self.exit_layout == "bucketed" else 0)

    def for_model_nesting(self, levels: int) -> "PlannerConfig":
        """This configuration with ``max_exits`` lowered so that exits nested in a model whose own
        subgraphs nest ``levels`` deep stay within :data:`MAX_NESTED_GRAPHS` (flat exits nest nothing)."""
        if self.exit_layout == "flat":
            return self
        room = self.nesting_room - levels
        if room < 1:
            raise ModelError(f"the model's subgraphs (If/Loop/Scan) already nest {levels} levels deep and an ONNX "
                             f"file holds at most {MAX_NESTED_GRAPHS + 1}: no exit can be nested in it")
        return self if self.max_exits <= room else replace(self, max_exits=room)

    @property
    def cross_validates_families(self) -> bool:
        """Whether one family is chosen on the design rows' folds (``family_selection``, with more than one)."""
        return self.family_selection == "cross-validated" and len(self.families) > 1

    def family_delta(self, budget: Budget) -> float:
        """The error rate each certified family is tested at."""
        share = len(self.families) if self.family_selection == "bonferroni" else 1
        return budget.delta / share
