"""Binary classifiers with one output column (a logit, or a Sigmoid's probability): compiled and shipped
with that column, evaluated by its own threshold, refused where the column may be a regression."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from moco_compile import PlannerConfig, compile
from moco_compile.cli import app
from moco_compile.errors import ModelError
from moco_compile.evaluation import evaluate_build
from moco_compile.importer import import_model
from moco_compile.passes.graph.binary_output import from_two_class, to_two_class
from moco_compile.prepare import model_for_plan

SHIRT = 6  # Fashion-MNIST's hardest class: a shirt or not is a binary task with rows left for the full network
COMPILE_ROWS = 3000


def _shirt_or_not(reference_model: onnx.ModelProto, sigmoid: bool) -> onnx.ModelProto:
    """The reference CNN as a one-column binary classifier: the logit of "shirt" against the other
    classes (its log-probability minus theirs), as ``score``, through a Sigmoid when ``sigmoid``."""
    model = onnx.ModelProto()
    model.CopyFrom(reference_model)
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["classes" if name == "logits" else name for name in node.output]
    others = [c for c in range(10) if c != SHIRT]
    graph.initializer.extend([numpy_helper.from_array(np.array([SHIRT], np.int64), "shirt"),
                              numpy_helper.from_array(np.array(others, np.int64), "others"),
                              numpy_helper.from_array(np.array([1], np.int64), "class_axis")])
    logit = "logit" if sigmoid else "score"
    graph.node.extend([
        helper.make_node("Gather", ["classes", "shirt"], ["shirt_logit"], axis=1),
        helper.make_node("Gather", ["classes", "others"], ["other_logits"], axis=1),
        helper.make_node("ReduceLogSumExp", ["other_logits", "class_axis"], ["other_logit"], keepdims=1),
        helper.make_node("Sub", ["shirt_logit", "other_logit"], [logit])])
    if sigmoid:
        graph.node.append(helper.make_node("Sigmoid", [logit], ["score"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, ["batch", 1]))
    return model


def _run(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})


@pytest.mark.parametrize("sigmoid", [True, False])
def test_the_two_class_form_has_the_columns_classes_and_restores_it_exactly(reference_model, calibration, sigmoid):
    model = _shirt_or_not(reference_model, sigmoid)
    two_class, binary = to_two_class(model, "score")
    assert binary.sigmoid == sigmoid and [o.name for o in two_class.graph.output] == ["score/two_class"]
    assert ("Sigmoid" in [n.op_type for n in two_class.graph.node]) is False
    images = calibration["images"][:256]
    (column,), (logits,) = _run(model, images), _run(two_class, images)
    probability = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    expected = column[:, 0] if sigmoid else 1 / (1 + np.exp(-column[:, 0]))
    np.testing.assert_allclose(probability, expected, rtol=1e-5, atol=1e-6)
    assert (binary.classes(column) == logits.argmax(axis=1)).all()
    (restored,) = _run(from_two_class(two_class, binary), images)
    np.testing.assert_array_equal(restored, column)


@pytest.mark.slow
def test_a_sigmoid_classifier_compiles_to_its_own_column_and_evaluates_by_its_threshold(
        tmp_path, reference_model, calibration):
    model = _shirt_or_not(reference_model, sigmoid=True)
    labels = (calibration["labels"] == SHIRT).astype(np.int64)
    rows = {"images": calibration["images"][:COMPILE_ROWS], "labels": labels[:COMPILE_ROWS]}
    out = tmp_path / "out"
    onnx.save(model, str(tmp_path / "shirt.onnx"))
    result = compile(tmp_path / "shirt.onnx", rows, out_dir=out, measure_latency=False, show_progress=False,
                     planner_config=PlannerConfig(exit_heads=("linear",)))
    assert result.plan.exits and result.report["classifier_output"] == "score"
    assert "planned and verified its two-class form" in result.report["import_notes"][0]
    assert [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
            for o in result.model.graph.output][0] == ("score", ["batch", 1])
    images = calibration["images"][COMPILE_ROWS:]
    (original,), (compiled, exits) = _run(model, images), _run(result.model, images)
    full = exits == -1
    assert 0 < full.sum() < len(images)
    np.testing.assert_allclose(compiled[full], original[full], rtol=1e-5, atol=1e-6)
    assert ((compiled >= 0) & (compiled <= 1)).all()
    disagreement = ((compiled[:, 0] > 0.5) != (original[:, 0] > 0.5)).mean()
    assert disagreement <= 0.015
    evaluation = evaluate_build(out, {"images": images}, show_progress=False, windows=2)
    assert evaluation["disagreement"]["fraction"] == pytest.approx(disagreement)


def test_a_column_that_may_be_a_regression_needs_labels_to_compile_not_to_inspect(
        tmp_path, reference_model, calibration):
    model = _shirt_or_not(reference_model, sigmoid=False)
    with pytest.raises(ModelError, match="does not end in a Sigmoid: a binary classifier's logit, or a regression"):
        compile(model, {"images": calibration["images"][:COMPILE_ROWS]}, out_dir=tmp_path / "out",
                measure_latency=False, show_progress=False)
    assert not (tmp_path / "out").exists()
    path = tmp_path / "logit.onnx"
    onnx.save(model, str(path))
    inspected = CliRunner().invoke(app, ["inspect", str(path)])
    assert inspected.exit_code == 0 and "layer3" in inspected.output


def _renamed_output(model: onnx.ModelProto, op_type: str) -> onnx.ModelProto:
    """``model`` with ``op_type`` (one input) between its ``score`` and the graph output ``out``."""
    model.graph.node.append(helper.make_node(op_type, ["score"], ["out"]))
    model.graph.output[0].name = "out"
    return model


def test_a_sigmoid_behind_an_identity_is_seen(reference_model):
    two_class, binary = to_two_class(_renamed_output(_shirt_or_not(reference_model, sigmoid=True), "Identity"), "out")
    assert binary.sigmoid and not {"Sigmoid", "Identity"} & {n.op_type for n in two_class.graph.node}


def test_a_probability_moco_cannot_see_made_is_refused(tmp_path, reference_model, calibration):
    """A probability made by Exp / (1 + Exp) rather than a Sigmoid reads as a logit that is never below 0."""
    model = _shirt_or_not(reference_model, sigmoid=False)
    graph = model.graph
    graph.output[0].name = "probability"
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    graph.node.extend([helper.make_node("Exp", ["score"], ["odds"]),
                       helper.make_node("Add", ["odds", "one"], ["odds_plus_one"]),
                       helper.make_node("Div", ["odds", "odds_plus_one"], ["probability"])])
    rows = {"images": calibration["images"][:COMPILE_ROWS],
            "labels": (calibration["labels"][:COMPILE_ROWS] == SHIRT).astype(np.int64)}
    with pytest.raises(ModelError, match=r"within \[0, 1\] on every row .*end the graph in the Sigmoid"):
        compile(model, rows, out_dir=tmp_path / "out", measure_latency=False, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_the_bucketed_layout_is_refused_for_a_one_column_classifier(tmp_path, reference_model, calibration):
    rows = {"images": calibration["images"][:COMPILE_ROWS],
            "labels": (calibration["labels"][:COMPILE_ROWS] == SHIRT).astype(np.int64)}
    with pytest.raises(ModelError, match="the bucketed layout .* compile it with --target cpu"):
        compile(_shirt_or_not(reference_model, sigmoid=True), rows, out_dir=tmp_path / "out", measure_latency=False,
                show_progress=False, planner_config=PlannerConfig(exit_layout="bucketed"))
    assert not (tmp_path / "out").exists()


def test_a_fixed_batch_column_is_checked_on_the_column(reference_model, calibration):
    """A one-column model exported at a fixed batch: the freed graph's two-class form, turned back into the
    column, is what the user's graph is compared with."""
    from moco_compile.prepare import check_freed_batch

    model = _shirt_or_not(reference_model, sigmoid=True)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    imported = import_model(model)
    assert imported.fixed_batch.size == 1 and imported.binary.name == "score"
    assert check_freed_batch(imported, {"images": calibration["images"][:64]}) == 8


def test_rebuilding_a_one_column_classifier_from_its_plan_is_refused(reference_model, calibration):
    model = _shirt_or_not(reference_model, sigmoid=True)
    assert import_model(model).binary.name == "score"
    with pytest.raises(ModelError, match="staged serving and the memory passes rebuild the graph"):
        model_for_plan(model, None, {"images": calibration["images"][:1]})
