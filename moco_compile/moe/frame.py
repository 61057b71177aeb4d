"""Routing traces: per token and MoE layer, the hidden state entering the layer and the experts chosen.

A trace is an :class:`~moco_compile.frame.ActivationFrame`, one row per token, ordered by
window then position::

    moe.window      int32   which calibration window the token is in
    moe.position    int32   its position in the window
    moe.hidden.<l>  [D]     residual stream entering layer l's MoE block (float32)
    moe.experts.<l> [k]     the experts layer l routed the token to (int16, by gate weight)

:class:`RoutingSpec` is what a trace, the predictors fitted on it and the model must
agree on.  Recording a trace needs torch (:mod:`moco_compile.moe.trace`); reading one does not.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from moco_compile.errors import TraceMismatchError
from moco_compile.frame import ActivationFrame

WINDOW = "moe.window"
POSITION = "moe.position"


def hidden_column(layer: int) -> str:
    """Column of the hidden states entering layer ``layer``'s MoE block."""
    return f"moe.hidden.{layer}"


def experts_column(layer: int) -> str:
    """Column of the experts layer ``layer`` chose."""
    return f"moe.experts.{layer}"


@dataclass(frozen=True)
class RoutingSpec:
    """What a trace and the predictors fitted on it must agree with the model on."""

    num_layers: int
    num_experts: int
    top_k: int
    d_model: int

    def save(self, path: str | os.PathLike) -> None:
        """Write the spec as JSON."""
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingSpec":
        """Read a spec :meth:`save` wrote (:class:`TraceMismatchError` if it is not one)."""
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise TraceMismatchError(f"{path} is not a routing spec moco wrote ({error}); trace the model "
                                     "again with `moco moe trace`") from error

    def check(self, other: "RoutingSpec", what: str) -> None:
        """:class:`TraceMismatchError` unless ``other`` (the model's) equals this one (the ``what``'s)."""
        if other != self:
            differ = [f"{name} {getattr(self, name)} vs {getattr(other, name)}"
                      for name in asdict(self) if getattr(self, name) != getattr(other, name)]
            raise TraceMismatchError(f"the {what} does not match the model ({', '.join(differ)}, {what} vs "
                                     f"model); trace this model again with `moco moe trace`")


def check_trace(frame: ActivationFrame, spec: RoutingSpec) -> None:
    """:class:`TraceMismatchError` unless ``frame`` has the columns and shapes of a trace of ``spec``'s model."""
    expected = [WINDOW, POSITION] + [name for layer in range(spec.num_layers)
                                     for name in (hidden_column(layer), experts_column(layer))]
    missing = [name for name in expected if name not in frame]
    extra = [name for name in frame.columns if name.startswith("moe.") and name not in expected]
    if missing or extra:
        raise TraceMismatchError(
            f"the trace's layers do not match the model's {spec.num_layers} MoE layers (missing columns: "
            f"{', '.join(missing) or 'none'}; columns of other layers: {', '.join(extra) or 'none'}); trace this "
            "model again with `moco moe trace`")
    for layer in range(spec.num_layers):
        shapes = (frame.row_shape(hidden_column(layer)), frame.row_shape(experts_column(layer)))
        if shapes != ((spec.d_model,), (spec.top_k,)):
            raise TraceMismatchError(f"layer {layer} of the trace has hidden states {list(shapes[0])} and "
                                     f"{list(shapes[1])} experts per token; the model has width {spec.d_model} "
                                     f"and top-{spec.top_k} routing; trace this model again with `moco moe trace`")
