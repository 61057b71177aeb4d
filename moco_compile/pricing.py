"""Price a CPU target's exits on the model being compiled (``--target cpu --serving-batch B``, no profile).

moco's CPU figures (``PlannerConfig.exit_fixed_cost``, ``boundary_cost``) are one compromise for every
net and batch, and ``moco profile-target`` times a generic exit beside a generic MatMul.  What an exit
costs against the layers it lets rows skip depends on both: on the reference CNN at batch 1 (onnxruntime
1.32, 2 cores) an exit with an MLP head costs about 20 us while the model runs its 40.6 MFLOPs in
227 us, so one exit is worth 3.6 million FLOPs there, 14x the default; a generic profile said 343,000.

So, at the serving batch on this machine, on the calibration rows:

1. the original model's time per batch gives its rate, ``FLOPs * B / time``;
2. the same model with :data:`PRICING_EXITS` closed exits (thresholds +inf: every row goes on) at cuts
   spread over its compute (every cut when it has fewer), each with the widest head the compile may
   write there (an MLP head, where heads may be MLPs, on the cut's last pooling variant), in the
   layout the compile writes, gives an exit's time: ``(closed - original) / exits``.

The result is a :class:`~moco_compile.passes.planning.target.TargetProfile` that
:func:`~moco_compile.passes.planning.target.priced_config` turns into the planner's costs.  A closed exit
moves every row on, so its time includes the copy of the rows (nested layout) at those cuts' sizes;
the profile's copy bandwidth is set so that ``boundary_cost`` stays the configuration's.
"""
from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from moco_compile.passes.calibration.mlp_head import HIDDEN_WIDTH, MLPScores
from moco_compile.passes.calibration.pooling import variant_width
from moco_compile.passes.calibration.rules import LinearScores
from moco_compile.passes.graph.cut_points import CutPoint
from moco_compile.passes.graph.rewrite import insert_exits
from moco_compile.passes.planning.candidates import head_variants
from moco_compile.passes.planning.config import PlannerConfig
from moco_compile.passes.planning.target import BYTES_MOVED_PER_ELEMENT, TargetProfile
from moco_compile.passes.planning.types import Exit
from moco_compile.runtime.latency import compare_latency
from moco_compile.runtime.profile_target import cpu_name
from moco_compile.runtime.session import CPU, make_session

# closed exits timed together (all cuts when fewer): one exit's time is lost in the model's timing noise.
# 6-block MiniLM, batch 1, three timings each: 94-183 us per exit with 3 exits (once 0: slower original),
# 101-120 us with 8
PRICING_EXITS = 8
PRICING_SECONDS = 6.0  # timing both graphs, in all

log = logging.getLogger("moco")


def measured_cpu_profile(model: onnx.ModelProto, output: str, cuts: Sequence[CutPoint], num_classes: int,
                         rows: Mapping[str, np.ndarray], batch: int, config: PlannerConfig,
                         seconds: float = PRICING_SECONDS) -> TargetProfile:
    """This CPU's profile for ``model`` served ``batch`` rows at a time (module docstring), timed on
    ``rows`` (repeated when fewer than a batch) for about ``seconds``; ``config`` gives the layout, the
    heads and the boundary cost."""
    chosen = _spread(cuts, PRICING_EXITS)
    closed = insert_exits(model, [_closed_exit(cut, num_classes, config) for cut in chosen], output,
                          config.exit_layout)
    count = len(next(iter(rows.values())))
    repeat = np.arange(max(count, batch)) % count
    feeds = {name: values[repeat] for name, values in rows.items()}
    sessions = {"original": make_session(model, [CPU]), "closed": make_session(closed, [CPU])}
    timing = compare_latency(sessions, feeds, batch, min_seconds=seconds)
    rate = (cuts[0].flops_before + cuts[0].flops_after) * batch / timing["original"]
    per_exit = (timing["closed"] - timing["original"]) / len(chosen)
    if per_exit <= 0:
        log.warning("pricing: %d closed exits ran no slower than the model at batch %d on this machine (timing "
                    "noise); exits are priced at no fixed cost", len(chosen), batch)
    return TargetProfile(name="cpu", provider=CPU, exit_fixed_seconds=max(0.0, per_exit),
                         flops_per_second={batch: rate},
                         copy_bytes_per_second=BYTES_MOVED_PER_ELEMENT * rate / config.boundary_cost,
                         machine=f"{cpu_name()}, this model's closed exits",
                         onnxruntime=f"onnxruntime {ort.__version__}",
                         measured_on=datetime.date.today().isoformat())


def _spread(cuts: Sequence[CutPoint], count: int) -> list[CutPoint]:
    """Up to ``count`` cuts at even quantiles of the compute, in graph order."""
    ordered = sorted(cuts, key=lambda cut: cut.flops_before)
    count = min(count, len(ordered))
    return [ordered[int((k + 0.5) * len(ordered) / count)] for k in range(count)]


def _closed_exit(cut: CutPoint, num_classes: int, config: PlannerConfig) -> Exit:
    """An exit no row takes, with the widest pooling and head the compile may write at ``cut``."""
    mlp = "mlp" in config.exit_heads
    pooling = head_variants(cut, mlp)[-1]
    width = variant_width(cut.shape, pooling)
    rng = np.random.default_rng(0)

    def weight(rows: int, cols: int) -> np.ndarray:
        return rng.normal(0, 1 / np.sqrt(rows), (rows, cols)).astype(np.float32)

    zeros = np.zeros(num_classes, np.float32)
    if mlp:
        scores = MLPScores(weight(HIDDEN_WIDTH, num_classes), zeros, "log_softmax",
                           hidden_weight=weight(width, HIDDEN_WIDTH), hidden_bias=np.zeros(HIDDEN_WIDTH, np.float32))
    else:
        scores = LinearScores(weight(width, num_classes), zeros, "log_softmax")
    return Exit(cut, cut.tensor, pooling, scores, np.full(num_classes, np.inf, np.float32), scores.flops,
                confidence_scale=1.0)
