"""Calibration pass: run the model once over the calibration data and record, per row,
the pooled features at every cut and the full model's prediction.

One onnxruntime session serves the whole pass: the cut tensors are pooled inside
the graph (the same nodes the compiled graph uses) and exposed as extra outputs.
Rows are streamed into an on-disk :class:`ActivationFrame` with one column per
(cut, pooling piece): ``<cut>`` holds the mean-pooled (or flat) features,
``<cut>:max`` and ``<cut>:grid`` the other pieces; for a text model's ``[N, S, D]``
cuts, ``<cut>`` holds the mask-aware token mean and ``<cut>:first_token`` token 0 (a
decoder's: ``<cut>:last_token``, the last token the mask keeps).
``probabilities`` holds the full model's class probabilities (its output through a
softmax unless it ends in Softmax or LogSoftmax), which exits' confidence is fitted to.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy.special import softmax

from moco_compile.constants import LABELS, OUTPUTS, PREDICTIONS, PROBABILITIES
from moco_compile.errors import CalibrationDataError, ModelError
from moco_compile.frame import ActivationFrame, FrameWriter, load_frame
from moco_compile.passes.calibration.pooling import piece_kind, piece_nodes, pieces_for, variant_pieces
from moco_compile.passes.graph.cut_points import CutPoint
from moco_compile.passes.graph.index import GraphIndex, opset_of

def cut_column(cut: CutPoint) -> str:
    """Name of a cut in the frame: its module name where known, else its tensor."""
    return cut.module or cut.tensor


def piece_column(column: str, piece: str) -> str:
    kind = piece_kind(piece)
    return column if kind in ("mean", "flat", "token_mean") else f"{column}:{kind}"


def variant_columns(column: str, variant: str) -> list[str]:
    """The frame columns of a cut's pooling variant, one per piece."""
    return [piece_column(column, piece) for piece in variant_pieces(variant)]


def variant_features(frame: ActivationFrame, column: str, variant: str) -> np.ndarray:
    """``[N, D]`` features of a pooling variant, concatenated from the frame's piece columns."""
    parts = [frame[name].reshape(len(frame), -1) for name in variant_columns(column, variant)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def probe_model(model: onnx.ModelProto, cuts: Sequence[CutPoint],
                raw: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` with every pooling piece of every cut added as an output (and, with ``raw``,
    the unpooled cut tensor as ``<cut>:raw``); returns the column names."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    columns = []
    taken = {name for node in model.graph.node for name in node.output} | {i.name for i in model.graph.input}
    opset = opset_of(model)
    for position, cut in enumerate(cuts):
        if raw:
            column = f"{cut_column(cut)}:raw"
            probe.graph.node.append(onnx.helper.make_node("Identity", [cut.tensor], [probe_output(column, taken)]))
            probe.graph.output.append(onnx.ValueInfoProto(name=probe_output(column, taken)))
            columns.append(column)
        for piece in pieces_for(cut.shape, cut.sequence_mask, cut.summary_token, cut.tokens):
            column = piece_column(cut_column(cut), piece)
            probe.graph.node.extend(piece_nodes(cut.tensor, piece, cut.shape, probe_output(column, taken),
                                                f"moco/probe{position}", opset=opset))
            probe.graph.output.append(onnx.ValueInfoProto(name=probe_output(column, taken)))
            columns.append(column)
    return probe, columns


def probe_output(column: str, taken: set[str]) -> str:
    """The probe's output name for a column: the column itself, unless the graph already has a
    tensor of that name (a cut without module scopes is named by its tensor)."""
    return f"moco/probe:{column}" if column in taken else column


class FeatureProbe:
    """One onnxruntime session over the probe model: a batch of model inputs in, frame columns out.

    Both engines call it: :func:`calibrate` in this process, the Ray engine once per actor.
    """

    def __init__(self, model: onnx.ModelProto, output: str, cuts: Sequence[CutPoint], raw: bool = False,
                 threads: int = 0) -> None:
        """``threads``: onnxruntime's intra-op threads (0: its default, one per core)."""
        probe, self.columns = probe_model(model, cuts, raw)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(probe.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own Fail, InvalidGraph, NotImplemented, ...
            raise ModelError(f"onnxruntime cannot load the model ({error}); check that it runs with "
                             "onnxruntime.InferenceSession on the CPU (operators, opset, custom domains)") from error
        self.input_names = [i.name for i in self._session.get_inputs()]
        taken = {name for node in model.graph.node for name in node.output} | {i.name for i in model.graph.input}
        self._fetch = [output] + [probe_output(column, taken) for column in self.columns]
        self._head = GraphIndex(model).probability_head(output)

    def __call__(self, batch: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        """Frame columns of one validated batch: pooled pieces, ``predictions``, ``probabilities``,
        ``outputs`` (the classifier output itself), ``labels`` if given."""
        feed = {name: batch[name] for name in self.input_names}
        try:
            results = self._session.run(self._fetch, feed)
        except Exception as error:  # onnxruntime's own exception types
            shapes = {name: f"{values.dtype}{list(values.shape)}" for name, values in feed.items()}
            raise CalibrationDataError(f"onnxruntime failed on {where} ({shapes}): "
                                       f"{error}; check that the calibration arrays have the shapes and "
                                       "dtypes the model expects and values in its range") from error
        rows = {name: values.astype(np.float32) for name, values in zip(self.columns, results[1:])}
        rows[PREDICTIONS] = results[0].argmax(axis=1).astype(np.int64)
        rows[PROBABILITIES] = output_probabilities(results[0], self._head)
        rows[OUTPUTS] = results[0]  # the original's output: verification compares the compiled graph with it
        if LABELS in batch:
            rows[LABELS] = batch[LABELS]
        return rows


def output_probabilities(values: np.ndarray, head: str | None) -> np.ndarray:
    """``[N, C]`` float32 class probabilities from a classifier output that is ``head``
    (``Softmax``, ``LogSoftmax``, or None: logits)."""
    values = values.astype(np.float64)
    if head == "Softmax":
        return values.astype(np.float32)
    if head == "LogSoftmax":
        return np.exp(values).astype(np.float32)
    return softmax(values, axis=1).astype(np.float32)


def calibrate(model: onnx.ModelProto, output: str, cuts: Sequence[CutPoint],
              batches: Iterable[Mapping[str, np.ndarray]], path: str | Path,
              total_rows: int | None = None, show_progress: bool = True, raw: bool = False) -> ActivationFrame:
    """Write the frame: pooled pieces per cut, ``predictions`` (argmax of ``output``), ``labels`` if given.

    With ``raw`` the unpooled cut tensors are stored too (``<cut>:raw``, e.g. ``[N, C, H, W]``).
    """
    probe = FeatureProbe(model, output, cuts, raw)
    with FrameWriter(path) as writer, Progress(
            TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
            TimeElapsedColumn(), disable=not show_progress, transient=True) as progress:
        task = progress.add_task("calibrate", total=total_rows)
        for number, batch in enumerate(batches):
            rows = probe(batch, f"calibration batch {number}")
            writer.write(rows)
            progress.advance(task, len(rows[PREDICTIONS]))
    return load_frame(path)
