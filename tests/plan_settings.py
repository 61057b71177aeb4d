"""Planner settings for tests whose subject is not the plan.

A default compile cross-validates every plan family and fits MLP heads beside the softmax probes: on the
reference CNN those are most of a 20-25 s compile (design 7-10 s, heads 6-9 s). Tests of graphs, outputs,
engines and file handling need a plan with exits, not the best one. The compiles that test the planner or
the heads keep the defaults (the shared ``compiled`` fixture among them)."""
from __future__ import annotations

from dataclasses import replace

from moco_compile.passes.planning.config import PlannerConfig

ONE_FAMILY = PlannerConfig(families=("shared",))  # no cross-validation among plan families; the default heads
CHEAPEST_PLAN = replace(ONE_FAMILY, exit_heads=("linear",))  # and softmax probes only

# exits are not priced out of the zoo's nets (0.2-3 MFLOPs): every architecture must get some to check
UNPRICED_LAUNCHES = PlannerConfig(exit_fixed_cost=0.0)
UNPRICED_ONE_FAMILY = replace(UNPRICED_LAUNCHES, families=ONE_FAMILY.families)
