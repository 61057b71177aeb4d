"""Rewrite correctness beyond the reference CNN, each case a real compiled graph run in onnxruntime.

The models wrap the trained reference network (``models/fashion_resnet.py``): extra outputs
with dynamic non-batch dims (a per-position head on images of any size), a LogSoftmax head at
opset 17 (legacy exporter), a single Softmax output compiled without labels, and float16.
Calibration: the first 2,000 shipped Fashion-MNIST calibration images.
"""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from moco_compile import compile  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.calibration.calibrate import variant_features  # noqa: E402
from moco_compile.passes.calibration.pooling import variant_nodes, variant_width, variants_for  # noqa: E402
from moco_compile.passes.graph.rewrite import insert_exits  # noqa: E402
from moco_compile.passes.graph.trailing_dims import UndeterminedDimError  # noqa: E402
from models.fashion_resnet import FashionResNet  # noqa: E402
from tests.plan_settings import CHEAPEST_PLAN, ONE_FAMILY  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier (`pytest -m "not slow"`) leaves this file out

ARTIFACTS = Path(__file__).resolve().parents[1] / "models" / "artifacts"
ROWS = 2000
# these cases are about the graph's outputs, not the plan: the extra-output cases take the cheapest plan, the float16
# cases one plan family with the default heads, MLP heads among them
BUDGET = 0.05  # max_disagreement: 2,000 rows certify exits at every exit of these models


# -- models: the trained reference network with other heads ------------------------------------

def _trained_net() -> FashionResNet:
    net = FashionResNet()
    net.load_state_dict(torch.load(ARTIFACTS / "fashion_resnet.pt"))
    return net.eval()


class _Trunk(nn.Module):
    """The reference network split into its convolutional features and its classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _trained_net()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net
        return net.layer3(net.layer2(net.layer1(net.stem((images - 0.2860) / 0.3530))))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.fc(torch.flatten(self.net.pool(features), 1))


class PositionsHead(_Trunk):
    """Logits and a per-position head ``[N, 4, h, w]`` (``h, w`` follow the image size)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(64, 4, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        return self.logits(features), self.head(features)


class BoxesLogProbabilities(PositionsHead):
    """Log-probabilities (LogSoftmax) and one box per position, ``[N, h * w, 4]``."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        boxes = self.head(features).flatten(2).transpose(1, 2)
        return torch.log_softmax(self.logits(features), dim=1), boxes


class Probabilities(_Trunk):
    """One output: class probabilities (Softmax)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(self.features(images)), dim=1)


class Logits(_Trunk):
    """One output: the reference network's logits."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(images))


def _export(module: nn.Module, outputs: list[str], *, any_size: bool = False, half: bool = False) -> onnx.ModelProto:
    """torch.export-based exporter, batch dynamic (and height/width with ``any_size``)."""
    example = torch.rand(2, 1, 28, 28)
    if half:
        module, example = module.half(), example.half()
    axes = {0: torch.export.Dim("batch")}
    if any_size:
        axes.update({2: torch.export.Dim("height", min=8, max=256), 3: torch.export.Dim("width", min=8, max=256)})
    with torch.no_grad():
        program = torch.onnx.export(module.eval(), (example,), dynamo=True, dynamic_shapes=(axes,),
                                    input_names=["images"], output_names=outputs, verbose=False)
    buffer = io.BytesIO()
    program.save(buffer)
    return onnx.load_from_string(buffer.getvalue())


def _export_legacy(module: nn.Module, outputs: list[str], opset: int) -> onnx.ModelProto:
    """The legacy (TorchScript) exporter at ``opset``, batch, height and width dynamic."""
    buffer = io.BytesIO()
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, outputs[0]: {0: "batch"},
            outputs[1]: {0: "batch", 1: "positions"}}
    with torch.no_grad():
        torch.onnx.export(module.eval(), (torch.rand(2, 1, 28, 28),), buffer, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=outputs, dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


# -- helpers ---------------------------------------------------------------------------------------

def _compile(model: onnx.ModelProto, calibration: dict, *, labels: bool = True, **options):
    data = {"images": calibration["images"][:ROWS]}
    if labels:
        data["labels"] = calibration["labels"][:ROWS]
    options.setdefault("planner_config", ONE_FAMILY)
    return compile(model, data, max_disagreement=BUDGET, measure_latency=False, show_progress=False, **options)


def _run(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": images})


def _planned_routes(plan_exits, frame, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Exit index and class of the first ``rows`` calibration rows (features from ``frame``) under
    ``plan_exits``: the first exit whose largest margin is positive, with that margin's class
    (-1: full network)."""
    exit_index, exit_class = np.full(rows, -1), np.full(rows, -1)
    for position, exit_ in enumerate(plan_exits):
        margins = exit_.margins(variant_features(frame, exit_.column, exit_.pooling)[:rows])
        fired = (exit_index < 0) & (margins.max(axis=1) > 0)
        exit_index[fired], exit_class[fired] = position, margins.argmax(axis=1)[fired]
    return exit_index, exit_class


def _assert_exited_rows_take_the_exit_class(plan_exits, frame, scores: np.ndarray, exits: np.ndarray) -> None:
    """Rows the graph routes as the plan does carry the exit's class as their argmax."""
    planned_exit, planned_class = _planned_routes(plan_exits, frame, len(exits))
    same = exits == planned_exit
    assert same.mean() > 0.99
    exited = same & (exits >= 0)
    assert exited.sum() > 100
    np.testing.assert_array_equal(scores[exited].argmax(axis=1), planned_class[exited])


def _batches_by_route(exits: np.ndarray, images: np.ndarray) -> dict[str, np.ndarray]:
    """Batches where every row exits at one exit (or none does), mixed batches, 1 row and 0 rows."""
    batches = {f"all at exit {k}": images[exits == k][:40] for k in range(exits.max() + 1)}
    batches["none exits"] = images[exits == -1][:40]
    batches["mixed"] = images[:64]
    batches["one row"] = images[:1]
    batches["no rows"] = images[:0]
    return batches


def _if_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """Every graph nested in If nodes under ``graph``, then- and else-branches."""
    found = []
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                found += [attribute.g] + _if_graphs(attribute.g)
    return found


def _resized_canvas(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """The images centred on a black canvas of another size, cropped where it is smaller
    (Fashion-MNIST backgrounds are 0)."""
    canvas = np.zeros((*images.shape[:2], height, width), images.dtype)
    rows, columns = min(height, images.shape[2]), min(width, images.shape[3])
    top, left = (images.shape[2] - rows) // 2, (images.shape[3] - columns) // 2
    canvas_top, canvas_left = (height - rows) // 2, (width - columns) // 2
    canvas[:, :, canvas_top:canvas_top + rows, canvas_left:canvas_left + columns] = \
        images[:, :, top:top + rows, left:left + columns]
    return canvas


# -- 1. extra outputs with dynamic non-batch dims --------------------------------------------------

@pytest.fixture(scope="module")
def positions(calibration):
    """Logits + per-position head, height and width dynamic (torch.export-based exporter)."""
    model = _export(PositionsHead(), ["logits", "positions"], any_size=True)
    return model, _compile(model, calibration, output="logits", planner_config=CHEAPEST_PLAN)


def test_dynamic_output_keeps_its_declared_dims(positions):
    model, result = positions
    declared = {o.name: o for o in model.graph.output}
    compiled = {o.name: o for o in result.model.graph.output}
    assert compiled["positions"].type == declared["positions"].type
    dims = [d.dim_param or d.dim_value for d in declared["positions"].type.tensor_type.shape.dim]
    assert dims[1] == 4 and isinstance(dims[2], str) and isinstance(dims[3], str)
    onnx.checker.check_model(result.model, full_check=True)


@pytest.mark.parametrize("height, width", [(28, 28), (32, 40), (25, 21)])
def test_exited_rows_get_zeros_of_the_size_the_image_gives(positions, calibration, height, width):
    """At the calibration size and others: continuing rows equal the original, exited rows are
    zeros of the same ``[4, h, w]``; the exits pool by run-time size (no window fixed at 28x28)."""
    model, result = positions
    images = _resized_canvas(calibration["images"][:300], height, width)
    logits, maps, exits = _run(result.model, images)
    expected_logits, expected_maps = _run(model, images)
    assert maps.shape == expected_maps.shape == (300, 4, (height + 3) // 4, (width + 3) // 4)
    full = exits == -1
    assert full.any() and (~full).any()
    np.testing.assert_allclose(maps[full], expected_maps[full], atol=1e-4)
    np.testing.assert_allclose(logits[full], expected_logits[full], atol=1e-4)
    assert not maps[~full].any()


def test_every_mix_of_exited_and_continuing_rows(positions, calibration):
    """All rows exit at exit k (the else branch of exit k's If), none exit, mixed, 1 row, 0 rows."""
    model, result = positions
    images = calibration["images"][:600]
    *_, exits = _run(result.model, images)
    assert len(set(exits.tolist())) == len(result.plan.exits) + 1  # every exit and the full network
    for name, batch in _batches_by_route(exits, images).items():
        logits, maps, batch_exits = _run(result.model, batch)
        expected_logits, expected_maps = _run(model, batch)
        assert maps.shape == expected_maps.shape, name
        assert logits.shape == expected_logits.shape and batch_exits.shape == (len(batch),), name
        full = batch_exits == -1
        np.testing.assert_allclose(maps[full], expected_maps[full], atol=1e-4, err_msg=name)
        assert not maps[~full].any(), name
        if name.startswith("all at exit"):
            assert (batch_exits == int(name.rsplit(" ", 1)[1])).all()


@pytest.fixture(scope="module")
def boxes_opset17(calibration):
    """Log-probabilities + ``[N, h * w, 4]`` boxes from the legacy exporter at opset 17."""
    model = _export_legacy(BoxesLogProbabilities(), ["log_probs", "boxes"], opset=17)
    return model, _compile(model, calibration, output="log_probs", planner_config=CHEAPEST_PLAN)


def test_flattened_positions_output_from_the_legacy_exporter(boxes_opset17, calibration):
    """The legacy exporter names the boxes dims (``positions``, ``Transposeboxes_dim_2``) without
    values; exited rows still get ``[h * w, 4]`` zeros, at every mix of routes and sizes."""
    model, result = boxes_opset17
    declared = model.graph.output[1].type.tensor_type.shape.dim
    assert not any(d.HasField("dim_value") for d in declared)
    images = calibration["images"][:600]
    *_, exits = _run(result.model, images)
    batches = _batches_by_route(exits, images)
    batches["larger images"] = _resized_canvas(images[:64], 36, 33)
    for name, batch in batches.items():
        log_probs, boxes, batch_exits = _run(result.model, batch)
        if not len(batch):  # the original's flatten (Reshape to [N, 4, -1]) cannot take 0 rows
            assert boxes.shape == (0, 49, 4) and log_probs.shape == (0, 10)
            continue
        expected_log_probs, expected_boxes = _run(model, batch)
        assert boxes.shape == expected_boxes.shape, name
        assert log_probs.shape == expected_log_probs.shape, name
        full = batch_exits == -1
        np.testing.assert_allclose(boxes[full], expected_boxes[full], atol=1e-4, err_msg=name)
        assert not boxes[~full].any(), name


def test_output_dims_that_depend_on_data_fail_at_compile_time(positions, calibration):
    """An extra output ``[N, k]`` whose ``k`` is read from pixel values cannot be sized for exited
    rows: insert_exits refuses with a moco error naming the output, before anything runs."""
    model, result = positions
    imported = import_model(model, output="logits")
    graph = imported.model.graph
    helper = onnx.helper
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.int64), name) for v, name in
                              (([0], "moco_test/zero"), ([1], "moco_test/axis"), ([10], "moco_test/ten"))])
    graph.node.extend([
        helper.make_node("ReduceMax", ["images"], ["moco_test/brightest"], keepdims=0),
        helper.make_node("Cast", ["moco_test/brightest"], ["moco_test/count"], to=onnx.TensorProto.INT64),
        helper.make_node("Reshape", ["moco_test/count", "moco_test/axis"], ["moco_test/end"]),
        helper.make_node("Add", ["moco_test/end", "moco_test/ten"], ["moco_test/end10"]),
        helper.make_node("Slice", ["logits", "moco_test/zero", "moco_test/end10", "moco_test/axis"],
                         ["first_logits"]),
    ])
    graph.output.append(helper.make_tensor_value_info("first_logits", onnx.TensorProto.FLOAT, ["batch", "k"]))
    with pytest.raises(UndeterminedDimError, match="output 'first_logits'"):
        insert_exits(imported.model, result.plan.exits, "logits")


# -- 2. float16 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probabilities(calibration, tmp_path_factory):
    """The single Softmax output, compiled from images without labels and written to disk."""
    model = _export(Probabilities(), ["probabilities"])
    out = tmp_path_factory.mktemp("probabilities") / "out"
    return model, _compile(model, calibration, labels=False, out_dir=out), out


def test_float16_model_runs_with_float16_outputs(probabilities, calibration):
    """The float16 twin of the network with the exits fitted on its float32 twin (class 0 switched
    off, as per-class plans do): outputs stay float16, full-network rows match the original to
    float16 rounding, exited rows carry the exit's class as finite float16 logits (the switched-off
    class's -FLT_MAX margin becomes float16's lowest value, not -inf)."""
    _, result, _ = probabilities
    model = import_model(_export(Logits(), ["logits"], half=True)).model
    tensors = {name for node in model.graph.node for name in node.output}
    assert {e.cut.tensor for e in result.plan.exits} <= tensors  # same exporter, same network
    plan_exits = [replace(e, thresholds=np.where(np.arange(10) == 0, np.inf, e.thresholds),
                          confidence_scale=None)  # exited rows carry the margins (the -FLT_MAX case)
                  for e in result.plan.exits]
    compiled = insert_exits(model, plan_exits, "logits")
    onnx.checker.check_model(compiled, full_check=True)
    assert compiled.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert compiled.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    images = calibration["images"][:ROWS].astype(np.float16)
    logits, exits = _run(compiled, images)
    expected, = _run(model, images)
    assert logits.dtype == np.float16 and exits.dtype == np.int64
    full = exits == -1
    # onnxruntime keeps float32 between float16 ops of one graph; the If boundary rounds to float16
    np.testing.assert_allclose(logits[full], expected[full], rtol=2 ** -7, atol=2 ** -7)
    assert np.isfinite(logits).all()
    assert (logits[exits >= 0, 0] == np.finfo(np.float16).min).all()
    _assert_exited_rows_take_the_exit_class(plan_exits, result.frame, logits, exits)
    for batch in (images[:1], images[:0]):
        batch_logits, batch_exits = _run(compiled, batch)
        assert batch_logits.shape == (len(batch), 10) and batch_exits.shape == (len(batch),)


def test_float16_model_compiles_and_verifies(calibration):
    model = _export(Logits(), ["logits"], half=True)
    result = _compile(model, calibration)
    logits, exits = _run(result.model, calibration["images"][:256].astype(np.float16))
    assert logits.dtype == np.float16 and (exits >= 0).any()
    assert result.report["verification"]["rerouted_rows"] <= result.report["verification"]["near_threshold_rows"]
    # float16 cut tensors are pooled in float16 in the graph: the certificate counts rows within
    # 16 float16 units of a threshold, not float32's 1e-4
    assert result.plan.certificate["rounding_tolerance"] == pytest.approx(16 * 2.0 ** -10)


# -- 3. LogSoftmax and Softmax heads -----------------------------------------------------------

def test_log_softmax_head_gives_exited_rows_log_probabilities(boxes_opset17, calibration):
    model, result = boxes_opset17
    images = calibration["images"][:ROWS]
    log_probs, _, exits = _run(result.model, images)
    expected, _ = _run(model, images)
    full = exits == -1
    np.testing.assert_allclose(log_probs[full], expected[full], atol=1e-4)
    assert (log_probs[~full] <= 0).all()
    np.testing.assert_allclose(np.exp(log_probs[~full]).sum(axis=1), 1.0, rtol=1e-5)
    _assert_exited_rows_take_the_exit_class(result.plan.exits, result.frame, log_probs, exits)


def test_softmax_output_gives_exited_rows_probabilities(probabilities, calibration):
    model, result, _ = probabilities
    assert [o.name for o in result.model.graph.output] == ["probabilities", "moco_exit"]
    images = calibration["images"][:ROWS]
    probs, exits = _run(result.model, images)
    expected, = _run(model, images)
    full = exits == -1
    np.testing.assert_allclose(probs[full], expected[full], atol=1e-5)
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    _assert_exited_rows_take_the_exit_class(result.plan.exits, result.frame, probs, exits)


# -- 4. opset 17 -------------------------------------------------------------------------------

def test_opset_17_model_stays_at_opset_17(boxes_opset17, calibration):
    """A genuine opset-17 model: ReduceMax takes its axes as an attribute, in every nested graph."""
    model, result = boxes_opset17
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    onnx.checker.check_model(result.model, full_check=True)
    graphs = [result.model.graph] + _if_graphs(result.model.graph)
    reductions = [n for g in graphs for n in g.node if n.op_type.startswith("Reduce")]
    assert sum(n.op_type == "ReduceMax" for n in reductions) == len(result.plan.exits) >= 2
    for node in reductions:
        assert len(node.input) == 1 and [a.name for a in node.attribute if a.name == "axes"] == ["axes"]
    log_probs, boxes, exits = _run(result.model, calibration["images"][:256])
    assert (exits >= 0).any() and (exits == -1).any()


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("height, width", [(28, 28), (27, 25)])
def test_pooling_nodes_at_either_opset_and_any_size(calibration, opset, height, width):
    """Every image-pooling variant is valid at opset 17 and 18, the grid sized at run time equals the
    AveragePool whose window is fixed for that size, and each writes ``variant_width`` features."""
    images = calibration["images"][:64, :, :height, :width]
    shape = (1, *images.shape[1:])
    nodes, outputs = [], []
    for variant in variants_for(shape):
        for fixed_size in (True, False):
            outputs.append(f"{variant}/{'fixed' if fixed_size else 'any'}")
            nodes += variant_nodes("images", variant, shape, outputs[-1], outputs[-1], fixed_size=fixed_size,
                                   opset=opset)
    graph = onnx.helper.make_graph(
        nodes, "pooling", [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT,
                                                              ["batch", 1, "height", "width"])],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", None]) for name in outputs])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    features = dict(zip(outputs, _run(model, images)))
    assert "grid" in variants_for(shape)
    for variant in variants_for(shape):
        np.testing.assert_allclose(features[f"{variant}/any"], features[f"{variant}/fixed"], atol=1e-6)
        assert features[f"{variant}/fixed"].shape[1] == variant_width(shape, variant)


# -- 5. a batch of 0 rows ----------------------------------------------------------------------

def test_zero_rows_through_every_compiled_graph(positions, boxes_opset17, probabilities, calibration):
    for _, result, *_ in (positions, boxes_opset17, probabilities):
        empty = calibration["images"][:0]
        outputs = _run(result.model, empty)
        full = _run(result.model, calibration["images"][:3])
        for got, reference in zip(outputs, full):
            assert got.shape == (0, *reference.shape[1:]) and got.dtype == reference.dtype
        assert outputs[-1].shape == (0,)


# -- 6. calibration without labels -------------------------------------------------------------

def test_compile_without_labels_reports_no_accuracy(probabilities):
    from typer.testing import CliRunner

    from moco_compile.cli import app

    _, result, out = probabilities
    assert result.report["accuracy_before"] is None and result.report["accuracy_after"] is None
    assert result.plan.exits and result.report["exit_rate"] > 0
    run = CliRunner().invoke(app, ["report", str(out)])
    assert run.exit_code == 0, run.output
    cells = _cells((out / "report.html").read_text())
    for key in ("accuracy_before", "accuracy_after"):
        assert cells[key] == ("null", "-")
    assert float(cells["compute_reduction"][0]) == pytest.approx(result.report["compute_reduction"])


def _cells(page: str) -> dict[str, tuple[str | None, str]]:
    """``id -> (data-value, text)`` of the page's table cells that carry an id."""
    from html.parser import HTMLParser

    class Cells(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.cells: dict[str, tuple[str | None, str]] = {}
            self.open: str | None = None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "td" and "id" in attrs:
                self.open = attrs["id"]
                self.cells[self.open] = (attrs.get("data-value"), "")

        def handle_data(self, data):
            if self.open:
                value, text = self.cells[self.open]
                self.cells[self.open] = (value, text + data)

        def handle_endtag(self, tag):
            if tag == "td":
                self.open = None

    parser = Cells()
    parser.feed(page)
    return {key: (value, text.strip()) for key, (value, text) in parser.cells.items()}
