"""Outputs a model computes from its classifier's logits (its predicted class, its top-k probabilities) are
computed for rows that leave early too, from the exit's logits, in every layout; other outputs get zeros, with
a warning at compile.

The model is the trained reference network with a Softmax output, its ArgMax class, its top-2 probabilities
and a per-position head read from the convolutional features (not the logits).  Calibration: the first 2,000
shipped Fashion-MNIST calibration images.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moco_compile.passes.graph.exit_graph import derived_outputs
from moco_compile.passes.graph.index import GraphIndex

ARTIFACTS = Path(__file__).resolve().parents[1] / "models" / "artifacts"
ROWS = 2000
OUTPUTS = ["probabilities", "label", "top2", "positions"]


def _graph(nodes: list, outputs: list[str], initializers: list = ()) -> GraphIndex:
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])], values,
                              list(initializers))
    return GraphIndex(helper.make_model(graph))


def test_outputs_read_from_the_logits_alone_are_derived_and_others_are_not():
    """Through a final Softmax (and a Cast), the logits are the Softmax's input; an output reading them and
    initializers only is derived, with its nodes in graph order; one that also reads the input is not."""
    index = _graph([
        helper.make_node("MatMul", ["x", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["soft"], axis=1),
        helper.make_node("Cast", ["soft"], ["probabilities"], to=TensorProto.FLOAT),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        helper.make_node("TopK", ["probabilities", "k"], ["top", "top_index"], axis=1),
        helper.make_node("Add", ["logits", "x"], ["mixed"]),
    ], ["probabilities", "label", "top", "mixed", "logits"],
        [numpy_helper.from_array(np.ones((4, 4), np.float32), "w"), numpy_helper.from_array(np.array([2]), "k")])
    assert index.classifier_logits("probabilities") == "logits"
    assert index.classifier_logits("logits") == "logits"
    derived = derived_outputs(index, "probabilities")
    assert derived == {"label": [3], "top": [1, 2, 4], "logits": []}
    assert index.derived_nodes("mixed", "logits") is None


# -- the reference network with a class, top-2 and a per-position head -----------------------------------------

@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    from models.fashion_resnet import FashionResNet

    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = FashionResNet()
            self.net.load_state_dict(torch.load(ARTIFACTS / "fashion_resnet.pt"))
            torch.manual_seed(0)
            self.positions = torch.nn.Conv2d(64, 4, 1)

        def forward(self, images):
            net = self.net
            features = net.layer3(net.layer2(net.layer1(net.stem((images - 0.2860) / 0.3530))))
            logits = net.fc(torch.flatten(net.pool(features), 1))
            probabilities = torch.softmax(logits, dim=1)
            return probabilities, logits.argmax(dim=1), probabilities.topk(2, dim=1).values, \
                self.positions(features)

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(Heads().eval(), (torch.rand(2, 1, 28, 28),), buffer, dynamo=False, opset_version=17,
                          input_names=["images"], output_names=OUTPUTS,
                          dynamic_axes={name: {0: "batch"} for name in ["images", *OUTPUTS]})
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def compiled(model, calibration):
    """The model compiled on its probabilities (the default, nested layout), and what compile warned."""
    from moco_compile import compile
    from tests.plan_settings import CHEAPEST_PLAN

    warnings = _Records()
    logger = logging.getLogger("moco")
    logger.addHandler(warnings)
    try:
        result = compile(model, {"images": calibration["images"][:ROWS], "labels": calibration["labels"][:ROWS]},
                         output="probabilities", max_disagreement=0.05, measure_latency=False, show_progress=False,
                         planner_config=CHEAPEST_PLAN)
    finally:
        logger.removeHandler(warnings)
    return result, warnings.text


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"


@pytest.mark.slow
def test_compile_warns_of_the_outputs_exited_rows_fill_with_zeros(compiled):
    _, warnings = compiled
    assert "positions" in warnings and "label" not in warnings and "top2" not in warnings


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nested", "flat", "whole-batch", "bucketed"])
def test_exited_rows_get_their_class_and_top_k_from_the_exit(model, compiled, calibration, layout):
    from moco_compile.passes.graph.rewrite import apply_plan
    from moco_compile.prepare import model_for_plan

    result, _ = compiled
    images = calibration["images"][ROWS:ROWS + 512]
    prepared, output = model_for_plan(model, "probabilities", {"images": images[:1]})
    graph = apply_plan(prepared, result.plan, output, layout)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    probabilities, label, top2, positions, exits = session.run(None, {"images": images})
    full = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None,
                                                                                                  {"images": images})
    exited = exits >= 0
    assert exited.mean() > 0.5 and (~exited).any()
    np.testing.assert_array_equal(label, probabilities.argmax(axis=1))
    np.testing.assert_allclose(top2, -np.sort(-probabilities, axis=1)[:, :2], rtol=1e-6)
    for compiled_values, original in zip((probabilities, label, top2, positions), full):
        np.testing.assert_allclose(compiled_values[~exited], original[~exited], atol=1e-5)
    assert (positions[exited] == 0).all()
    assert label.dtype == np.int64 and (label == full[1]).mean() > 0.97


@pytest.mark.slow
def test_the_memory_passes_put_exits_back_on_the_output_the_build_records(model, compiled, calibration, tmp_path):
    """A build of a model with several outputs records its classifier output, so putting its exits back on the
    original (``moco optimize-memory BUILD_DIR``) and cutting its stages (``export-triton --staged``) need no
    ``--output``."""
    from moco_compile.build import Build
    from moco_compile.memory.optimize import optimize_build
    from moco_compile.stage_models import build_stage_graphs

    result, _ = compiled
    original = tmp_path / "model.onnx"
    onnx.save(model, str(original))
    result.save(tmp_path / "build")
    rows = {"images": calibration["images"][:600], "labels": calibration["labels"][:600]}
    optimized = optimize_build(tmp_path / "build", rows, original=original, measure_latency=False)
    assert [step["step"] for step in optimized.steps] == ["original", "+ exits"]
    probabilities, label, *_ = ort.InferenceSession(optimized.model.SerializeToString()).run(
        None, {"images": calibration["images"][ROWS:ROWS + 256]})
    np.testing.assert_array_equal(label, probabilities.argmax(axis=1))
    assert len(build_stage_graphs(Build.load(tmp_path / "build"), original)) == len(result.plan.exits) + 1


@pytest.mark.slow
def test_optimize_memory_takes_the_classifier_output_of_a_model_file(model, calibration, tmp_path):
    """``moco optimize-memory MODEL.onnx`` of a model with several outputs asks for ``--output`` and takes it."""
    from typer.testing import CliRunner

    from moco_compile.cli import app

    onnx.save(model, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", images=calibration["images"][:600], labels=calibration["labels"][:600])
    arguments = ["optimize-memory", str(tmp_path / "model.onnx"), "--calib", str(tmp_path / "calib.npz")]
    refused = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "refused")])
    assert refused.exit_code != 0 and "--output" in refused.output and not (tmp_path / "refused").exists()
    taken = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "out"), "--output", "probabilities"])
    assert taken.exit_code == 0, taken.output
    assert (tmp_path / "out" / "memory.json").is_file()
