"""Calibration texts for a Hugging Face text classifier saved with its tokenizer.

``moco compile DIR --calib texts.csv``: the rows are texts, tokenized by the tokenizer saved in ``DIR`` as the
model is served (truncated to its longest input, padded to the longest row), rather than token arrays the
user prepared.  A ``.csv`` (read by pyarrow; a header row) or ``.jsonl`` (one object per line) has a ``text``
column and optionally a ``label`` (or ``labels``) column: class indices, or class names the model's config
lists (``id2label``); a ``.txt`` has one text per line and no labels.

:class:`TextCalibration` holds the texts until the model is imported; :meth:`TextCalibration.rows` then
tokenizes them for the model's inputs (``input_ids``, ``attention_mask``, and ``token_type_ids`` where the
model takes them).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moco_compile.constants import LABELS
from moco_compile.errors import CalibrationDataError

TEXT_SUFFIXES = (".csv", ".jsonl", ".txt")
TEXT_COLUMN = "text"
LABEL_COLUMNS = ("label", LABELS)
# what tokenizer.save_pretrained writes, one file or another by kind of tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")


class TextCalibration:
    """Texts (and labels) from ``path``, to be tokenized by the tokenizer saved in ``model_directory``.

    Parameters
    ----------
    path:
        A ``.csv``, ``.jsonl`` or ``.txt`` file (module docstring).
    model_directory:
        The ``save_pretrained`` directory of the classifier, holding its tokenizer.
    """

    def __init__(self, path: str | Path, model_directory: str | Path) -> None:
        self.path = Path(path)
        self.model_directory = Path(model_directory)
        if not self.path.is_file():
            raise CalibrationDataError(f"calibration file {self.path} does not exist")
        self.texts, self.labels = _read(self.path)
        if not self.texts:
            raise CalibrationDataError(f"{self.path} holds no texts")

    def rows(self, input_names: Sequence[str]) -> dict[str, np.ndarray]:
        """The texts tokenized for a model taking ``input_ids``, ``attention_mask`` and maybe ``token_type_ids``
        (``input_names``), int64 ``[rows, longest]``, with ``labels`` as class indices when the file has them."""
        from transformers import AutoConfig, AutoTokenizer

        advice = ("save it beside the model (tokenizer.save_pretrained(directory)), or pass the tokenized rows as "
                  "an .npz (input_ids, attention_mask, labels)")
        if not any((self.model_directory / name).is_file() for name in TOKENIZER_FILES):
            # transformers would make up a tokenizer of special tokens alone from the config
            raise CalibrationDataError(f"{self.model_directory} holds no tokenizer (none of "
                                       f"{', '.join(TOKENIZER_FILES)}): {advice}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_directory, local_files_only=True)
        except (OSError, ValueError) as error:
            raise CalibrationDataError(f"the tokenizer in {self.model_directory} could not be loaded ({error}): "
                                       f"{advice}") from error
        config = AutoConfig.from_pretrained(self.model_directory, local_files_only=True)
        if tokenizer.pad_token is None and getattr(config, "pad_token_id", None) is not None:
            tokenizer.pad_token_id = config.pad_token_id  # a decoder's: moco pools the last token the mask keeps
        longest = min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", None) or 512)
        encoded = tokenizer(self.texts, truncation=True, max_length=longest, padding="longest", return_tensors="np")
        arrays = {name: np.asarray(encoded[name], np.int64) for name in input_names if name in encoded}
        if self.labels is not None:
            arrays[LABELS] = _class_indices(self.labels, config, self.path)
        return arrays


def is_text_calibration(path: str | Path) -> bool:
    """Whether ``--calib`` names a file of texts (by its suffix)."""
    return Path(path).suffix.lower() in TEXT_SUFFIXES


def _read(path: Path) -> tuple[list[str], list | None]:
    """The texts of ``path`` and its labels column (None without one)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()], None
    import pyarrow.csv
    import pyarrow.json

    try:
        table = pyarrow.csv.read_csv(path) if suffix == ".csv" else pyarrow.json.read_json(path)
    except Exception as error:  # pyarrow raises ArrowInvalid and friends, with the line at fault
        raise CalibrationDataError(f"cannot read {path} as {suffix[1:]} ({error})") from error
    columns = table.column_names
    if TEXT_COLUMN not in columns:
        raise CalibrationDataError(f"{path} has no {TEXT_COLUMN!r} column (it has {columns}): name the column of "
                                   f"texts {TEXT_COLUMN!r}")
    texts = ["" if text is None else str(text) for text in table.column(TEXT_COLUMN).to_pylist()]
    label_column = next((name for name in LABEL_COLUMNS if name in columns), None)
    return texts, None if label_column is None else table.column(label_column).to_pylist()


def _class_indices(labels: list, config, path: Path) -> np.ndarray:
    """``labels`` as class indices: integers as given, names through the config's ``label2id``."""
    if any(label is None for label in labels):
        raise CalibrationDataError(f"{path}: some rows have no label; label every row, or drop the column")
    if all(isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in labels):
        return np.asarray(labels, np.int64)
    names = {str(name): index for name, index in (getattr(config, "label2id", None) or {}).items()}
    unknown = sorted({str(label) for label in labels} - set(names))
    if unknown:
        raise CalibrationDataError(f"{path}: labels {unknown[:5]} are not class names of the model, whose config "
                                   f"names {sorted(names)} (label2id); give class indices or those names")
    return np.asarray([names[str(label)] for label in labels], np.int64)
