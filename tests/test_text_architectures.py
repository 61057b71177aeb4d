"""Hugging Face encoder classifiers beyond BERT, built offline from tiny configs (random weights)."""
from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from moco_compile import compile  # noqa: E402
from moco_compile.errors import ModelError  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.torch import EarlyExitTextClassificationModel  # noqa: E402

SIZES = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             num_labels=3, max_position_embeddings=128)
ENCODERS = {  # architecture -> (config, the module path every cut lies under)
    "BertForSequenceClassification": (transformers.BertConfig(**SIZES), "bert."),
    "DistilBertForSequenceClassification": (transformers.DistilBertConfig(
        vocab_size=1000, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3, max_position_embeddings=128),
        "distilbert."),
    "RobertaForSequenceClassification": (transformers.RobertaConfig(**SIZES), "roberta."),
    "AlbertForSequenceClassification": (transformers.AlbertConfig(embedding_size=16, **SIZES), "albert."),
    "ElectraForSequenceClassification": (transformers.ElectraConfig(embedding_size=16, **SIZES), "electra."),
}
ROWS, LENGTH = 1200, 16


def _tokens(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token rows, a quarter of them padded after 12 tokens; no token_type_ids (moco fills zeros)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, LENGTH), np.int64)
    mask[: rows // 4, 12:] = 0
    return {"input_ids": rng.integers(1, 1000, size=(rows, LENGTH)), "attention_mask": mask}


def _model(architecture: str):
    torch.manual_seed(0)
    config, _ = ENCODERS[architecture]
    return getattr(transformers, architecture)(config).eval()


@pytest.mark.parametrize("architecture", list(ENCODERS))
def test_encoder_compiles_with_exits_named_by_module(architecture):
    result = compile(_model(architecture), _tokens(ROWS), max_disagreement=0.05, measure_latency=False,
                     show_progress=False)
    names = [e.cut.module for e in result.plan.exits]
    assert names and len(set(names)) == len(names)
    assert all(name.startswith(ENCODERS[architecture][1]) for name in names)
    assert result.report["verification"]["rows"] > 0


def test_decoder_classifier_is_refused_naming_what_is_supported():
    config = transformers.GPT2Config(vocab_size=1000, n_embd=32, n_layer=2, n_head=2, num_labels=3, n_positions=128,
                                     pad_token_id=0)
    with pytest.raises(ModelError, match="Decoder-style classifiers that pool the last token") as refused:
        import_model(transformers.GPT2ForSequenceClassification(config).eval())
    assert all(name in str(refused.value) for name in ENCODERS)


def test_eager_api_names_the_architectures_it_wraps():
    with pytest.raises(ModelError, match="not supported by the eager text API.*moco.compile"):
        EarlyExitTextClassificationModel(_model("DistilBertForSequenceClassification"))


def test_readme_and_importer_list_the_tested_encoders():
    from pathlib import Path

    from moco_compile.importer import SUPPORTED_HF_ARCHITECTURES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Supported models")[1].split("\n## ")[0]
    assert list(SUPPORTED_HF_ARCHITECTURES) == list(ENCODERS)
    assert all(f"`{name}`" in section for name in ENCODERS)
