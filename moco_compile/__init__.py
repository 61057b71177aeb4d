"""moco: compile trained classifiers into one ONNX graph where easy inputs leave early.

>>> import moco_compile
>>> result = moco_compile.compile("model.onnx", {"images": x, "labels": y}, out_dir="out")  # doctest: +SKIP

Heavy modules load on first use, so ``import moco_compile`` stays light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["compile", "calibrate_frame", "load_frame", "ActivationFrame", "AnalyticsEngine", "Build", "ExitSession",
           "MocoError", "PlannerConfig", "StagedSession"]

if TYPE_CHECKING:
    from moco_compile.analytics import AnalyticsEngine
    from moco_compile.api import calibrate_frame, compile
    from moco_compile.build import Build
    from moco_compile.errors import MocoError
    from moco_compile.frame import ActivationFrame, load_frame
    from moco_compile.passes.planning.config import PlannerConfig
    from moco_compile.runtime.session import ExitSession
    from moco_compile.runtime.staged import StagedSession


def __getattr__(name: str):
    if name in ("compile", "calibrate_frame"):
        from moco_compile import api
        value = getattr(api, name)
    elif name == "Build":
        from moco_compile.build import Build as value
    elif name == "AnalyticsEngine":
        from moco_compile.analytics import AnalyticsEngine as value
    elif name in ("load_frame", "ActivationFrame"):
        from moco_compile import frame
        value = getattr(frame, name)
    elif name == "ExitSession":
        from moco_compile.runtime.session import ExitSession as value
    elif name == "StagedSession":
        from moco_compile.runtime.staged import StagedSession as value
    elif name == "PlannerConfig":
        from moco_compile.passes.planning.config import PlannerConfig as value
    elif name == "MocoError":
        from moco_compile.errors import MocoError as value
    else:
        raise AttributeError(f"module 'moco_compile' has no attribute {name!r}")
    return value
