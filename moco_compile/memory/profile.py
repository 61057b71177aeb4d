"""Where a model's memory goes: weights, estimated and measured peak activations per batch size.

``profile_memory`` joins the static liveness analysis (:mod:`moco_compile.passes.memory.liveness`)
with measured peaks of real onnxruntime runs (:mod:`moco_compile.runtime.memory.peak`) on rows
of the user's data, or on rows made from the model's declared inputs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from moco_compile.errors import CalibrationDataError, ModelError
from moco_compile.importer import input_dtypes
from moco_compile.passes.graph.flops import measure_shapes
from moco_compile.passes.graph.index import GraphIndex
from moco_compile.passes.memory.liveness import feed_shapes, liveness
from moco_compile.runtime.latency import batches_of
from moco_compile.runtime.memory.peak import can_measure, measure_peak

TOP_TENSORS = 8
ESTIMATE_TOLERANCE = 0.25  # the estimate is called close when within this fraction of the measured peak


def example_feed(model: onnx.ModelProto, rows: Mapping[str, np.ndarray] | None, batch_size: int) -> dict[str, np.ndarray]:
    """``batch_size`` rows for the model's inputs: the user's rows (cycled), or zeros of each input's
    declared shape when every dimension but the batch is fixed."""
    names = GraphIndex(model).graph_inputs
    if rows is not None:
        missing = [name for name in names if name not in rows]
        if missing:
            raise CalibrationDataError(f"the data has no array for the model input(s) {missing}; "
                                       f"it has {sorted(rows)}. Give one array per model input")
        return batches_of({name: rows[name] for name in names}, batch_size)[0]
    dtypes = input_dtypes(model)
    feed = {}
    for value in model.graph.input:
        if value.name not in names:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if any(d is None for d in dims[1:]):
            raise CalibrationDataError(f"input {value.name!r} has a dimension besides the batch that the model "
                                       "does not fix (e.g. a sequence length): give --calib rows so moco knows it")
        feed[value.name] = np.zeros([batch_size, *dims[1:]], dtype=dtypes[value.name])
    return feed


def profile_memory(model: onnx.ModelProto, batch_sizes: Sequence[int] = (1, 8, 64),
                   rows: Mapping[str, np.ndarray] | None = None, measure: bool = True) -> dict[str, Any]:
    """Per batch size: weights' bytes, the liveness estimate of peak activations (with the
    largest tensors live at the peak and the live-memory timeline), and the measured peaks of
    the graph as written and of a default onnxruntime session."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    measure = measure and can_measure()
    profiles = []
    for batch_size in batch_sizes:
        feed = example_feed(model, rows, batch_size)
        estimate = liveness(model, feed_shapes(feed), measure_shapes(model, feed))
        entry: dict[str, Any] = {
            "batch_size": batch_size,
            "weight_bytes": estimate.weight_bytes,
            "estimated_peak_bytes": estimate.peak_bytes,
            "peak_node": estimate.peak_node,
            "top_tensors": [{"name": t.name, "bytes": t.bytes, "producer": t.producer}
                            for t in estimate.top_tensors(TOP_TENSORS)],
            "unsized_tensors": estimate.unsized,
            "timeline": [{"node": label, "bytes": live} for label, live in estimate.timeline],
            "measured_peak_bytes": None, "measured_default_session_bytes": None,
        }
        if measure:
            serialized = model.SerializeToString()
            entry["measured_peak_bytes"] = measure_peak(serialized, feed).run_bytes
            entry["measured_default_session_bytes"] = measure_peak(serialized, feed, default_session=True).run_bytes
        entry["estimate_note"] = _estimate_note(entry)
        profiles.append(entry)
    return {"graph": model.graph.name, "nodes": len(model.graph.node), "batches": profiles}


def _estimate_note(entry: Mapping[str, Any]) -> str:
    measured, estimated = entry["measured_peak_bytes"], entry["estimated_peak_bytes"]
    if measured is None:
        return "not measured (needs Linux /proc)"
    if measured == 0:
        return "the run added no resident memory the kernel could see"
    ratio = estimated / measured
    if abs(ratio - 1) <= ESTIMATE_TOLERANCE:
        return f"estimate within {ESTIMATE_TOLERANCE:.0%} of measured ({ratio:.2f}x)"
    if ratio < 1:
        return (f"estimate {ratio:.2f}x of measured: onnxruntime holds {measured - estimated:,} bytes more than the "
                "graph's live tensors need (kernel temporaries, buffers released after their last reader, "
                "allocator rounding: what a liveness analysis of the graph cannot see)")
    return (f"estimate {ratio:.2f}x of measured: onnxruntime reuses buffers or runs ops in place where the "
            "analysis counts separate tensors")


def check_profilable(model: onnx.ModelProto) -> None:
    """Raise :class:`ModelError` for a model without nodes to profile."""
    if not model.graph.node:
        raise ModelError("the model has no nodes: there is nothing to profile")
