"""The certificate holds: repeated design and certification against a population with known ground truth
(one head set; ``test_head_set_certification.py`` simulates two certified on the same rows)."""
from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest

from moco_compile.passes.planning.bounds import binomial_p_value, fixed_sequence
from moco_compile.passes.planning.config import Budget, PlannerConfig, routes_with_agreement
from moco_compile.passes.planning.counts import count_plans
from moco_compile.passes.planning.planner import ExitPlanner
from moco_compile.passes.planning.routing import route_scores
from tests.synthetic_plans import TOTAL_FLOPS, candidate_exits, synthetic

# -- the bound holds: repeated design + certification with known ground truth ------------------
# A population of 10,000 rows is the truth: design and test rows are drawn from it with replacement,
# so a plan's true disagreement is its mean over the population.  Each of SIMULATED_DESIGNS design
# draws (300 rows) builds its family as moco does (ExitPlanner.design: ~250 nested plans whose
# true rates cross the 5% budget in steps of 0.1 point or less, so the test runs near its exact
# level); each of DRAWS_PER_DESIGN test draws (300 rows) is then certified with the project's exact binomial p-value
# and fixed-sequence test (cross-checked against count_plans + ExitPlanner.certify on some draws).
# A repeat violates when a certified plan's true rate is over the budget: the shipped plan is one of
# them, so this is the event the certificate bounds, and at least as strict as the shipped plan's.
#
# The check passes when at most MAX_VIOLATIONS of the REPEATS = 1,000 repeats violate.  Given the
# designs the repeats are independent, a repeat violating with its design's probability q_k.
#  (i)  A correct procedure has q_k <= 5% for every design (its family is fixed by the design rows
#       before any test row is drawn), so its violations are at most Bin(1000, 0.05):
#       P(the check fails it) <= P(Bin(1000, 0.05) > 73) = 0.065%.
#  (ii) A procedure whose q_k average 10% passes with probability <= P(Bin(1000, 0.10) <= 73) = 0.18%
#       (Hoeffding 1956, Theorem 4: a sum of independent Bernoulli trials falls at least 1 below its
#       mean no more often than the binomial with the same mean); averaging 9.5%: 0.84%.
# (The check this replaces, 200 repeats at a nominal 10% allowing 32 violations, passed a procedure
# violating in 15% of repeats with probability 0.70.)
# Measured on 20,000 further test draws per design of this fixture: moco's certification at 95%
# violated in 3.1-3.3% of them (the binomial test's exact level at 300 rows and a 5% rate is 3.4%),
# the negative control below (the same test at 88%) in 10.6-10.9% (exact level 11.2%).  In the
# fixture's own 1,000 repeats: 42 and 119 violations.  The fixture runs twice: with the default families
# (cross-validation picks shared-all or shared here) and with the patience family alone, whose plans are
# counted routed with agreement (35 and 118 violations).
SIMULATED_CONFIG = PlannerConfig(rounding_tolerance=0.0, family_cv_plans=25)  # fewer CV plans: 3x faster
SIMULATED_BUDGET = Budget(0.05, 0.95)
SIMULATED_DESIGNS, DRAWS_PER_DESIGN, SIMULATED_ROWS = 4, 250, 300
REPEATS = SIMULATED_DESIGNS * DRAWS_PER_DESIGN
MAX_VIOLATIONS = 73


@pytest.fixture(scope="module", params=[SIMULATED_CONFIG.families, ("patience",)], ids=["default", "patience"])
def simulated_certification(request):
    """``(population, designs)``; per design draw: the planner, its family's name and plans, each
    plan's true disagreement (``[plans]``), the test draws (``[draws, rows]`` population indices)
    and each plan's disagreements on them (``[draws, plans]``); planned among the families
    ``request.param``."""
    rng = np.random.default_rng(11)
    population = synthetic(10_000, rng, classes=2, signals=(0.5, 1.0))  # weak signals: families cross the budget
    designs = []
    for _ in range(SIMULATED_DESIGNS):
        planner = ExitPlanner(SIMULATED_BUDGET, replace(SIMULATED_CONFIG, families=request.param))
        design = population.take(rng.integers(0, len(population), 300))
        (name, family), = planner.design(candidate_exits(2, classes=2), design, SIMULATED_ROWS, TOTAL_FLOPS).items()
        disagrees = np.stack([route_scores(population.scores, plan, None, SIMULATED_CONFIG.rounding, len(population),
                                           population.predictions, agreement=routes_with_agreement(name)
                                           ).could_disagree for plan in family], axis=1)
        draws = rng.integers(0, len(population), (DRAWS_PER_DESIGN, SIMULATED_ROWS))
        designs.append((planner, name, family, disagrees.mean(axis=0), draws, disagrees[draws].sum(axis=1)))
    return population, designs


@functools.cache
def _simulated_p_values() -> np.ndarray:
    """The project's p-value of each disagreement count on SIMULATED_ROWS rows, tabulated once."""
    return np.array([binomial_p_value(k, SIMULATED_ROWS, SIMULATED_BUDGET.max_disagreement)
                     for k in range(SIMULATED_ROWS + 1)])


def _certified_prefix(disagreements: np.ndarray, delta: float) -> int:
    """The last plan the fixed-sequence test certifies at level ``delta`` from the plans' disagreements
    on SIMULATED_ROWS test rows."""
    return fixed_sequence(_simulated_p_values()[disagreements], delta)


def _violations(simulated, delta: float) -> int:
    """Repeats in which some plan certified at level ``delta`` breaks the budget on the population."""
    _, designs = simulated
    violations = 0
    for _, _, _, rates, _, counts in designs:
        for disagreements in counts:
            certified = _certified_prefix(disagreements, delta)
            violations += rates[:certified + 1].max(initial=0.0) > SIMULATED_BUDGET.max_disagreement
    return violations


def test_certified_plans_keep_the_budget_at_the_nominal_rate(simulated_certification):
    population, designs = simulated_certification
    delta = SIMULATED_CONFIG.family_delta(SIMULATED_BUDGET)
    assert delta == pytest.approx(0.05)
    for planner, name, family, _, draws, counts in designs:  # the fast path is moco's counting and certification
        for draw, disagreements in zip(draws[:3], counts[:3]):
            test = count_plans(family, population.take(draw), SIMULATED_CONFIG.rounding, routes_with_agreement(name))
            np.testing.assert_array_equal(test.could_disagree, disagreements)
            planner.certify({name: test})
            assert planner.certified_[name].certified == _certified_prefix(disagreements, delta)
            assert planner.chosen_[1] <= planner.certified_[name].certified
    violations = _violations(simulated_certification, delta)
    assert violations <= MAX_VIOLATIONS, f"violated in {violations} of {REPEATS} repeats"


def test_the_simulation_catches_a_procedure_that_breaks_the_budget_in_10_percent(simulated_certification):
    """Negative control: the same fixed-sequence test at level 0.12 (certifying at 88% while stating
    95%) breaks the budget in about 10.8% of repeats here: the check above must reject it."""
    violations = _violations(simulated_certification, 0.12)
    assert violations > MAX_VIOLATIONS, f"violated in only {violations} of {REPEATS} repeats"
