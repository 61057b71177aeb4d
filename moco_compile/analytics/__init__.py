"""Analytics on stored activations: separability at a cut and sufficient rules.

:class:`AnalyticsEngine` (:mod:`.engine`) is the entry point; what it returns is in
:mod:`.results`, input checks and pooling in :mod:`.inputs`, the threshold walk of a rule in
:mod:`.thresholds`, figures in :mod:`.plots`.
"""
from moco_compile.analytics.engine import AnalyticsEngine, separability_by_cut
from moco_compile.analytics.inputs import POOLINGS, pool_features
from moco_compile.analytics.results import (AnalyticsError, CoveragePrecisionCurve, LinearCondition, MLPCondition,
                                            NoRuleError, Separability, SufficientRule)

__all__ = ["AnalyticsEngine", "AnalyticsError", "NoRuleError", "LinearCondition", "MLPCondition", "SufficientRule",
           "Separability", "CoveragePrecisionCurve", "separability_by_cut", "pool_features", "POOLINGS"]
