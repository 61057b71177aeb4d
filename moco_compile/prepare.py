"""From the user's model and calibration data to what the passes read.

Validated calibration batches, the model's cut points measured on the first row, and
side inputs made recomputable from the compressed rows; the same preparation again for a
saved plan (:func:`model_for_plan`), so a plan re-applied to a model meets the graph the
compile rewrote.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx

from moco_compile.calibration_data import CalibrationSpec, iter_batches
from moco_compile.constants import LABELS
from moco_compile.errors import CalibrationDataError, ModelError
from moco_compile.export_check import outputs_agree
from moco_compile.importer import ImportedModel, TextInputs, import_model
from moco_compile.passes.graph.batch_reads import batch_axis, batch_leading, batch_size_roots, localize_batch_reads
from moco_compile.passes.graph.binary_output import from_two_class
from moco_compile.passes.graph.cut_points import (HEAVY_OPS, RECURRENT_OPS, CutPoint, find_cut_points,
                                                  localize_side_tensors, side_inputs_of)
from moco_compile.passes.graph.flops import flops_per_row, measure_shapes
from moco_compile.runtime.session import CPU, make_session

MAX_VERIFIED_ROWS = 4096  # calibration rows whose inputs are kept to verify the compiled graph
FREED_BATCH_CHECK_ROWS = 8  # at least: rows run in one batch against the user's fixed-batch graph


def cut_points_of(imported: ImportedModel, calibration: Mapping[str, Any] | Iterable[Mapping[str, Any]],
                batch_size: int, classify: bool = True) -> tuple[Iterable[dict], list[CutPoint]]:
    """Validated calibration batches, and the model's cut points measured on the first row.  With
    ``classify`` (compile, calibrate: the rows will be classified) a one-column output that no Sigmoid
    makes is checked as a binary classifier's logit (:func:`check_binary_logit`).

    Side inputs may cross a cut (the rewrite compresses them with the rows): a text model's
    (``imported.text``) masks, and for any other model each input besides the main one that
    the network reads cheaply (:func:`~moco_compile.passes.graph.cut_points.side_inputs_of`).
    """
    text = imported.text
    batches = iter_batches(calibration, calibration_spec(imported), batch_size)
    if text is not None:
        batches = _checked_text_batches(batches, text, imported.input_names)
    batches = _peekable(batches)
    first = batches.peek()
    if imported.fixed_batch is not None:
        check_freed_batch(imported, first)
    if classify and imported.binary is not None and not imported.binary.sigmoid:
        check_binary_logit(imported, first)
    feed = {name: first[name][:1] for name in imported.input_names}
    shapes = None if text is not None else measure_shapes(imported.model, feed)
    given = imported.model
    side = _localize_side_inputs(imported, feed, shapes)
    if imported.model is not given or shapes is None:  # localizing changed the graph: measured (again) on it
        shapes = measure_shapes(imported.model, feed)
    node_flops = flops_per_row(imported.model, shapes)
    text_options = {} if text is None else {"sequence_mask": text.mask, "summary_token": text.summary_token,
                                            "min_fraction_before": 0.0}
    cuts = find_cut_points(imported.model, node_flops, shapes, imported.scopes, side_inputs=side, **text_options)
    if not cuts:
        raise ModelError("the model has no cut point: no tensor separates it into a prefix and a remainder with "
                         "real compute on both sides, so there is nowhere to exit" + _batch_axis_hint(imported, feed)
                         + _integer_activations_hint(imported))
    return batches, cuts


def _integer_activations_hint(imported: ImportedModel) -> str:
    """Why a quantized model in onnxruntime's QOperator format has no cut: its activations between QLinear*
    operators are integers, which exits do not read."""
    if not any(node.op_type.startswith("QLinear") for node in imported.model.graph.node):
        return ""
    return ("; its activations are int8 between its QLinear* operators (onnxruntime's QOperator format), and exits "
            "read float tensors: compile the float model, or one quantized in the QDQ format "
            "(quantize_static(..., quant_format=QuantFormat.QDQ)), which keeps float tensors between its blocks")


def _batch_axis_hint(imported: ImportedModel, feed: Mapping[str, np.ndarray]) -> str:
    """Why a model with layers may have no cut: most of its heavy layers' outputs carry the batch on another
    axis than the first (measured at 1 and 2 rows), and exits cut only tensors with the batch first."""
    one, two = _shapes_on_one_and_two_rows(imported.model, feed)
    heavy = [(node.op_type, name) for node in imported.model.graph.node
             if node.op_type in HEAVY_OPS | RECURRENT_OPS for name in node.output[:1] if name in one]
    later = [(op, name) for op, name in heavy if batch_axis(one[name], two.get(name, ())) not in (None, 0)]
    if not later or 2 * len(later) < len(heavy):
        return ""
    op, name = later[0]
    advice = (f"recurrent layers ({op}), whose ONNX tensors put the sequence first whatever batch_first says, "
              "are not supported yet" if op in RECURRENT_OPS else
              "where the model allows, build it batch first (e.g. nn.TransformerEncoder(..., batch_first=True), "
              "not PyTorch's default) and export it again")
    return (f": its layers carry the batch on another axis than the first ({op} output {name!r} is "
            f"{list(one[name])} for one row, axis {batch_axis(one[name], two[name])} doubling for two), and "
            f"exits cut only tensors with the batch first; {advice}")


def _shapes_on_one_and_two_rows(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """Every tensor's shape with ``feed`` (one row) and with it twice: where the batch is (``batch_axis``)."""
    twice = {name: np.concatenate([value, value]) for name, value in feed.items()}
    return measure_shapes(model, feed), measure_shapes(model, twice)


def check_freed_batch(imported: ImportedModel, batch: Mapping[str, np.ndarray]) -> int:
    """Check that the graph whose batch moco freed (``imported.fixed_batch``) gives, on a batch of the
    calibration rows, the classifier outputs the user's graph gives run its fixed batch at a time; the
    rows checked.  Raises :class:`ModelError` saying how to re-export the model when it does not."""
    fixed = imported.fixed_batch
    shapes = ", ".join(f"{value.name} {[d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]}"
                       for value in fixed.model.graph.input if value.name in imported.input_names)
    advice = (f"the model's inputs are fixed at a batch of {fixed.size} ({shapes}) and moco runs batches of any "
              "size: re-export it with a dynamic batch axis (torch.onnx.export(..., dynamic_axes={name: {0: "
              "'batch'} for every input and output}) or dynamic_shapes with torch.export.Dim('batch'))")
    rows = len(next(iter(batch.values())))
    chunks = min(rows // fixed.size, max(2, -(-FREED_BATCH_CHECK_ROWS // fixed.size)))
    if chunks == 0:
        raise ModelError(f"{advice}; the calibration batch has {rows} rows, fewer than that batch")
    checked = chunks * fixed.size
    feed = {name: np.ascontiguousarray(batch[name][:checked]) for name in imported.input_names}
    binary = imported.binary  # the user's graph has the one column: the freed graph is given it back to compare
    output = binary.name if binary is not None else imported.output
    try:
        original = make_session(fixed.model, [CPU])
        expected = np.concatenate([original.run([output], {name: values[i:i + fixed.size]
                                                           for name, values in feed.items()})[0]
                                   for i in range(0, checked, fixed.size)])
    except Exception as error:  # onnxruntime raises its own exception types
        shapes = {name: f"{values.dtype}{list(values.shape[1:])}" for name, values in feed.items()}
        raise CalibrationDataError(f"onnxruntime failed on the first calibration rows, {fixed.size} at a time "
                                   f"(rows of {shapes}): {str(error).strip().splitlines()[0]}; check that the "
                                   "calibration arrays have the shapes and dtypes the model expects") from error
    try:
        freed_model = imported.model if binary is None else from_two_class(imported.model, binary)
        freed = make_session(freed_model, [CPU]).run([output], feed)[0]
    except Exception as error:  # onnxruntime raises its own exception types
        raise ModelError(f"{advice}; freeing that dimension left a graph onnxruntime cannot run on {checked} "
                         f"rows ({str(error).strip().splitlines()[0]})") from error
    if not outputs_agree(freed, expected):
        raise ModelError(f"{advice}; with that dimension freed, {checked} rows in one batch get other outputs "
                         "than the same rows run one batch at a time (the graph fixes the batch elsewhere too)")
    return checked


def check_binary_logit(imported: ImportedModel, batch: Mapping[str, np.ndarray]) -> None:
    """A one-column output that no Sigmoid makes is read as a binary classifier's logit: refuse it unless
    the calibration rows have labels (it may be a regression) and some value lies outside [0, 1] (else
    it is a probability moco cannot see made, and a threshold of 0 would put every row in class 1)."""
    name = imported.binary.name
    if LABELS not in batch:
        raise ModelError(f"output {name!r} is one column that does not end in a Sigmoid: a binary classifier's "
                         "logit, or a regression, which moco does not compile; give the calibration rows their "
                         "labels (0 or 1) to compile it as a binary classifier (class 1 where the logit is above 0)")
    feed = {input_name: np.ascontiguousarray(batch[input_name]) for input_name in imported.input_names}
    logits = make_session(imported.model, [CPU]).run([imported.output], feed)[0][:, 1]
    if logits.min() >= 0 and logits.max() <= 1:
        raise ModelError(f"output {name!r} is one column within [0, 1] on every row of the first calibration "
                         f"batch ({len(logits)} rows): a probability, but not one a Sigmoid at the graph's end "
                         "makes, so moco cannot tell its logit; end the graph in the Sigmoid (or output the logit)")


def model_for_plan(model: onnx.ModelProto, output: str | None,
                   feed: Mapping[str, np.ndarray]) -> tuple[onnx.ModelProto, str]:
    """``model`` as compile hands it to the rewrite (imported, side inputs a cut may cross
    recomputed from the compressed rows, as :func:`cut_points_of` does), and its classifier
    output: where a saved plan's exits can be inserted again.  ``feed``: one row of inputs."""
    imported = import_model(model, output=output)
    if imported.binary is not None:
        raise ModelError(f"output {imported.binary.name!r} is one column (a binary classifier): staged serving "
                         "and the memory passes rebuild the graph from the plan, which they cannot do for such "
                         "an output yet; serve the compiled model.onnx, which is complete")
    _localize_side_inputs(imported, feed)
    return imported.model, imported.output


def _localize_side_inputs(imported: ImportedModel, feed: Mapping[str, np.ndarray],
                          shapes: Mapping[str, tuple] | None = None) -> tuple[str, ...]:
    """Make ``imported.model``'s later layers recompute what they derive from side inputs (a text
    model's masks; for any other model each input besides the main one that the network reads
    cheaply, e.g. a feature vector joined before the head) and from the batch size
    (:mod:`~moco_compile.passes.graph.batch_reads`) from the compressed rows; the side inputs.
    ``shapes``: the model's tensor shapes on ``feed`` (one row), when measured already."""
    if imported.text is None and shapes is None:
        shapes = measure_shapes(imported.model, feed)
    side = tuple(imported.text.side) if imported.text is not None else tuple(side_inputs_of(
        imported.model, flops_per_row(imported.model, shapes)))
    if side:
        imported.model = localize_side_tensors(imported.model, side)
    if batch_size_roots(imported.model, excluded=side):
        leading = batch_leading(*_shapes_on_one_and_two_rows(imported.model, feed))
        imported.model = localize_batch_reads(imported.model, leading, excluded=side)
    return side


def calibration_spec(imported: ImportedModel) -> CalibrationSpec:
    """What calibration rows must hold for ``imported`` (a text model's ``token_type_ids`` may be left out)."""
    optional = {"token_type_ids": "input_ids"} if imported.text is not None \
        and "token_type_ids" in imported.input_names else {}
    return CalibrationSpec(imported.model, imported.num_classes, zeros_like=optional)


def _checked_text_batches(batches: Iterable[dict], text: TextInputs, names: list[str]) -> Iterator[dict]:
    """Text calibration batches: token inputs of one ``[N, S]`` shape, ``S`` within the model's limit."""
    for number, batch in enumerate(batches):
        shapes = {name: batch[name].shape for name in names}
        mask_shape = shapes[text.mask]
        if any(len(shape) != 2 or shape != mask_shape for shape in shapes.values()):
            raise CalibrationDataError(f"calibration batch {number}: the token inputs must all be "
                                       f"[rows, sequence length] arrays of one shape, got {shapes}; "
                                       "tokenize with padding (e.g. padding='max_length')")
        if text.max_length is not None and mask_shape[1] > text.max_length:
            raise CalibrationDataError(f"calibration batch {number}: sequences have {mask_shape[1]} tokens, "
                                       f"more than the model's maximum of {text.max_length}; tokenize with "
                                       f"truncation=True, max_length<={text.max_length}")
        yield batch


class _peekable:
    def __init__(self, iterator: Iterator[dict]) -> None:
        self._iterator = iterator
        self._head: list[dict] = []

    def peek(self) -> dict:
        if not self._head:
            try:
                self._head.append(next(self._iterator))
            except StopIteration:
                raise CalibrationDataError("the calibration data has no rows") from None
        return self._head[0]

    def __iter__(self) -> Iterator[dict]:
        yield from self._head
        self._head = []
        yield from self._iterator
