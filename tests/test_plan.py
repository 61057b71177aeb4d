"""Routing semantics, the splits, the planner's steps and the plan certificate (the statistics: test_bounds.py;
the certificate's level, simulated: test_certification_simulation.py)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax

from moco_compile.passes.planning.bounds import binomial_p_value, max_certifiable_failures, rows_needed
from moco_compile.passes.calibration.calibrate import variant_features
from moco_compile.passes.planning.certify import certify_family
from moco_compile.passes.planning.config import Budget, PlannerConfig
from moco_compile.passes.planning.counts import Split, count_plans
from moco_compile.passes.planning.design import DesignProblem, build_family, within_noise
from moco_compile.passes.planning.planner import ExitPlanner, NoPlanError
from moco_compile.passes.planning.routing import Rounding, route, route_scores, stage_costs
from moco_compile.passes.planning.types import ExitPlan
from moco_compile.passes.planning.splits import (SPLIT_BLOCK_ROWS, SPLITS, RowSplit, assign_splits, min_calibration_rows,
                                        split_sizes)
from tests.synthetic_plans import MFLOP, TOTAL_FLOPS, candidate_exits, synthetic


# -- routing and cost -----------------------------------------------------------------------
def test_rows_leave_at_the_first_exit_with_a_positive_margin():
    first = np.array([[0.5, -1.0], [-0.2, -0.1], [-1.0, 2.0]])
    second = np.array([[3.0, 0.0], [-0.5, 0.4], [0.0, 9.0]])
    routing = route([first, second], costs=np.array([1.0, 2.0, 10.0]))
    assert routing.exit_index.tolist() == [0, 1, 0]
    assert routing.exit_class.tolist() == [0, 1, 1]
    assert routing.cost.tolist() == [1.0, 2.0, 1.0]


def test_rows_with_no_positive_margin_run_the_full_network():
    routing = route([np.full((3, 4), -np.inf)], costs=np.array([1.0, 5.0]))
    assert routing.exit_index.tolist() == [-1, -1, -1] and routing.exit_class.tolist() == [-1, -1, -1]
    assert routing.cost.tolist() == [5.0, 5.0, 5.0]
    assert not routing.near_threshold.any()


def test_stage_costs_charge_the_prefix_and_every_exit_reached():
    costs = stage_costs(np.array([10.0, 30.0]), np.array([1.0, 2.0]), 100.0)
    assert costs.tolist() == [11.0, 33.0, 103.0]
    assert stage_costs(np.zeros(0), np.zeros(0), 100.0).tolist() == [100.0]


def test_rows_within_rounding_of_a_threshold_count_only_when_a_flip_could_change_their_class():
    predictions = np.array([0, 0, 1, 0])
    margins = np.array([[5e-5, -1.0],    # exits (class 0 = full model's) but could continue: harmless
                        [-1.0, 5e-5],    # could exit with class 1 != 0: counted
                        [-1.0, -1e-5],   # continues, could exit with class 1 == 1: harmless
                        [0.3, 0.3 - 1e-5]])  # exits, tie with class 1 within rounding: counted
    routing = route([margins], tolerance=1e-4, full_predictions=predictions)
    assert routing.near_threshold.tolist() == [True, True, True, True]
    assert routing.could_disagree.tolist() == [False, True, False, True]
    exact = route([margins], tolerance=0.0, full_predictions=predictions)
    assert exact.could_disagree.tolist() == [False, True, False, False]



def test_rounding_bound_covers_every_logit_perturbation_and_shrinks_near_log_probability_zero():
    """Logits moved by at most d move each log-probability by at most Rounding(2d).of(it): checked on
    confident and unsure rows under the worst sign pattern (+d on the class, -d on the others)."""
    rng = np.random.default_rng(0)
    d = 1e-3
    logits = rng.normal(size=(2000, 5)) * rng.choice([1.0, 10.0, 30.0], size=(2000, 1))
    log_p = log_softmax(logits.astype(np.float64), axis=1)
    bound = Rounding(2 * d, 0.0).of(log_p)
    for c in range(5):
        shift = np.full(5, -d)
        shift[c] = d
        moved = log_softmax(logits + shift, axis=1)[:, c] - log_p[:, c]
        assert (np.abs(moved) <= bound[:, c] * (1 + 1e-6) + 1e-12).all()
    confident = log_p.max(axis=1) > -1e-3
    top_bound = np.take_along_axis(bound, log_p.argmax(axis=1)[:, None], axis=1)[:, 0]
    assert confident.any() and (top_bound[confident] <= 2 * d * 1e-3).all()  # vs 2d for a flat tolerance
    assert Rounding(1e-4, 2e-6).of(np.array([np.inf, -5.0, -1e-3])).tolist() == pytest.approx([1.02e-4, 1.02e-4,
                                                                                                  2.1e-6])


def test_routing_reads_each_thresholds_own_tolerance():
    predictions = np.array([1, 1])
    margins = np.array([[5e-6, -1.0],   # class 0's threshold is near log p = 0: its tolerance is tiny
                        [-1.0, 5e-6]])  # class 1's is not: this row could flip
    tolerance = np.array([[1e-6, 1e-4]])
    routing = route([margins], tolerance=tolerance, full_predictions=predictions)
    assert routing.near_threshold.tolist() == [False, True]
    assert routing.could_disagree.tolist() == [True, False]
    no_exit = route_scores([], np.zeros((0, 2), np.float32), np.array([7.0]), Rounding(1e-4, 1e-6), rows=3,
                           full_predictions=predictions[[0, 0, 1]])
    assert no_exit.exit_index.tolist() == [-1] * 3 and not no_exit.could_disagree.any()

# -- splits ----------------------------------------------------------------------------------
def test_small_sets_have_no_report_split_and_the_test_split_can_certify():
    budget, config = Budget(0.02, 0.95), PlannerConfig()
    sizes = split_sizes(300, budget, config)
    assert sizes["report"] == 0 and sizes["test"] >= rows_needed(0.02, 0.95) and sum(sizes.values()) == 300
    sizes = split_sizes(250, budget, config)  # half would be too few to certify anything: the test grows
    assert sizes["test"] == rows_needed(0.02, 0.95) and sizes["rules"] >= config.min_design_rows
    large = split_sizes(30_000, budget, config)
    assert large["report"] == config.max_report_rows and large["test"] == 14_000


def test_too_few_rows_names_the_rows_the_real_test_needs():
    budget = Budget(0.01, 0.95)
    needed = min_calibration_rows(budget, PlannerConfig())
    assert needed == rows_needed(0.01, 0.95) + PlannerConfig().min_design_rows
    from moco_compile.errors import CalibrationDataError
    with pytest.raises(CalibrationDataError, match=rf"{needed - 1} given, at least {needed} needed.*needs 299 test"):
        assign_splits(needed - 1, 0, budget, PlannerConfig())
    assert (assign_splits(needed, 0, budget, PlannerConfig()) == SPLITS.index("test")).sum() >= 299
    # certifying every family at a Bonferroni share each needs more test rows, and the message says so
    bonferroni = PlannerConfig(family_selection="bonferroni")
    share = 1 - 0.05 / len(bonferroni.families)
    assert min_calibration_rows(budget, bonferroni) == rows_needed(0.01, share) + bonferroni.min_design_rows


# -- the planner on synthetic scores with known structure -------------------------------------
def test_the_rules_split_is_capped_and_the_other_rows_certify():
    budget, config = Budget(0.01, 0.95), PlannerConfig(max_design_rows=5_000)
    sizes = split_sizes(1_000_000, budget, config)
    assert sizes == {"rules": 5_000, "test": 993_000, "report": 2_000}
    assert split_sizes(9_000, budget, config) == split_sizes(9_000, budget, PlannerConfig())  # below the cap: as before


def test_a_split_of_one_block_is_one_seeded_permutation():
    """Sets of up to SPLIT_BLOCK_ROWS rows split exactly as moco always has (builds stay reproducible)."""
    sizes = split_sizes(4_000, Budget(), PlannerConfig())
    labels = np.repeat(np.arange(len(SPLITS)), [sizes[name] for name in SPLITS])
    np.testing.assert_array_equal(assign_splits(4_000, 7, Budget(), PlannerConfig()),
                                  np.random.default_rng(7).permutation(labels))


def test_any_range_of_rows_is_labelled_alone_as_in_the_whole():
    rows = 3 * SPLIT_BLOCK_ROWS + 1234
    sizes = {"rules": 50_000, "test": rows - 52_000, "report": 2_000}
    split = RowSplit.draw(rows, 3, sizes)
    whole = split.labels(0, rows)
    assert [int((whole == i).sum()) for i in range(len(SPLITS))] == [sizes[name] for name in SPLITS]
    assert split.sizes == sizes
    for start, stop in [(0, 10), (SPLIT_BLOCK_ROWS - 5, 2 * SPLIT_BLOCK_ROWS + 7), (rows - 3, rows), (17, 17)]:
        np.testing.assert_array_equal(split.labels(start, stop), whole[start:stop])
    np.testing.assert_array_equal(split.positions("rules"), np.flatnonzero(whole == 0))
    picked = np.array([5, SPLIT_BLOCK_ROWS + 1, rows - 1])
    np.testing.assert_array_equal(split.labels_at(picked), whole[picked])
    # rows of each split are spread evenly over the blocks, as a uniform permutation spreads them
    assert np.abs(split.block_counts[:-1, 0] - 50_000 * SPLIT_BLOCK_ROWS / rows).max() < 600
    assert not np.array_equal(RowSplit.draw(rows, 4, sizes).labels(0, 1000), whole[:1000])


def test_counts_of_disjoint_rows_add_up_to_the_counts_of_their_union():
    rng = np.random.default_rng(5)
    rows = synthetic(900, rng)
    rows.labels = np.where(rng.random(900) < 0.9, rows.predictions, (rows.predictions + 1) % 3)
    family = [np.full((3, 3), np.inf, np.float32)] + [np.full((3, 3), t, np.float32) for t in (-0.05, -0.5, -3.0)]
    family[2][1] = np.inf  # a plan with an exit closed
    whole = count_plans(family, rows, Rounding(1e-2, 0.0))
    parts = [count_plans(family, rows.take(np.arange(900) % 3 == k), Rounding(1e-2, 0.0)) for k in range(3)]
    summed = parts[0] + parts[1] + parts[2]
    for name in ("exits", "could_disagree", "near_threshold", "changed", "correct_after", "harm"):
        np.testing.assert_array_equal(getattr(summed, name), getattr(whole, name), err_msg=name)
    assert summed.rows == whole.rows == 900 and summed.correct_before == whole.correct_before
    assert whole.exits[0].tolist() == [0, 0, 0, 900] and whole.exits[2, 1] == 0 and whole.could_disagree[3] > 0
    costs = np.array([10.0, 20.0, 30.0, 100.0])
    routing = route_scores(rows.scores, family[3], costs, Rounding(1e-2, 0.0), 900, rows.predictions)
    assert whole.mean_cost(3, costs) == pytest.approx(routing.cost.mean())
    assert whole.could_disagree[3] == routing.could_disagree.sum()


BEFORE = MFLOP * np.array([25.0, 50.0, 75.0])  # three exits' FLOPs before their cuts


def _problem(design: Split, budget: Budget, config: PlannerConfig, count: int = 3) -> DesignProblem:
    before = MFLOP * 25.0 * np.arange(1, count + 1)
    return DesignProblem.build(design, before, np.ones(count), np.full(count, 4.0), TOTAL_FLOPS, budget, config)


@pytest.mark.parametrize("family", ["per-class", "per-cut", "shared", "shared-all"])
def test_families_are_nested_and_grow_from_no_exits(family):
    design = synthetic(600, np.random.default_rng(0))
    plans = build_family(family, _problem(design, Budget(0.05), PlannerConfig()))
    assert len(plans) > 5 and not np.isfinite(plans[0]).any()
    for before, after in zip(plans, plans[1:]):
        kept = np.isfinite(before)
        assert (after[kept] <= before[kept]).all()  # thresholds only come down: each plan admits more rows
    if family.startswith("shared"):
        assert all(np.unique(plan[np.isfinite(plan)]).size <= 1 for plan in plans)
    if family == "per-cut":  # one threshold for every class of a cut, cuts apart
        assert all((plan == plan[:, :1]).all() | ~np.isfinite(plan).any() for plan in plans)
        assert np.unique(plans[-1][np.isfinite(plans[-1][:, 0]), 0]).size > 1
    if family == "shared-all":
        assert all(np.isfinite(plan).all() for plan in plans[1:])  # every exit open, no elimination


def _design_cost_and_risk(problem: DesignProblem, plan: np.ndarray, active: np.ndarray,
                          agreement: bool = False) -> tuple[float, float]:
    """What routing says a plan costs and risks on the design rows (the reference the fast paths must match)."""
    routing = route_scores(problem.design.scores, plan, problem.costs(active), agreement=agreement)
    exited = routing.exit_index >= 0
    risk = problem.row_risk(problem.design)[np.flatnonzero(exited), routing.exit_class[exited]].sum()
    return float(routing.cost.sum()), float(risk)


@pytest.mark.parametrize("agreement", [False, True])  # "shared", "patience"
@pytest.mark.parametrize("active", [(True, True, True), (False, True, True), (True, False, True)])
def test_the_shared_path_prices_each_plan_as_routing_does(active, agreement):
    from moco_compile.passes.planning.design import _shared_path

    design = synthetic(500, np.random.default_rng(7))
    problem = _problem(design, Budget(0.05), PlannerConfig())
    active = np.array(active)
    path = _shared_path(problem, [-np.sort(-s, axis=0) for s in design.scores], active, agreement)
    assert len(path) > 20
    for plan, cost, risk in path:
        assert (cost, risk) == pytest.approx(_design_cost_and_risk(problem, plan, active, agreement))


@pytest.mark.parametrize("one_column", [False, True])
@pytest.mark.parametrize("accuracy_drop", [None, 0.05])
def test_repricing_only_the_moved_rows_equals_pricing_every_row_anew(accuracy_drop, one_column):
    """The greedy path prices each exit's moves once, then only on the rows a lowered threshold moved:
    after every move of a long path, those sums equal the sums over every row (and the path the
    greedy walks with them is the one routing prices). ``one_column``: as the per-class path does, the
    lowered exit keeps its other classes' prices, repriced on the rows that moved or gained margin there,
    and prices the lowered class alone anew."""
    from moco_compile.passes.planning.design import _DesignState, _reprice, _reprice_column, _threshold_grid

    rng = np.random.default_rng(11)
    design = synthetic(500, rng)
    design = Split(design.scores, design.predictions, (design.predictions + (rng.random(500) < 0.1)) % 3)
    problem = _problem(design, Budget(0.05, max_accuracy_drop=accuracy_drop), PlannerConfig())
    state = _DesignState(problem, np.ones(3, bool))
    sorted_scores = [-np.sort(-s, axis=0) for s in design.scores]
    counts = np.zeros((3, 3), np.int64)
    priced = {}
    for step in range(60):
        for k in range(3):
            if k not in priced:
                admitted = np.minimum(counts[k][:, None] + np.array([5, 20, 80]), 500)
                grid = _threshold_grid(sorted_scores[k], admitted)
                saved, added = state.deltas([k], grid[None])
                priced[k] = (grid, saved[0], added[0])
            grid, saved, added = priced[k]
            np.testing.assert_array_equal(
                grid, _threshold_grid(sorted_scores[k], np.minimum(counts[k][:, None] + np.array([5, 20, 80]), 500)))
            fresh_saved, fresh_added = (prices[0] for prices in state.deltas([k], grid[None]))
            np.testing.assert_allclose(saved, fresh_saved, rtol=0, atol=1e-6 * np.abs(fresh_saved).max())
            np.testing.assert_allclose(added, fresh_added, rtol=0, atol=1e-9)
        k, cls = step % 3, rng.integers(0, 3)
        counts[k, cls] = min(counts[k, cls] + rng.integers(1, 40), 500)
        before = state.snapshot()
        state.lower(k, cls, np.float32(_threshold_grid(sorted_scores[k], counts[k][:, None])[cls, 0]))
        own = priced.get(k)
        moved = _reprice(state, priced, k, before)
        if one_column:
            priced[k] = own
            admitted = np.minimum(counts[k, cls] + np.array([5, 20, 80]), 500)
            _reprice_column(state, priced, k, cls, _threshold_grid(sorted_scores[k][:, [cls]], admitted[None, :])[0],
                            before, moved)


def test_the_greedy_prices_every_threshold_move_as_routing_does():
    from moco_compile.passes.planning.design import _DesignState

    rng = np.random.default_rng(8)
    design = synthetic(400, rng)
    problem = _problem(design, Budget(0.05), PlannerConfig())
    active = np.ones(3, bool)
    plan = np.array([[-0.1, np.inf, -0.3], [np.inf, -0.2, -0.5], [-1.0, -1.0, np.inf]], np.float32)
    state = _DesignState(problem, active)
    state.update(plan)
    cost, risk = _design_cost_and_risk(problem, plan, active)
    trials = rng.uniform(-2.0, 0.0, (3, 3, 4))
    saved, added = state.deltas([0, 1, 2], trials)  # every exit priced in one call, as the greedy reprices
    for k in range(3):
        for cls in range(3):
            for j in range(4):
                moved = plan.copy()
                moved[k, cls] = trials[k, cls, j]
                new_cost, new_risk = _design_cost_and_risk(problem, moved, active)
                if trials[k, cls, j] <= plan[k, cls]:  # a move only ever lowers a threshold
                    assert (saved[k, cls, j], added[k, cls, j]) == pytest.approx((cost - new_cost, new_risk - risk))


@pytest.mark.parametrize("family", ["per-cut", "per-class"])
def test_the_greedy_paths_price_each_plan_as_routing_does(family):
    from moco_compile.passes.planning.design import _GREEDY_PATHS

    design = synthetic(500, np.random.default_rng(10))
    problem = _problem(design, Budget(0.05), PlannerConfig())
    active = np.array([True, False, True])
    path = _GREEDY_PATHS[family](problem, [-np.sort(-s, axis=0) for s in design.scores], active)
    assert len(path) > 20
    for plan, cost, risk in path:  # the per-cut path designs on scores masked to the top class
        assert (cost, risk) == pytest.approx(_design_cost_and_risk(problem, plan, active))


def test_lowering_one_threshold_moves_rows_as_routing_does():
    from moco_compile.passes.planning.design import _DesignState

    rng = np.random.default_rng(9)
    design = synthetic(400, rng)
    problem = _problem(design, Budget(0.05), PlannerConfig())
    active = np.ones(3, bool)
    plan = np.full((3, 3), np.inf, np.float32)
    state = _DesignState(problem, active)
    for _ in range(40):  # random lowerings, as the greedy path makes them
        k, cls = rng.integers(0, 3, 2)
        plan[k, cls] = np.float32(min(plan[k, cls], rng.uniform(-2.5, 0.0)))
        state.lower(k, cls, plan[k, cls])
        routing = route([s - t for s, t in zip(design.scores, plan)], problem.costs(active))
        assert (state.exit_index == routing.exit_index).all() and (state.exit_class == routing.exit_class).all()
        assert (state.total_cost, state.risk) == pytest.approx(_design_cost_and_risk(problem, plan, active))


def _manycandidate_exits(rows: int, count: int, rng) -> tuple[Split, np.ndarray]:
    """``count`` exits of slowly rising quality, some of them duplicates of their neighbour."""
    design = synthetic(rows, rng, signals=np.linspace(0.5, 4.0, count))
    return design, MFLOP * np.linspace(5.0, 90.0, count)


@pytest.mark.parametrize("agreement", [False, True])
def test_removing_each_exit_is_priced_as_routing_does(agreement):
    from moco_compile.passes.planning.design import _design_costs_without_each

    design, before = _manycandidate_exits(500, 6, np.random.default_rng(5))
    problem = DesignProblem.build(design, before, np.ones(6), np.full(6, 4.0), TOTAL_FLOPS, Budget(0.05),
                                  PlannerConfig())
    active = np.array([True, True, False, True, True, True])
    plan = np.where(active[:, None], np.full((6, 3), -0.4), np.inf).astype(np.float32)
    plan[3, 1] = -0.05
    expected = []
    for k in np.flatnonzero(active):
        trial, thresholds = active.copy(), plan.copy()
        trial[k], thresholds[k] = False, np.inf
        expected.append(_design_cost_and_risk(problem, thresholds, trial, agreement)[0])
    assert _design_costs_without_each(problem, plan, active, agreement) == pytest.approx(expected)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["per-class", "per-cut", "shared", "patience"])
def test_ranked_elimination_stays_close_to_trying_every_exit(family):
    design, before = _manycandidate_exits(800, 10, np.random.default_rng(3))
    costs = []
    # exits of 2% of the network each; with exits of 1% or less ranked "shared" trails the exhaustive
    # search by 4-7 points of compute on these rows (before exit_fixed_cost, this test's exits cost 4x the network)
    fixed = 2 * MFLOP
    for config in (PlannerConfig(exit_fixed_cost=fixed),
                   PlannerConfig(exit_fixed_cost=fixed, elimination_candidates=None, per_class_candidates=100)):
        problem = DesignProblem.build(design, before, np.ones(10), np.full(10, 4.0), TOTAL_FLOPS, Budget(0.05), config)
        priced = [_design_cost_and_risk(problem, p, np.isfinite(p).any(axis=1), family == "patience")
                  for p in build_family(family, problem)]
        costs.append(min(cost for cost, risk in priced if risk <= 0.7 * 800))
    ranked, exhaustive = costs
    assert ranked <= exhaustive * 1.01  # within 1% of the design cost of the exhaustive search


@pytest.mark.parametrize("family", ["per-cut", "per-class"])
def test_greedy_families_start_from_at_most_their_cap_of_exits(family):
    design, before = _manycandidate_exits(600, 16, np.random.default_rng(4))
    config = PlannerConfig(per_class_candidates=5)
    problem = DesignProblem.build(design, before, np.ones(16), np.full(16, 4.0), TOTAL_FLOPS, Budget(0.05), config)
    plans = build_family(family, problem)
    assert 1 <= np.isfinite(plans[-1]).any(axis=1).sum() <= 5


def test_backward_elimination_drops_an_exit_that_does_not_pay():
    rng = np.random.default_rng(1)
    design = synthetic(600, rng)
    design.scores[1] = np.log(np.full_like(design.scores[1], 1 / 3))  # exit 1 knows nothing
    plans = build_family("per-class", _problem(design, Budget(0.05), PlannerConfig()))
    assert not np.isfinite(plans[-1][1]).any()
    assert np.isfinite(plans[-1][2]).any()


def test_certification_keeps_the_plan_before_the_first_failure():
    rng = np.random.default_rng(2)
    test = synthetic(400, rng)
    family = [np.full((3, 3), np.inf, np.float32)] + [np.full((3, 3), t, np.float32) for t in (-0.05, -0.5, -3.0)]
    flops = lambda open_: stage_costs(BEFORE, np.where(open_, 1.0, 0.0), TOTAL_FLOPS)  # noqa: E731
    result = certify_family(family, count_plans(family, test, Rounding()), flops, flops, TOTAL_FLOPS, Budget(0.05, 0.9),
                            0.1)
    rejected = [p <= 0.1 for p in result.p_values]
    first_failure = rejected.index(False) if False in rejected else len(rejected)
    assert result.certified == result.chosen == first_failure - 1
    assert first_failure < len(family)  # the last, loosest plan disagrees far too often
    assert all(a <= b for a, b in zip(result.compute_reductions[:result.chosen], result.compute_reductions[1:]))


def test_certification_keeps_the_certified_plan_that_saves_most():
    """Every plan before the first failure is certified; when the later ones' exits cost more
    than they save, an earlier one (here: no exit at all) is kept."""
    rng = np.random.default_rng(2)
    test = synthetic(400, rng)
    family = [np.full((3, 3), np.inf, np.float32)] + [np.full((3, 3), t, np.float32) for t in (-0.01, -0.02)]
    flops = lambda open_: stage_costs(BEFORE, np.where(open_, 1.0, 0.0), TOTAL_FLOPS)  # noqa: E731
    costly = lambda open_: stage_costs(BEFORE, np.where(open_, 90.0 * MFLOP, 0.0), TOTAL_FLOPS)  # noqa: E731
    counts = count_plans(family, test, Rounding())
    result = certify_family(family, counts, flops, costly, TOTAL_FLOPS, Budget(0.05, 0.9), 0.1)
    assert result.certified == 2 and result.chosen == 0
    assert certify_family(family, counts, flops, flops, TOTAL_FLOPS, Budget(0.05, 0.9), 0.1).chosen == 2


def test_family_choice_never_reads_the_test_rows():
    rng = np.random.default_rng(3)
    design, test = synthetic(600, rng), synthetic(400, rng)
    shuffled = Split(test.scores, rng.permutation(test.predictions))
    first, second = ExitPlanner(Budget(0.05, 0.9)), ExitPlanner(Budget(0.05, 0.9))
    first.fit(candidate_exits(3), design, test, TOTAL_FLOPS)
    second.fit(candidate_exits(3), design, shuffled, TOTAL_FLOPS)
    assert first.family_scores_ == second.family_scores_
    assert list(first.families_) == list(second.families_)
    for name in first.families_:
        np.testing.assert_array_equal(first.families_[name][-1], second.families_[name][-1])


def test_a_test_split_that_disagrees_everywhere_keeps_no_exit():
    """Under a shift between design and test rows (the test's predictions permuted), every plan
    with exits disagrees at a high rate: the planner keeps the plan with no exits."""
    rng = np.random.default_rng(4)
    design, test = synthetic(600, rng), synthetic(400, rng)
    shuffled = Split(test.scores, rng.permutation(test.predictions))
    costly = PlannerConfig(exit_fixed_cost=5 * MFLOP)  # each exit 5% of the network for every row reaching it
    plan = ExitPlanner(Budget(0.05, 0.9), config=costly).fit(candidate_exits(3), design, shuffled, TOTAL_FLOPS)
    certificate = plan.certificate
    assert certificate["disagreements"] <= max_certifiable_failures(400, 0.05, 0.1)
    assert certificate["plans_tested"] == certificate["plans_certified"] + 1  # stopped at a failure
    # what passes moves only a handful of rows: nothing worth its exits' cost, so no exit is kept
    assert plan.exits == [] and certificate["chosen_plan"] == 0 and certificate["disagreements"] == 0


def test_too_small_a_test_split_certifies_nothing():
    rng = np.random.default_rng(5)
    with pytest.raises(NoPlanError, match="on 20 rows.*voids the stated confidence.*new calibration rows"):
        ExitPlanner(Budget(0.01, 0.95)).fit(candidate_exits(3), synthetic(300, rng), synthetic(20, rng), TOTAL_FLOPS)



def test_a_richer_family_must_beat_the_noise_of_overlapping_folds():
    """Gaining 1 point on average but 0 or 2 by fold is noise once the folds' overlap is accounted
    for (the naive standard error, 0.45, would call it a win); a steady 1 point is not noise."""
    assert within_noise(np.array([0.0, 2.0, 0.0, 2.0, 0.0, 2.0]), errors=1.0)
    assert not within_noise(np.array([1.0, 1.1, 0.9, 1.0, 1.05, 0.95]), errors=1.0)
    assert within_noise(np.zeros(6), errors=0.0)  # the best family itself


def test_bonferroni_selection_certifies_each_family_at_a_share():
    rng = np.random.default_rng(6)
    design, test = synthetic(600, rng), synthetic(600, rng)
    config = PlannerConfig(family_selection="bonferroni")
    planner = ExitPlanner(Budget(0.05, 0.9), config)
    plan = planner.fit(candidate_exits(3), design, test, TOTAL_FLOPS)
    certificate = plan.certificate
    share = len(config.families)
    assert set(planner.certified_) == set(config.families) and share >= 3
    assert certificate["family_confidence"] == pytest.approx(1 - 0.1 / share)
    assert certificate["p_value"] <= 0.1 / share
    assert certificate["test_compute_reduction"] == max(v for v in certificate["families"].values() if v is not None)


def test_accuracy_budget_needs_labels():
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match="needs labels"):
        ExitPlanner(Budget(0.05, 0.9, max_accuracy_drop=0.02)).fit(
            candidate_exits(3), synthetic(300, rng), synthetic(300, rng), TOTAL_FLOPS)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_disagreement": 2.0}, "max_disagreement must be in"),
    ({"max_disagreement": 1.0}, "max_disagreement must be in"),
    ({"max_disagreement": 0.0}, "max_disagreement must be in"),
    ({"max_disagreement": -0.01}, "max_disagreement must be in"),
    ({"max_disagreement": float("nan")}, r"max_disagreement must be in \(0, 1\), got nan"),
    ({"max_disagreement": float("inf")}, r"max_disagreement must be in \(0, 1\), got inf"),
    ({"max_disagreement": "0.01"}, "max_disagreement must be a number"),
    ({"max_disagreement": 1e-300}, r"max_disagreement 1e-300 is too small to certify: .* needs 3.00e\+300 test rows"),
    ({"max_disagreement": 5e-324}, r"too small to certify: .* needs more than 1e308 test rows"),
    ({"max_disagreement": 1e-12, "confidence": 0.95}, r"smallest max_disagreement it certifies is about 3e-12"),
    ({"confidence": 1.0}, "confidence must be in"),
    ({"confidence": float("nan")}, "confidence must be in"),
    ({"max_accuracy_drop": 0.0}, "max_accuracy_drop must be in"),
    ({"max_accuracy_drop": 1e-300}, "max_accuracy_drop 1e-300 is too small to certify")])
def test_budget_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Budget(**kwargs)


def test_smallest_budget_named_by_the_error_is_accepted():
    from moco_compile.passes.planning.bounds import rows_needed
    from moco_compile.passes.planning.config import MAX_TEST_ROWS

    assert Budget(3e-12).max_disagreement == 3e-12 and rows_needed(3e-12, 0.95) <= MAX_TEST_ROWS
    assert rows_needed(1e-300, 0.95) > MAX_TEST_ROWS  # 1 - 1e-300 rounds to 1: no division by zero
    assert rows_needed(0.01, 0.95) == 299  # ordinary budgets as before


def test_rounding_tolerance_follows_the_cut_tensors_precision():
    import onnx

    config = PlannerConfig()
    assert config.for_cut_types([onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE]) == config
    assert config.for_cut_types([onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16]).rounding_tolerance == \
        pytest.approx(16 * 2.0 ** -10)
    assert config.for_cut_types([onnx.TensorProto.BFLOAT16]).rounding_tolerance == pytest.approx(16 * 2.0 ** -7)
    assert PlannerConfig(rounding_tolerance=0.5).for_cut_types([onnx.TensorProto.FLOAT16]).rounding_tolerance == 0.5


def test_planner_config_is_validated():
    with pytest.raises(ValueError, match="families"):
        PlannerConfig(families=("greedy",))
    with pytest.raises(ValueError, match="family_selection"):
        PlannerConfig(family_selection="best")
    with pytest.raises(ValueError, match="test_fraction"):
        PlannerConfig(test_fraction=1.5)
    with pytest.raises(ValueError, match="family_choice_errors"):
        PlannerConfig(family_choice_errors=-1.0)
    with pytest.raises(ValueError, match="narrow_float_ulps"):
        PlannerConfig(narrow_float_ulps=-1.0)


# -- the certificate of a real compile --------------------------------------------------------
def test_certificate_matches_the_test_split(compiled):
    """Re-derive the certified figures from the stored frame and the plan."""
    result, _ = compiled
    certificate = result.plan.certificate
    frame = result.frame
    test = frame[frame["split"] == SPLITS.index("test")]
    routing = result.plan.routing([variant_features(test, e.column, e.pooling) for e in result.plan.exits],
                                  len(test), PlannerConfig().rounding)
    counted = route_scores([e.scores(variant_features(test, e.column, e.pooling)) for e in result.plan.exits],
                           np.array([e.thresholds for e in result.plan.exits]), None,
                           PlannerConfig().rounding, len(test), test["predictions"])
    assert len(test) == certificate["test_rows"] == result.report["splits"]["test"]
    assert int(counted.could_disagree.sum()) == certificate["disagreements"]
    assert int((routing.predictions(test["predictions"]) != test["predictions"]).sum()) \
        == certificate["disagreements"] - certificate["near_threshold_rows"]
    assert certificate["p_value"] == pytest.approx(
        binomial_p_value(certificate["disagreements"], certificate["test_rows"], certificate["max_disagreement"]))
    assert certificate["p_value"] <= 1 - certificate["family_confidence"]
    assert certificate["family_confidence"] == certificate["confidence"]  # one family, chosen on design rows
    assert sum(result.report["splits"].values()) == len(frame)
    assert "estimate" in certificate["estimate_note"] and "disagreement_upper_bound" not in certificate


def test_plan_round_trips_through_json(compiled):
    result, _ = compiled
    again = ExitPlan.from_dict(result.plan.to_dict())
    features = [variant_features(result.frame[:300], e.column, e.pooling) for e in again.exits]
    predictions = result.frame["predictions"][:300]
    np.testing.assert_array_equal(again.evaluate(features, predictions).exit_index,
                                  result.plan.evaluate(features, predictions).exit_index)


@pytest.mark.parametrize("family", ["shared-all", "shared", "patience", "per-cut", "per-class"])
def test_no_plan_opens_more_than_max_exits(family):
    """An ONNX file can nest only so many exits: with 40 candidates every plan of every family
    stays within ``max_exits``; "shared-all" opens exits spread over the compute, not the rows."""
    design, before = _manycandidate_exits(500, 40, np.random.default_rng(6))
    config = PlannerConfig(max_exits=6)
    problem = DesignProblem.build(design, before, np.ones(40), np.full(40, 4.0), TOTAL_FLOPS, Budget(0.05), config)
    plans = build_family(family, problem)
    opened = [np.isfinite(p).any(axis=1) for p in plans]
    assert max(o.sum() for o in opened) <= 6 and opened[-1].sum() >= 1
    if family == "shared-all":
        assert np.flatnonzero(opened[-1]).tolist() == [0, 8, 16, 23, 31, 39]


def test_max_exits_is_bounded_by_what_an_onnx_file_can_nest():
    from moco_compile.errors import ModelError
    from moco_compile.passes.planning.config import MAX_NESTED_GRAPHS

    with pytest.raises(ValueError, match="max_exits"):
        PlannerConfig(max_exits=MAX_NESTED_GRAPHS + 1)
    assert PlannerConfig().for_model_nesting(2).max_exits == PlannerConfig().max_exits
    assert PlannerConfig(max_exits=MAX_NESTED_GRAPHS).for_model_nesting(4).max_exits == MAX_NESTED_GRAPHS - 4
    with pytest.raises(ModelError, match="nest"):
        PlannerConfig().for_model_nesting(MAX_NESTED_GRAPHS)
