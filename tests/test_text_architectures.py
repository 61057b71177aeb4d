"""Hugging Face classifiers beyond BERT (encoders and last-token decoders), built offline from tiny configs
(random weights)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from moco_compile import compile  # noqa: E402
from moco_compile.errors import ModelError  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.calibration.calibrate import variant_features  # noqa: E402
from moco_compile.torch import EAGER_ARCHITECTURES, EarlyExitTextClassificationModel  # noqa: E402
from tests.plan_settings import UNPRICED_ONE_FAMILY  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier (`pytest -m "not slow"`) leaves this file out

SIZES = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             num_labels=3, max_position_embeddings=128)
ENCODERS = {  # architecture -> (config, the module path every cut lies under)
    "BertForSequenceClassification": (transformers.BertConfig(**SIZES), "bert."),
    "DistilBertForSequenceClassification": (transformers.DistilBertConfig(
        vocab_size=1000, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3, max_position_embeddings=128),
        "distilbert."),
    "RobertaForSequenceClassification": (transformers.RobertaConfig(**SIZES), "roberta."),
    "XLMRobertaForSequenceClassification": (transformers.XLMRobertaConfig(**SIZES), "roberta."),
    "AlbertForSequenceClassification": (transformers.AlbertConfig(embedding_size=16, **SIZES), "albert."),
    "ElectraForSequenceClassification": (transformers.ElectraConfig(embedding_size=16, **SIZES), "electra."),
    "DebertaV2ForSequenceClassification": (transformers.DebertaV2Config(  # as DeBERTa-v3: relative positions only
        relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"], position_buckets=8,
        max_relative_positions=16, norm_rel_ebd="layer_norm", share_att_key=True, **SIZES), "deberta."),
    "ModernBertForSequenceClassification": (transformers.ModernBertConfig(  # 8-token local windows, mean pooling
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, local_attention=8,
        global_attn_every_n_layers=2, classifier_pooling="mean", **{**SIZES, "num_hidden_layers": 3}),
        "model."),
}
_DECODER_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=1)
DECODERS = {  # architecture -> (config, module path prefix); they classify the last token the mask keeps
    "GPT2ForSequenceClassification": (transformers.GPT2Config(
        vocab_size=1000, n_embd=32, n_layer=2, n_head=2, num_labels=3, n_positions=128, **_DECODER_TOKENS),
        "transformer."),
    "LlamaForSequenceClassification": (transformers.LlamaConfig(num_key_value_heads=1, **_DECODER_TOKENS, **SIZES),
                                       "model."),
    "MistralForSequenceClassification": (transformers.MistralConfig(  # every layer in a window of 4 tokens
        num_key_value_heads=1, sliding_window=4, **_DECODER_TOKENS, **SIZES), "model."),
    "Qwen2ForSequenceClassification": (transformers.Qwen2Config(  # layer 0 sees every token, layer 1 a window
        num_key_value_heads=1, use_sliding_window=True, sliding_window=4, max_window_layers=1, **_DECODER_TOKENS,
        **SIZES), "model."),
    "Qwen3ForSequenceClassification": (transformers.Qwen3Config(num_key_value_heads=1, head_dim=16,
                                                                **_DECODER_TOKENS, **SIZES), "model."),
}
ROWS, LENGTH = 800, 16


def _tokens(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token rows, a quarter of them padded after 12 tokens; no token_type_ids (moco fills zeros)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, LENGTH), np.int64)
    mask[: rows // 4, 12:] = 0
    return {"input_ids": rng.integers(1, 1000, size=(rows, LENGTH)), "attention_mask": mask}


def _model(architecture: str):
    torch.manual_seed(0)
    config, _ = {**ENCODERS, **DECODERS}[architecture]
    return getattr(transformers, architecture)(config).eval()


def _decoder_tokens(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """As :func:`_tokens`, half the padded rows padded on the left instead, pads given the pad token id 0."""
    tokens = _tokens(rows, seed)
    tokens["attention_mask"][: rows // 8] = tokens["attention_mask"][: rows // 8, ::-1]
    assert tokens["attention_mask"][: rows // 8, 0].sum() == 0 < tokens["attention_mask"][rows // 8: rows // 4, 0].min()
    tokens["input_ids"][tokens["attention_mask"] == 0] = 0
    return tokens


def _assert_eager_routes_as_the_graph(model, result, rows: dict[str, np.ndarray]) -> None:
    """The eager API, given the compiled plan, names every cut as the compile did and sends the rows out
    of the same exits with the same logits as the compiled graph."""
    eager = EarlyExitTextClassificationModel(model).load_plan(result.plan)
    assert {column.split(":")[0] for column in result.frame.columns if ":" in column} == set(eager.cut_names)
    assert eager.exit_names == [e.cut.module for e in result.plan.exits]
    output = eager(**{k: torch.from_numpy(v) for k, v in rows.items()})
    session = ort.InferenceSession(result.model.SerializeToString())
    feed = {i.name: rows.get(i.name, np.zeros_like(rows["input_ids"])) for i in session.get_inputs()}
    logits, exits = session.run(None, feed)
    assert (output.exits.numpy() == exits).mean() > 0.99 and (exits >= 0).any()
    same = output.exits.numpy() == exits
    np.testing.assert_allclose(output.logits.numpy()[same], logits[same], atol=1e-3, rtol=1e-3)


def _assert_eager_features_are_the_frames(model, result, calibration: dict[str, np.ndarray], summary: str) -> None:
    """At every cut, a rule on random weights over the masked mean and the summary token exits exactly
    the calibration rows whose features in the compile's frame score above its threshold, with that margin;
    the other rows get the wrapped model's own logits."""
    every = 3  # rows padded on the left (decoders), on the right, and unpadded
    feed = {k: torch.from_numpy(v[::every]) for k, v in calibration.items()}
    with torch.no_grad():
        full = model(**feed).logits.numpy()
    pooling = f"token_mean@attention_mask+{summary}"
    rng = np.random.default_rng(0)
    for cut in EarlyExitTextClassificationModel(model).cut_names:
        features = variant_features(result.frame, cut, pooling)[::every]
        weights = rng.normal(size=features.shape[1])
        scores = features @ weights
        threshold = float(np.median(scores))
        rule = {"weights": weights, "bias": 0.0, "threshold": threshold}
        output = EarlyExitTextClassificationModel(model).add_rule(rule, 0, cut, pooling=pooling)(**feed)
        exited = output.exits.numpy() == 0
        clear = np.abs(scores - threshold) > 1e-3
        np.testing.assert_array_equal(exited[clear], (scores > threshold)[clear], err_msg=cut)
        np.testing.assert_allclose(output.logits.numpy()[exited, 0], scores[exited] - threshold, atol=1e-3,
                                   rtol=1e-3, err_msg=cut)
        np.testing.assert_allclose(output.logits.numpy()[~exited], full[~exited], atol=1e-4, err_msg=cut)


@pytest.mark.parametrize("architecture", list(ENCODERS))
def test_encoder_compiles_with_exits_named_by_module(architecture):
    """...and the eager API runs the compiled plan as the graph does."""
    model = _model(architecture)
    result = compile(model, _tokens(ROWS), max_disagreement=0.05, measure_latency=False, show_progress=False,
                     planner_config=UNPRICED_ONE_FAMILY)
    names = [e.cut.module for e in result.plan.exits]
    assert names and len(set(names)) == len(names)
    assert all(name.startswith(ENCODERS[architecture][1]) for name in names)
    assert result.report["verification"]["rows"] > 0
    _assert_eager_routes_as_the_graph(model, result, _tokens(400, seed=1))
    _assert_eager_features_are_the_frames(model, result, _tokens(ROWS), "first_token")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_eager_modernbert_without_rules_gives_the_models_logits_for_either_head_pooling(pooling):
    """No rule: every row runs every step and the head, token 0 or the masked mean as configured."""
    config, _ = ENCODERS["ModernBertForSequenceClassification"]
    torch.manual_seed(0)
    model = transformers.ModernBertForSequenceClassification(
        transformers.ModernBertConfig(**{**config.to_dict(), "classifier_pooling": pooling})).eval()
    feed = {name: torch.from_numpy(values) for name, values in _tokens(32).items()}
    with torch.no_grad():
        expected = model(**feed).logits
    output = EarlyExitTextClassificationModel(model)(**feed)
    assert (output.exits == -1).all()
    torch.testing.assert_close(output.logits, expected, atol=1e-5, rtol=1e-5)


def test_a_deberta_with_a_convolution_after_its_first_block_is_refused_by_the_eager_api():
    """DeBERTa-v2 xlarge's convolution reads the embeddings beside block 0's output: not run in steps."""
    config, _ = ENCODERS["DebertaV2ForSequenceClassification"]
    model = transformers.DebertaV2ForSequenceClassification(
        transformers.DebertaV2Config(**{**config.to_dict(), "conv_kernel_size": 3})).eval()
    with pytest.raises(ModelError, match=r"convolution after the first block \(conv_kernel_size > 0\).*moco.compile"):
        EarlyExitTextClassificationModel(model)


@pytest.mark.parametrize("architecture", list(DECODERS))
def test_decoder_compiles_with_exits_on_the_last_token(architecture):
    """A causal decoder's token 0 has seen only itself: its sequence cuts pool the last token the
    mask keeps (left- and right-padded rows mixed), never the first; the eager API does the same."""
    model, tokens = _model(architecture), _decoder_tokens(ROWS)
    result = compile(model, tokens, max_disagreement=0.05, measure_latency=False, show_progress=False,
                     planner_config=UNPRICED_ONE_FAMILY)
    names = [e.cut.module for e in result.plan.exits]
    assert names and all(name.startswith(DECODERS[architecture][1].rstrip(".")) for name in names)
    assert any(column.endswith(":last_token") for column in result.frame.columns)
    assert not any("first_token" in e.pooling for e in result.plan.exits)
    assert result.report["verification"]["rows"] > 0
    _assert_eager_routes_as_the_graph(model, result, _decoder_tokens(400, seed=1))
    _assert_eager_features_are_the_frames(model, result, tokens, "last_token@attention_mask")


def test_eager_cut_names_are_the_importers_where_albert_runs_its_shared_layer_three_times():
    """A module run again later names its cut by its innermost module, numbered per run; the last run's
    attention cut by the attention module (``passes/graph/cut_points.py``)."""
    from moco_compile.prepare import cut_points_of

    torch.manual_seed(0)
    config = transformers.AlbertConfig(embedding_size=16, **{**SIZES, "num_hidden_layers": 3})
    model = transformers.AlbertForSequenceClassification(config).eval()
    tokens = _tokens(4)
    _, cuts = cut_points_of(import_model(model), {**tokens, "token_type_ids": np.zeros_like(tokens["input_ids"])}, 4)
    eager = EarlyExitTextClassificationModel(model)
    assert eager.cut_names == [cut.module for cut in cuts]
    layer = "albert.encoder.albert_layer_groups.0.albert_layers.0"
    condition = {"weights": np.zeros(32), "bias": 0.0, "threshold": 1.0}
    assert eager.add_rule(condition, 0, "encoder", 1, "attention").exit_names == [f"{layer}.attention.LayerNorm[1]"]
    with pytest.raises(ModelError, match="block 2's output is the last state before the head"):
        eager.add_rule(condition, 0, "encoder", 2, "output")


def test_last_token_piece_reads_the_last_token_the_mask_keeps():
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from moco_compile.passes.calibration.pooling import piece_nodes

    nodes = piece_nodes("states", "last_token@mask", (1, 5, 3), "pooled", "p")
    graph = helper.make_graph(nodes, "last", [helper.make_tensor_value_info("states", onnx.TensorProto.FLOAT16, [None, 5, 3]),
                                              helper.make_tensor_value_info("mask", onnx.TensorProto.INT64, [None, 5])],
                              [helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, [None, 3])])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
                                   .SerializeToString())
    states = np.arange(4 * 5 * 3, dtype=np.float16).reshape(4, 5, 3)
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    pooled, = session.run(None, {"states": states, "mask": mask})
    assert pooled.dtype == np.float32
    assert (pooled == states[np.arange(4), [2, 4, 4, 0]].astype(np.float32)).all()


def test_unsupported_or_unpadded_classifiers_are_refused_saying_what_to_do():
    config = transformers.GPT2Config(vocab_size=1000, n_embd=32, n_layer=2, n_head=2, num_labels=3, n_positions=128)
    with pytest.raises(ModelError, match="pad_token_id"):
        import_model(transformers.GPT2ForSequenceClassification(config).eval())
    mpnet = transformers.MPNetConfig(**SIZES)
    with pytest.raises(ModelError, match="not a supported Hugging Face architecture") as refused:
        import_model(transformers.MPNetForSequenceClassification(mpnet).eval())
    assert all(name in str(refused.value) for name in {**ENCODERS, **DECODERS})


def test_an_export_that_gives_other_logits_than_the_module_is_refused():
    """The export is run on a padded batch against the module: a graph one weight off is refused, saying
    what to do, before anything is compiled."""
    import onnx

    from moco_compile.export_check import check_export
    from moco_compile.importer import export_hf_sequence_classifier

    model = _model("BertForSequenceClassification")
    exported = export_hf_sequence_classifier(model)
    example = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]),
               "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), "token_type_ids": torch.zeros(2, 4).long()}
    check_export(exported, model, example, "BertForSequenceClassification")
    head = next(t for t in exported.graph.initializer if t.name == "classifier.weight")
    head.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(head) + np.float32(0.5), head.name))
    with pytest.raises(ModelError, match="gives other logits than the module .*export it to ONNX yourself"):
        check_export(exported, model, example, "BertForSequenceClassification")


def test_eager_api_wraps_what_the_importer_imports_and_refuses_the_rest_naming_them():
    from moco_compile.importer import SUPPORTED_HF_ARCHITECTURES

    assert EAGER_ARCHITECTURES == SUPPORTED_HF_ARCHITECTURES
    with pytest.raises(ModelError, match="not supported by the eager text API.*GPT2.*moco.compile"):
        EarlyExitTextClassificationModel(transformers.MPNetForSequenceClassification(transformers.MPNetConfig(**SIZES)))


def test_readme_and_importer_list_the_tested_architectures():
    from pathlib import Path

    from moco_compile.importer import SUPPORTED_HF_ARCHITECTURES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Supported models")[1].split("\n## ")[0]
    assert list(SUPPORTED_HF_ARCHITECTURES) == list(ENCODERS) + list(DECODERS)
    assert all(f"`{name}`" in section for name in SUPPORTED_HF_ARCHITECTURES)
