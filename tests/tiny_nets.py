"""Planner settings for the conformance tests, which check import and rewrite on tiny random-weight nets."""
from __future__ import annotations

from moco_compile.passes.config import PlannerConfig

# exits are not priced out of nets this small (0.2-3 MFLOPs): every architecture must get some to check
UNPRICED_LAUNCHES = PlannerConfig(exit_fixed_cost=0.0)
