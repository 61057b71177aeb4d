"""Calibration images for a Hugging Face image classifier saved with its image processor (``--calib images/``).

Real images: the first shipped Fashion-MNIST calibration images written as PNG files, in one folder per class
(named by index, or by the class names of the model's config) or in one flat folder; a small ViT saved with a
``ViTImageProcessor`` that rescales to [0, 1], so the processed images equal the shipped arrays.
"""
from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from typer.testing import CliRunner  # noqa: E402

from moco_compile.calibration_images import ImageCalibration  # noqa: E402
from moco_compile.cli import app  # noqa: E402
from moco_compile.errors import CalibrationDataError  # noqa: E402

ROWS = 300
NAMES = ("top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A one-channel 28x28 ViT (random weights) saved with an image processor giving pixels in [0, 1]."""
    directory = tmp_path_factory.mktemp("hf_image")
    config = transformers.ViTConfig(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_channels=1, num_labels=10,
                                    id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    transformers.ViTForImageClassification(config).save_pretrained(directory)
    transformers.ViTImageProcessor(size={"height": 28, "width": 28}, do_normalize=False).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images(calibration):
    return calibration["images"][:ROWS], calibration["labels"][:ROWS]


def _write(root, images: np.ndarray, folders=None) -> list[int]:
    """PNG files of ``images`` under ``root`` (in ``folders[i]`` each when given); the order moco reads them in."""
    for position, image in enumerate(images):
        folder = root if folders is None else root / str(folders[position])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image[0] * 255).astype(np.uint8), "L").save(folder / f"{position:05d}.png")
    if folders is None:
        return list(range(len(images)))
    return sorted(range(len(images)), key=lambda i: (str(folders[i]), i))


def _rows(root, model_dir) -> dict[str, np.ndarray]:
    batches = list(ImageCalibration(root, model_dir).rows(["pixel_values"]))
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


@pytest.mark.parametrize("named", [False, True])
def test_class_folders_give_the_processed_images_and_their_classes(images, model_dir, tmp_path, named):
    """Images in class folders (by index, or by the config's class names) come back as the processor writes
    them, in batches: here the shipped arrays themselves, and each image's class."""
    pixels, labels = images
    order = _write(tmp_path / "images", pixels, [NAMES[c] if named else c for c in labels])
    rows = _rows(tmp_path / "images", model_dir)
    assert rows["pixel_values"].shape == (ROWS, 1, 28, 28) and rows["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(rows["pixel_values"], pixels[order], atol=1e-6)
    np.testing.assert_array_equal(rows["labels"], labels[order])


def test_a_flat_folder_has_no_labels(images, model_dir, tmp_path):
    order = _write(tmp_path / "images", images[0][:20])
    rows = _rows(tmp_path / "images", model_dir)
    assert "labels" not in rows
    np.testing.assert_allclose(rows["pixel_values"], images[0][:20][order], atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("no images", "holds no images"),
    ("unknown class folder", "a class folder must be named by a class index"),
    ("no processor", r"holds no image processor \(preprocessor_config.json\)"),
    ("unreadable image", "cannot read the image"),
])
def test_bad_image_calibration_gets_a_clear_error(case, message, images, model_dir, tmp_path):
    directory = model_dir
    root = tmp_path / "images"
    if case == "no images":
        (root / "0").mkdir(parents=True)
        (root / "0" / "notes.txt").write_text("not an image")
    elif case == "unknown class folder":
        _write(root, images[0][:4], ["top", "top", "jacket", "bag"])
    elif case == "no processor":
        directory = tmp_path / "bare"
        transformers.ViTConfig(image_size=28, num_channels=1).save_pretrained(directory)
        _write(root, images[0][:4])
    else:
        _write(root, images[0][:4])
        (root / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationDataError, match=message):
        _rows(root, directory)


def test_an_image_folder_for_an_onnx_file_is_refused(images, tmp_path, reference_onnx):
    _write(tmp_path / "images", images[0][:8])
    run = CliRunner().invoke(app, ["compile", str(reference_onnx), "--calib", str(tmp_path / "images"),
                                   "--out", str(tmp_path / "out")])
    assert run.exit_code != 0 and "holds images" in run.output and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_moco_compile_takes_a_folder_of_images_for_a_saved_image_classifier(images, model_dir, tmp_path):
    """End to end: ``moco compile DIR --calib images/``; the frame holds one row per image, with its class."""
    from moco_compile.frame import load_frame

    _write(tmp_path / "images", images[0], images[1])
    run = CliRunner().invoke(app, ["compile", str(model_dir), "--calib", str(tmp_path / "images"),
                                   "--out", str(tmp_path / "out"), "--exit-heads", "linear", "--no-latency",
                                   "--allow-no-exit", "--max-disagreement", "0.05"])
    assert run.exit_code == 0, run.output
    frame = load_frame(tmp_path / "out" / "frame.arrow")
    assert len(frame) == ROWS and sorted(set(frame["labels"])) == sorted(set(images[1]))


def test_colour_images_are_processed_in_rgb_with_the_processors_normalization(images, tmp_path):
    """A three-channel model (the usual case) gets RGB images, through the processor's own normalization: a grey
    image comes back with its three equal channels, ``(pixel - 0.5) / 0.5``."""
    directory = tmp_path / "rgb_model"
    config = transformers.ViTConfig(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    transformers.ViTForImageClassification(config).save_pretrained(directory)
    transformers.ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3).save_pretrained(directory)
    order = _write(tmp_path / "images", images[0][:12])
    rows = _rows(tmp_path / "images", directory)
    expected = np.repeat((images[0][:12][order] - 0.5) / 0.5, 3, axis=1)
    assert rows["pixel_values"].shape == (12, 3, 28, 28)
    np.testing.assert_allclose(rows["pixel_values"], expected, atol=1e-5)
