"""Calibration pass: run the model once over the calibration data and record, per row,
the pooled features at every cut and the full model's prediction.

One onnxruntime session serves the whole pass: the cut tensors are pooled inside
the graph (the same nodes the compiled graph uses) and exposed as extra outputs.
Rows are streamed into an on-disk :class:`ActivationFrame`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moco_compile.frame import ActivationFrame, FrameWriter, load_frame
from moco_compile.passes.cut_points import CutPoint
from moco_compile.passes.pooling import pooling_for, pooling_nodes

PREDICTIONS = "predictions"
LABELS = "labels"


def feature_output(position: int) -> str:
    return f"moco/feature_{position}"


def probe_model(model: onnx.ModelProto, cuts: Sequence[CutPoint]) -> onnx.ModelProto:
    """``model`` with each cut's pooled features added as output ``moco/feature_<i>``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for position, cut in enumerate(cuts):
        name = feature_output(position)
        probe.graph.node.extend(pooling_nodes(cut.tensor, pooling_for(cut.shape), name, f"moco/probe_{position}"))
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    return probe


def calibrate(model: onnx.ModelProto, output: str, cuts: Sequence[CutPoint],
              batches: Iterable[Mapping[str, np.ndarray]], path: str | Path,
              total_rows: int | None = None, show_progress: bool = True) -> ActivationFrame:
    """Write an ActivationFrame with one column per cut (named ``cut.module`` or ``cut.tensor``),
    ``predictions`` (argmax of ``output``) and ``labels`` when the batches carry them."""
    session = ort.InferenceSession(probe_model(model, cuts).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    fetch = [output] + [feature_output(i) for i in range(len(cuts))]
    columns = [cut_column(cut) for cut in cuts]
    with FrameWriter(path) as writer, Progress(
            TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
            TimeElapsedColumn(), disable=not show_progress, transient=True) as progress:
        task = progress.add_task("calibrate", total=total_rows)
        for batch in batches:
            results = session.run(fetch, {name: batch[name] for name in input_names})
            rows = {name: values.astype(np.float32) for name, values in zip(columns, results[1:])}
            rows[PREDICTIONS] = results[0].argmax(axis=1).astype(np.int64)
            if LABELS in batch:
                rows[LABELS] = batch[LABELS]
            writer.write(rows)
            progress.advance(task, len(results[0]))
    return load_frame(path)


def cut_column(cut: CutPoint) -> str:
    """Frame column holding a cut's pooled features."""
    return cut.module or cut.tensor
