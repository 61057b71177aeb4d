"""Import from PyTorch (both exporters) and from ONNX files: classifier check and module names."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from models.fashion_resnet import FashionResNet  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.graph.cut_points import find_cut_points  # noqa: E402
from moco_compile.passes.graph.flops import flops_per_row, measure_shapes  # noqa: E402
from tests.plan_settings import CHEAPEST_PLAN  # noqa: E402

WEIGHTS = "models/artifacts/fashion_resnet.pt"


@pytest.fixture(scope="module")
def trained_module():
    from pathlib import Path

    model = FashionResNet()
    model.load_state_dict(torch.load(Path(__file__).resolve().parents[1] / WEIGHTS, weights_only=True))
    return model.eval()


def _modules(imported):
    feed = {imported.input_names[0]: np.zeros((1, 1, 28, 28), np.float32)}
    shapes = measure_shapes(imported.model, feed)
    return [c.module for c in find_cut_points(imported.model, flops_per_row(imported.model, shapes), shapes,
                                              imported.scopes)]


def test_legacy_exporter_file_gets_the_same_module_names(trained_module, tmp_path):
    path = tmp_path / "legacy.onnx"
    torch.onnx.export(trained_module, (torch.rand(2, 1, 28, 28),), str(path), dynamo=False,
                      input_names=["images"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    assert any(n.name.startswith("/layer1/") for n in onnx.load(str(path)).graph.node)
    assert _modules(import_model(path)) == ["layer1.0", "layer1", "layer2.0", "layer2", "layer3.0"]


def test_module_export_names_inputs_after_forward_and_keeps_batch_dynamic(trained_module):
    imported = import_model(trained_module, example_input=torch.rand(2, 1, 28, 28))
    assert imported.input_names == ["x"]
    assert imported.output is not None and imported.num_classes == 10
    batch_dim = imported.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch_dim.HasField("dim_value")
    assert _modules(imported) == ["layer1.0", "layer1", "layer2.0", "layer2", "layer3.0"]


@pytest.mark.slow
def test_compile_an_nn_module_from_a_loader_of_dicts(trained_module, calibration):
    images = torch.from_numpy(calibration["images"][:1200])
    labels = torch.from_numpy(calibration["labels"][:1200])
    dataset = torch.utils.data.TensorDataset(images, labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=100,
                                         collate_fn=lambda rows: {"x": torch.stack([r[0] for r in rows]),
                                                                  "labels": torch.stack([r[1] for r in rows])})
    result = compile(trained_module, loader, example_input=images[:2], max_disagreement=0.02,
                     measure_latency=False, show_progress=False, planner_config=CHEAPEST_PLAN)
    assert sum(result.report["splits"].values()) == 1200
    assert result.plan.exits and result.report["compute_reduction"] > 0.2


def test_module_without_example_input_is_a_clear_error(trained_module, calibration):
    """Calibration arrays named otherwise than ``forward``'s parameters cannot stand in for an example."""
    from moco_compile.errors import ModelError

    with pytest.raises(ModelError, match=r"needs an example input.*parameters of its forward \(\['x'\]\)"):
        compile(trained_module, {"images": calibration["images"][:10]}, show_progress=False)


def test_module_exports_on_calibration_rows_named_after_its_forward(trained_module, calibration):
    """Without ``example_input``, rows named after ``forward``'s parameters are the example (labels aside); a
    module returning a dict gets outputs named by its keys."""

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = trained_module

        def forward(self, x):
            logits = self.net(x)
            return {"logits": logits, "probabilities": logits.softmax(dim=1)}

    rows = {"x": calibration["images"][:10], "labels": calibration["labels"][:10]}
    assert import_model(trained_module, rows=rows).input_names == ["x"]
    imported = import_model(Named(), output="logits", rows=rows)
    assert [o.name for o in imported.model.graph.output] == ["logits", "probabilities"]
    assert imported.output == "logits" and imported.num_classes == 10


@pytest.fixture(scope="module")
def quantized(reference_model, calibration, tmp_path_factory):
    """The reference CNN quantized by onnxruntime: dynamic int8 (ConvInteger) and static int8 in the
    QOperator format (QLinearConv)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": calibration["images"][i:i + 32]} for i in range(0, 128, 32)])

        def get_next(self):
            return next(self.batches, None)

    directory = tmp_path_factory.mktemp("quantized")
    onnx.save(reference_model, str(directory / "float.onnx"))
    quantize_dynamic(str(directory / "float.onnx"), str(directory / "dynamic.onnx"))
    quantize_static(str(directory / "float.onnx"), str(directory / "static.onnx"), Rows(),
                    quant_format=QuantFormat.QOperator)
    return directory


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_int8_convolutions_count_their_multiply_adds(quantized, kind):
    """ConvInteger and QLinearConv cost the multiply-adds of the Conv they replace: the int8 network's FLOPs are
    the float network's (they were 0, so a dynamic-int8 model looked too small for any exit to pay)."""
    feed = {"images": np.zeros((1, 1, 28, 28), np.float32)}
    totals = {}
    for name in ("float", kind):
        model = import_model(quantized / f"{name}.onnx").model
        totals[name] = sum(flops_per_row(model, measure_shapes(model, feed)))
    assert totals[kind] == pytest.approx(totals["float"], rel=0.02)


def test_a_model_quantized_per_batch_is_refused_saying_what_to_do(quantized, calibration, tmp_path):
    """Dynamic int8 sets activation ranges per batch, so a row's output depends on its batch: compile refuses it
    before calibrating and points to the float model and the memory passes."""
    from moco_compile.errors import ModelError

    with pytest.raises(ModelError, match=r"quantizes its activations per batch.*moco optimize-memory BUILD --int8"):
        compile(quantized / "dynamic.onnx", {"images": calibration["images"][:500]}, out_dir=tmp_path / "out",
                show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_model_with_int8_activations_has_no_cut_and_is_told_why(quantized, calibration, tmp_path):
    """In onnxruntime's QOperator format the activations between QLinear* operators are int8 (untyped by shape
    inference where contrib ops make them): no cut reads them, and the error says what to compile instead."""
    from moco_compile.errors import ModelError

    with pytest.raises(ModelError, match=r"no cut point.*int8 between its QLinear\* operators.*QDQ format"):
        compile(quantized / "static.onnx", {"images": calibration["images"][:500]}, out_dir=tmp_path / "out",
                show_progress=False)
    assert not (tmp_path / "out").exists()
