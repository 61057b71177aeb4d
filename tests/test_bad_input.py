"""Bad input: a clear error naming the problem, and never a partly written output directory."""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from moco_compile import compile
from moco_compile.cli import app
from moco_compile.errors import BudgetError, CalibrationDataError, ModelError, OutputError


def _compile(model, calibration, out, **kwargs):
    return compile(model, calibration, out_dir=out, measure_latency=False, show_progress=False, **kwargs)


def _assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_model_file(tmp_path, calibration):
    with pytest.raises(ModelError, match="does not exist"):
        _compile(tmp_path / "nope.onnx", calibration, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_corrupt_model_file(tmp_path, calibration, reference_onnx):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(reference_onnx.read_bytes()[:5000])
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        _compile(broken, calibration, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_model_that_is_not_a_classifier(tmp_path, calibration, reference_model):
    feature_map = next(n.output[0] for n in reference_model.graph.node if n.op_type == "Relu")
    path = tmp_path / "features.onnx"
    onnx.utils.extract_model(_save(reference_model, tmp_path / "ref.onnx"), path, ["images"], [feature_map])
    with pytest.raises(ModelError, match=r"float \[batch, classes\]"):
        _compile(path, calibration, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def _save(model, path):
    onnx.save(model, str(path))
    return str(path)


def test_unknown_output_name(tmp_path, calibration, reference_onnx):
    with pytest.raises(ModelError, match="'probs' is not an output of the model; its outputs are: logits"):
        _compile(reference_onnx, calibration, tmp_path / "out", output="probs")


def test_calibration_keys_do_not_match(tmp_path, calibration, reference_onnx):
    with pytest.raises(CalibrationDataError, match=r"missing: \['images'\]"):
        _compile(reference_onnx, {"pixels": calibration["images"]}, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_calibration_wrong_shape(tmp_path, calibration, reference_onnx):
    with pytest.raises(CalibrationDataError, match=r"shape \[4000, 28, 28\], the model expects \['N', 1, 28, 28\]"):
        _compile(reference_onnx, {"images": calibration["images"][:, 0]}, tmp_path / "out")


def test_calibration_wrong_dtype(tmp_path, calibration, reference_onnx):
    as_bytes = (calibration["images"] * 255).astype(np.uint8)
    with pytest.raises(CalibrationDataError, match="dtype uint8, the model expects float32"):
        _compile(reference_onnx, {"images": as_bytes}, tmp_path / "out")


def test_calibration_with_nan(tmp_path, calibration, reference_onnx):
    images = calibration["images"].copy()
    images[[5, 9], 0, 3, 3] = np.nan
    with pytest.raises(CalibrationDataError, match="NaN or Inf values in 2 row"):
        _compile(reference_onnx, {"images": images}, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_labels_out_of_range(tmp_path, calibration, reference_onnx):
    with pytest.raises(CalibrationDataError, match=r"must lie in \[0, 10\)"):
        _compile(reference_onnx, {"images": calibration["images"], "labels": calibration["labels"] + 5},
                 tmp_path / "out")


def test_too_few_rows_says_how_many_are_needed(tmp_path, calibration, reference_onnx):
    few = {k: v[:380] for k, v in calibration.items()}
    with pytest.raises(CalibrationDataError, match=r"380 given, at least 399 needed.*needs 299 test rows"):
        _compile(reference_onnx, few, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_allow_no_exit_emits_the_unchanged_graph_when_rows_are_too_few(tmp_path, calibration, reference_onnx):
    few = {k: v[:380] for k, v in calibration.items()}
    result = _compile(reference_onnx, few, tmp_path / "out", allow_no_exit=True)
    assert result.plan.exits == [] and result.plan.certificate["certified"] is None
    assert "399 needed" in result.plan.certificate["reason"]
    assert result.report["compute_reduction"] == 0.0 and result.report["disagreement"] == 0.0
    outputs = ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(None, {"images": few["images"][:8]})
    assert (outputs[1] == -1).all()


@pytest.mark.slow
def test_budget_no_plan_meets_fails_without_allow_no_exit(compiled):
    """When the full model's class cannot be read off any cut (here: its predictions permuted), no
    plan with exits both passes a test that allows almost no disagreement (0.2% on 2,000 rows) and
    saves compute (those that pass let almost no row out): an error naming --allow-no-exit and
    saying that a retry needs new rows, or with it no exits."""
    from moco_compile.passes.planning.config import Budget, PlannerConfig
    from moco_compile.passes.planning.pipeline import plan_exits

    probes = PlannerConfig(exit_heads=("linear",))  # MLP heads fitted to permuted classes would add only time
    result, _ = compiled
    frame = result.frame.with_column("predictions", np.random.default_rng(0).permutation(result.frame["predictions"]))
    cuts = [e.cut for e in result.plan.exits]
    with pytest.raises(BudgetError, match="--allow-no-exit") as failed:
        plan_exits(frame, cuts, 10, result.plan.total_flops, Budget(0.002), probes)
    # a retry on the same rows with another budget, confidence or seed would void the confidence
    assert str(failed.value).startswith("no exit plan")
    assert "voids the stated confidence" in str(failed.value) and "new calibration rows" in str(failed.value)
    planning = plan_exits(frame, cuts, 10, result.plan.total_flops, Budget(0.002), probes, allow_no_exit=True)
    assert planning.plan.exits == [] and planning.plan.certificate["chosen_plan"] == 0
    assert "new calibration rows" in planning.plan.certificate["note"]


def test_accuracy_budget_without_labels(tmp_path, calibration, reference_onnx):
    with pytest.raises(CalibrationDataError, match="--max-accuracy-drop needs labels"):
        _compile(reference_onnx, {"images": calibration["images"]}, tmp_path / "out", max_accuracy_drop=0.01)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("option, value", [("--max-disagreement", "1.5"), ("--confidence", "0"),
                                           ("--ood-guard", "1")])
def test_cli_rejects_an_impossible_budget(tmp_path, reference_onnx, option, value):
    np.savez(tmp_path / "calib.npz", images=np.zeros((10, 1, 28, 28), np.float32))
    run = CliRunner().invoke(app, ["compile", str(reference_onnx), "--calib", str(tmp_path / "calib.npz"),
                                   "--out", str(tmp_path / "out"), option, value])
    assert run.exit_code == 2 and "must be in (0, 1)" in run.output and "Traceback" not in run.output


@pytest.mark.parametrize("value, message", [
    ("1e-300", r"max_disagreement 1e-300 is too small to certify: at confidence 0.95 .* needs 3.00e\+300 test rows.*"
               r"smallest max_disagreement it certifies is about 3e-12"),
    ("0", r"max_disagreement must be in \(0, 1\), got 0.0"), ("-0.5", "must be in"), ("1", "must be in"),
    ("nan", "must be in .* got nan"), ("inf", "must be in .* got inf")])
def test_cli_rejects_a_budget_no_calibration_set_can_certify(tmp_path, reference_onnx, value, message):
    np.savez(tmp_path / "calib.npz", images=np.zeros((10, 1, 28, 28), np.float32))
    run = CliRunner().invoke(app, ["compile", str(reference_onnx), "--calib", str(tmp_path / "calib.npz"),
                                   "--out", str(tmp_path / "out"), "--max-disagreement", value])
    text = " ".join(run.output.split())
    assert run.exit_code == 2 and text.startswith("error: ") and re.search(message, text), text
    assert isinstance(run.exception, SystemExit) and "Traceback" not in run.output
    _assert_nothing_written(tmp_path / "out")


def test_api_rejects_a_budget_no_calibration_set_can_certify(tmp_path, calibration, reference_onnx):
    """Refused before the model runs (it raised ZeroDivisionError after calibrating)."""
    with pytest.raises(ValueError, match=r"1e-300 is too small to certify.*about 3e-12"):
        _compile(reference_onnx, calibration, tmp_path / "out", max_disagreement=1e-300)
    with pytest.raises(ValueError, match=r"max_accuracy_drop 1e-300 is too small to certify"):
        _compile(reference_onnx, calibration, tmp_path / "out", max_accuracy_drop=1e-300)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("value", ["0", "31"])
def test_cli_rejects_max_exits_an_onnx_file_cannot_hold(tmp_path, reference_onnx, value):
    np.savez(tmp_path / "calib.npz", images=np.zeros((10, 1, 28, 28), np.float32))
    run = CliRunner().invoke(app, ["compile", str(reference_onnx), "--calib", str(tmp_path / "calib.npz"),
                                   "--out", str(tmp_path / "out"), "--max-exits", value])
    assert run.exit_code == 2 and "error:" in run.output and "max_exits must be between 1 and 30" in run.output
    assert "Traceback" not in run.output and not (tmp_path / "out").exists()


def test_cli_rejects_an_unknown_exit_layout(tmp_path, reference_onnx):
    np.savez(tmp_path / "calib.npz", images=np.zeros((10, 1, 28, 28), np.float32))
    run = CliRunner().invoke(app, ["compile", str(reference_onnx), "--calib", str(tmp_path / "calib.npz"),
                                   "--out", str(tmp_path / "out"), "--exit-layout", "sideways"])
    assert run.exit_code == 2 and "error:" in run.output and "exit_layout must be one of" in run.output
    assert "Traceback" not in run.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["mlp", "linear,conv"])
def test_cli_rejects_exit_heads_without_linear_or_unknown(tmp_path, reference_onnx, value):
    np.savez(tmp_path / "calib.npz", images=np.zeros((10, 1, 28, 28), np.float32))
    run = CliRunner().invoke(app, ["compile", str(reference_onnx), "--calib", str(tmp_path / "calib.npz"),
                                   "--out", str(tmp_path / "out"), "--exit-heads", value])
    assert run.exit_code == 2 and "exit_heads (--exit-heads) must list 'linear'" in " ".join(run.output.split())
    assert "Traceback" not in run.output and not (tmp_path / "out").exists()


def test_output_directory_not_writable(tmp_path, calibration, reference_onnx):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match="cannot write"):
        _compile(reference_onnx, calibration, blocker / "out")


def test_cli_reports_errors_without_traceback(tmp_path, reference_onnx):
    np.savez(tmp_path / "calib.npz", pixels=np.zeros((10, 1, 28, 28), np.float32))
    run = CliRunner().invoke(app, ["compile", str(reference_onnx), "--calib", str(tmp_path / "calib.npz"),
                                   "--out", str(tmp_path / "out")])
    assert run.exit_code == 2
    assert "error:" in run.output and "do not match the model inputs" in run.output
    assert "Traceback" not in run.output
    assert not (tmp_path / "out").exists()


class _SequenceFirst:
    """Classifiers whose layers pass the batch on axis 1, as PyTorch builds them by default."""

    @staticmethod
    def gru():
        import torch

        class GRUClassifier(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.gru = torch.nn.GRU(28, 32, num_layers=2, batch_first=True)
                self.head = torch.nn.Linear(32, 10)

            def forward(self, x):
                return self.head(self.gru(x[:, 0])[0][:, -1])

        return GRUClassifier()

    @staticmethod
    def transformer():
        import torch

        class SequenceFirstEncoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed = torch.nn.Linear(28, 32)
                layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0)  # batch_first=False
                self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
                self.head = torch.nn.Linear(32, 10)

            def forward(self, x):
                return self.head(self.encoder(self.embed(x[:, 0].transpose(0, 1))).mean(0))

        return SequenceFirstEncoder()


@pytest.mark.parametrize("build, advice", [("gru", "recurrent layers .GRU.* not supported yet"),
                                           ("transformer", "build it batch first .*batch_first=True")])
def test_layers_that_carry_the_batch_on_another_axis_are_refused_saying_why(build, advice, tmp_path, calibration):
    """No cut leads with the batch: the error says so, names a layer, and says what to do where anything helps."""
    import torch

    module = getattr(_SequenceFirst, build)().eval()
    images = calibration["images"][:400]
    with pytest.raises(ModelError, match=r"no cut point.*carry the batch on another axis than the first .*"
                                         + advice):
        _compile(module, {"x": images}, tmp_path / "out", example_input=torch.from_numpy(images[:2]))
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("values, message", [
    (np.full((8, 4), 0.5, np.float32), r"values lie in \[0, 1\].*\(array \* 255\)\.round\(\)\.astype\('uint8'\)"),
    (np.full((8, 4), 300, np.int64), "values from 300 to 300, outside the range of uint8 \\(0 to 255\\)"),
    (np.full((8, 4), -1, np.int32), "values from -1 to -1, outside the range of uint8"),
])
def test_calibration_values_a_uint8_input_cannot_take(values, message):
    """A model taking uint8 pixels: float images in [0, 1] get the scaling in the hint (astype alone makes them
    0 or 1), and integers beyond uint8's range are refused (astype would wrap them around); integers within it
    are taken."""
    from onnx import TensorProto, helper, numpy_helper

    from moco_compile.calibration_data import CalibrationSpec

    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "w"], ["logits"])], "uint8_pixels",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    spec = CalibrationSpec(helper.make_model(graph), 3)
    with pytest.raises(CalibrationDataError, match=message):
        spec.check({"pixels": values}, "calibration data")
    taken = spec.check({"pixels": np.full((8, 4), 255, np.int64)}, "calibration data")["pixels"]
    assert taken.dtype == np.uint8 and (taken == 255).all()
