"""Hugging Face image classifiers (``*ForImageClassification``): tiny configs with random weights, saved as a
user saves them, compiled on real Fashion-MNIST images; and the trained ViT reference through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from moco_compile import compile  # noqa: E402
from moco_compile.cli import app  # noqa: E402
from moco_compile.constants import EXIT_OUTPUT  # noqa: E402
from moco_compile.errors import CalibrationDataError, ModelError  # noqa: E402
from moco_compile.hf_images import PIXELS  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from tests.plan_settings import UNPRICED_ONE_FAMILY  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier (`pytest -m "not slow"`) leaves this file out

ARTIFACTS = Path(__file__).resolve().parents[1] / "models" / "artifacts"
GREY = dict(num_labels=10, num_channels=1)
_PATCHES = dict(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, **GREY)
COMPILED = {  # architecture -> (config, the module path every cut lies under)
    "ViTForImageClassification": (transformers.ViTConfig(**_PATCHES), "vit."),
    "SwinForImageClassification": (transformers.SwinConfig(  # shifted 7x7 windows, patch merging
        image_size=28, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=7, **GREY), "swin."),
    "ConvNextForImageClassification": (transformers.ConvNextConfig(
        image_size=28, patch_size=2, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], **GREY), "convnext."),
    "ResNetForImageClassification": (transformers.ResNetConfig(  # no image_size: the processor's size is read
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", **GREY), "resnet."),
}
IMPORTED = {  # exported and checked against the module, not compiled here
    "DeiTForImageClassification": transformers.DeiTConfig(**_PATCHES),
    "BeitForImageClassification": transformers.BeitConfig(**_PATCHES),
    "RegNetForImageClassification": transformers.RegNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, **GREY),
    "MobileNetV2ForImageClassification": transformers.MobileNetV2Config(image_size=28, depth_multiplier=0.35, **GREY),
}
ROWS = 1500


@pytest.fixture(scope="module")
def fashion() -> dict[str, np.ndarray]:
    data = np.load(ARTIFACTS / "fashion_calib.npz")
    return {PIXELS: data["images"], "labels": data["labels"]}


def _saved(architecture: str, config, directory: Path) -> Path:
    """The model saved as a user saves it, with a grey 28x28 image processor beside it."""
    torch.manual_seed(0)
    getattr(transformers, architecture)(config).eval().save_pretrained(directory)
    transformers.ViTImageProcessor(size={"height": 28, "width": 28}, do_normalize=False).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("architecture", list(COMPILED))
def test_a_saved_image_classifier_compiles_and_its_graph_keeps_the_modules_logits(architecture, fashion, tmp_path):
    """Cuts are named by the model's own module paths; the verified graph gives the module's logits on the rows
    that run to the end and leaves the others early."""
    config, prefix = COMPILED[architecture]
    directory = _saved(architecture, config, tmp_path / "model")
    result = compile(directory, {name: values[:ROWS] for name, values in fashion.items()}, max_disagreement=0.05,
                     measure_latency=False, show_progress=False, planner_config=UNPRICED_ONE_FAMILY)
    assert result.plan.exits and all(e.cut.module.startswith(prefix) for e in result.plan.exits)
    assert result.report["verification"]["rerouted_rows"] == 0
    rows = fashion[PIXELS][ROWS:ROWS + 256]
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, exits = session.run(["logits", EXIT_OUTPUT], {PIXELS: rows})
    with torch.no_grad():
        expected = transformers.AutoModelForImageClassification.from_pretrained(directory)(
            pixel_values=torch.from_numpy(rows)).logits.numpy()
    full = exits < 0
    assert full.sum() < len(rows)
    np.testing.assert_allclose(logits[full], expected[full], atol=1e-4)
    assert (logits[~full].argmax(1) == expected[~full].argmax(1)).mean() > 0.9


@pytest.mark.parametrize("architecture", list(IMPORTED))
def test_other_image_classifiers_export_with_their_module_paths(architecture, tmp_path):
    directory = _saved(architecture, IMPORTED[architecture], tmp_path / "model")
    imported = import_model(directory)
    assert imported.input_names == [PIXELS] and imported.num_classes == 10
    prefix = transformers.AutoModelForImageClassification.from_pretrained(directory).base_model_prefix
    assert any(scope and scope[0].startswith(prefix) for scope in imported.scopes.values())


def test_the_image_size_comes_from_the_example_then_the_config_then_the_processor(tmp_path):
    config, _ = COMPILED["ResNetForImageClassification"]  # a config without image_size
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no image_size .*processor.save_pretrained"):
        import_model(tmp_path)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 36}, crop_pct=None).save_pretrained(tmp_path)
    assert _input_shape(import_model(tmp_path)) == [1, 36, 36]
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    processor.update(do_center_crop=True, crop_size={"height": 24, "width": 32})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    assert _input_shape(import_model(tmp_path)) == [1, 24, 32]
    assert _input_shape(import_model(tmp_path, example_input=torch.zeros(3, 1, 20, 20))) == [1, 20, 20]
    assert _input_shape(import_model(model, example_input=np.zeros((1, 1, 40, 44), np.float32))) == [1, 40, 44]
    with pytest.raises(ModelError, match=r"example_input has shape \[3, 20, 20\]: ResNetForImageClassification "
                                         r"takes images \[batch, 1, height, width\]"):
        import_model(model, example_input=torch.zeros(3, 20, 20))


def _input_shape(imported) -> list:
    return [d.dim_value for d in imported.model.graph.input[0].type.tensor_type.shape.dim][1:]


def test_images_of_another_size_than_the_export_get_a_clear_error(fashion, tmp_path):
    directory = _saved("ViTForImageClassification", COMPILED["ViTForImageClassification"][0], tmp_path / "model")
    padded = np.pad(fashion[PIXELS][:300], ((0, 0), (0, 0), (2, 2), (2, 2)))
    with pytest.raises(CalibrationDataError, match=rf"input '{PIXELS}' has shape \[300, 1, 32, 32\]"):
        compile(directory, {PIXELS: padded}, measure_latency=False, show_progress=False)


def test_a_model_neither_exporter_can_export_gets_what_to_do():
    """A ViT built for 28x28 images, given a 32x32 example: both exporters fail, and the error names each
    failure and how to export the model by hand."""
    model = transformers.ViTForImageClassification(COMPILED["ViTForImageClassification"][0]).eval()
    with pytest.raises(ModelError, match=r"exporting ViTForImageClassification to ONNX failed \(the TorchScript-based "
                                         r"exporter: .*28.*; the torch.export-based exporter: .*\); export it yourself "
                                         r"\(input 'pixel_values' \[batch, 1, 32, 32\]"):
        import_model(model, example_input=torch.zeros(1, 1, 32, 32))


def test_a_directory_holding_a_backbone_without_a_classifier_is_refused(tmp_path):
    transformers.ViTModel(transformers.ViTConfig(**_PATCHES)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"holds a ViTModel, not a classifier .*\*ForImageClassification"):
        import_model(tmp_path)


def test_the_trained_vit_reference_compiles_from_its_directory_with_the_cli(fashion, tmp_path):
    """The reference as a user has it, a directory and an .npz: certified exits at the default budget that read
    the patches' mean and the class token."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{name: values[:ROWS] for name, values in fashion.items()})
    run = CliRunner().invoke(app, ["compile", str(ARTIFACTS / "fashion_vit"), "--calib", str(calib), "--out",
                                   str(tmp_path / "out"), "--no-latency", "--exit-heads", "linear"])
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["exits"] and report["compute_reduction"] > 0.3
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert all(set(exit_["pooling"].split("+")) <= {"token_mean", "first_token"} for exit_ in plan["exits"])
    assert "rate" in report["bound"]["certified"] and report["verification"]["rerouted_rows"] == 0


@pytest.mark.parametrize("kind", ["image", "text"])
@pytest.mark.parametrize("head, message", [
    (dict(num_labels=1), "num_labels=1: moco compiles classifiers with >= 2 classes, not regression heads"),
    (dict(num_labels=4, problem_type="multi_label_classification"), "is a multi-label classifier"),
])
def test_heads_that_do_not_choose_one_class_are_refused_before_export(kind, head, message, tmp_path):
    """A regression head and a multi-label head (a sigmoid per label) are refused, by compile and by the eager
    text API: moco certifies the argmax class, which neither predicts; compile writes no file."""
    if kind == "image":
        config = transformers.ViTConfig(**{**_PATCHES, **head})
        transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "model")
    else:
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, **head)
        transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "model")
        from moco_compile.torch import EarlyExitTextClassificationModel

        with pytest.raises(ModelError, match=message):  # the eager API as well
            EarlyExitTextClassificationModel(transformers.BertForSequenceClassification(config))
    calibration = {PIXELS: np.zeros((8, 1, 28, 28), np.float32)} if kind == "image" else \
        {"input_ids": np.ones((8, 6), np.int64), "attention_mask": np.ones((8, 6), np.int64)}
    with pytest.raises(ModelError, match=message):
        compile(tmp_path / "model", calibration, out_dir=tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
