"""Models exported with a fixed batch (no dynamic axes): freed, checked on real rows, compiled or refused."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from moco_compile import compile
from moco_compile.errors import ModelError
from moco_compile.evaluation import evaluate_build
from moco_compile.importer import import_model
from moco_compile.passes.graph.fixed_batch import BATCH_DIM, fixed_batch_size, free_batch
from tests.plan_settings import CHEAPEST_PLAN

COMPILE_ROWS = 2000  # enough for a plan with exits; two compiles of it cost less than the shared 4,000-row one


def _fixed(reference_model: onnx.ModelProto, size: int = 1) -> onnx.ModelProto:
    """The reference CNN as a static export writes it: inputs and outputs at ``size`` rows, and its
    ``x.view(x.size(0), -1)`` a Reshape to the constant ``[size, 64]``."""
    model = onnx.ModelProto()
    model.CopyFrom(reference_model)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = size
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    target = next(i for i in model.graph.initializer if i.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [-1, 64]
    target.CopyFrom(numpy_helper.from_array(np.array([size, 64], np.int64), target.name))
    del model.graph.value_info[:]
    return model


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def test_a_static_export_has_its_batch_freed_and_its_reshape_kept_per_row(reference_model, calibration):
    fixed = _fixed(reference_model)
    assert fixed_batch_size(fixed) == 1 and fixed_batch_size(reference_model) is None
    freed = free_batch(fixed, 1)
    assert _dims(freed.graph.input[0]) == [BATCH_DIM, 1, 28, 28]
    assert _dims(freed.graph.output[0]) == [BATCH_DIM, 10]
    reshape = next(n for n in freed.graph.node if n.op_type == "Reshape")
    target = next(i for i in freed.graph.initializer if i.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [-1, 64]  # allowzero=1: the batch is inferred
    images = calibration["images"][:16]
    np.testing.assert_allclose(_run(freed, {"images": images}), _run(reference_model, {"images": images}),
                               rtol=1e-5, atol=1e-5)


def test_a_reshape_of_a_sequence_copies_the_batch_and_shared_targets_are_split():
    """``Reshape(x, [1, -1])`` (no allowzero) of a ``[1, seq, 3]`` input, whose fixed output shape is not
    static, becomes ``[0, -1]``; a target another node also reads is left to it, the Reshape gets its own."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "seq", 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, None])
    z = helper.make_tensor_value_info("z", onnx.TensorProto.INT64, [1, 2])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "target"], ["y"]), helper.make_node("Identity", ["target"], ["t"]),
         helper.make_node("Unsqueeze", ["t", "axis"], ["z"])], "g", [x], [y, z],
        [numpy_helper.from_array(np.array([1, -1], np.int64), "target"),
         numpy_helper.from_array(np.array([0], np.int64), "axis")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert fixed_batch_size(model) == 1
    freed = free_batch(model, 1)
    reshape = next(n for n in freed.graph.node if n.op_type == "Reshape")
    values = {i.name: numpy_helper.to_array(i).tolist() for i in freed.graph.initializer}
    assert values[reshape.input[1]] == [0, -1] and values["target"] == [1, -1]
    session = ort.InferenceSession(freed.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = np.arange(30, dtype=np.float32).reshape(2, 5, 3)
    np.testing.assert_array_equal(session.run(["y"], {"x": rows})[0], rows.reshape(2, 15))


@pytest.mark.slow
def test_a_static_export_compiles_to_the_plan_of_the_dynamic_one_and_evaluates(tmp_path, reference_model,
                                                                               calibration):
    rows = {name: values[:COMPILE_ROWS] for name, values in calibration.items()}
    onnx.save(_fixed(reference_model), str(tmp_path / "fixed.onnx"))
    result, reference = (compile(model, rows, out_dir=out, measure_latency=False, show_progress=False,
                                 planner_config=CHEAPEST_PLAN)
                         for model, out in ((tmp_path / "fixed.onnx", tmp_path / "out"), (reference_model, None)))
    assert result.plan.exits and result.plan.to_dict() == reference.plan.to_dict()
    assert "fixed its inputs at a batch of 1" in result.report["import_notes"][0]
    assert _dims(result.model.graph.input[0])[0] == BATCH_DIM
    images = calibration["images"][COMPILE_ROWS:COMPILE_ROWS + 512]
    compiled, original = _run(result.model, {"images": images}), _run(reference_model, {"images": images})
    np.testing.assert_allclose(compiled, _run(reference.model, {"images": images}), rtol=1e-5, atol=1e-5)
    evaluation = evaluate_build(tmp_path / "out", {"images": images}, show_progress=False, windows=2)
    assert evaluation["disagreement"]["fraction"] == pytest.approx((compiled.argmax(1) != original.argmax(1)).mean())


def _mixing_rows(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a tenth of the batch's summed logits added to each row: at its fixed batch of 1
    that is a per-row scale, on more rows it mixes them."""
    return _after_logits(model, [helper.make_node("ReduceSum", ["logits_raw", "batch_axis"], ["batch_sum"]),
                                 helper.make_node("Mul", ["batch_sum", "tenth"], ["shift"]),
                                 helper.make_node("Add", ["logits_raw", "shift"], ["logits"])])


def _padding_a_row(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with one constant row of 5 logits joined to its batch of 1 and cut off again: on more
    rows the Concat fails."""
    return _after_logits(model, [helper.make_node("Concat", ["logits_raw", "padding"], ["padded"], axis=1),
                                 helper.make_node("Slice", ["padded", "starts", "ends", "columns"], ["logits"])])


def _after_logits(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    graph = model.graph
    assert graph.output[0].name == "logits"
    for node in graph.node:
        node.output[:] = ["logits_raw" if name == "logits" else name for name in node.output]
    graph.initializer.extend(numpy_helper.from_array(np.array(value, dtype), name) for name, value, dtype in (
        ("batch_axis", [0], np.int64), ("tenth", 0.1, np.float32), ("padding", np.zeros((1, 5)), np.float32),
        ("starts", [0], np.int64), ("ends", [10], np.int64), ("columns", [1], np.int64)))
    graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("variant, message", [
    (_mixing_rows, "get other outputs than the same rows run one batch at a time"),
    (_padding_a_row, "cannot run on 8 rows"),
])
def test_a_static_export_whose_batch_cannot_be_freed_is_refused_with_how_to_export_it(
        tmp_path, reference_model, calibration, variant, message):
    model = variant(_fixed(reference_model))
    assert import_model(model).fixed_batch.size == 1
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="fixed at a batch of 1") as error:
        compile(model, calibration, out_dir=out, measure_latency=False, show_progress=False)
    assert message in str(error.value) and "dynamic_axes" in str(error.value)
    assert not out.exists()


def _static_export(architecture: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A zoo architecture (random weights: freeing reads shapes, not values) exported without dynamic
    axes at batch 1, and 8 rows of its inputs."""
    import io

    import torch

    from models.zoo_export import ARCHITECTURES, input_names, model_inputs

    torch.manual_seed(0)
    module = ARCHITECTURES[architecture]().eval()
    names = input_names(module)
    rows = model_inputs(names, np.random.default_rng(0).random((8, 1, 28, 28)).astype(np.float32))
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, tuple(torch.from_numpy(v[:1]) for v in rows.values()), buffer, dynamo=False,
                          input_names=names, output_names=["logits"], opset_version=18)
    return onnx.load_from_string(buffer.getvalue()), rows


@pytest.mark.parametrize("architecture", ["mobilenet-v3", "densenet", "convnext", "inline-vit"])
def test_static_exports_of_the_zoo_are_freed_or_refused(architecture):
    """The CNNs are freed exactly; the ViT's class token is expanded to the fixed batch before a Concat,
    which the pass leaves, so the check refuses it."""
    from moco_compile.prepare import check_freed_batch

    model, rows = _static_export(architecture)
    imported = import_model(model)
    if architecture == "inline-vit":
        with pytest.raises(ModelError, match="cannot run on 8 rows .*Concat"):
            check_freed_batch(imported, rows)
        return
    assert check_freed_batch(imported, rows) == 8
    one_at_a_time = np.concatenate([_run(model, {k: v[i:i + 1] for k, v in rows.items()}) for i in range(8)])
    np.testing.assert_allclose(_run(imported.model, rows), one_at_a_time, rtol=1e-5, atol=1e-5)
