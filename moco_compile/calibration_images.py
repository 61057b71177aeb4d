"""Calibration images for a Hugging Face image classifier saved with its image processor.

``moco compile DIR --calib images/``: the rows are image files, turned into ``pixel_values`` by the image
processor saved in ``DIR`` (``preprocessor_config.json``), as the model is served, rather than an array the user
prepared.  ``images/`` holds the images directly (no labels), or one folder per class (``images/<class>/...``,
as torchvision's ``ImageFolder`` reads them): a folder's name is its class index, or a class name the model's
config lists (``label2id``).  Images are read with Pillow, in RGB (grey for a one-channel model), and processed
in batches, so the whole set is never in memory as floats.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from moco_compile.constants import LABELS
from moco_compile.errors import CalibrationDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PROCESSOR_FILE = "preprocessor_config.json"
BATCH_ROWS = 256


class ImageCalibration:
    """The image files under ``path``, to be processed by the image processor saved in ``model_directory``.

    Parameters
    ----------
    path:
        A folder of images, or of one folder of images per class (module docstring).
    model_directory:
        The ``save_pretrained`` directory of the classifier, holding its image processor.
    """

    def __init__(self, path: str | Path, model_directory: str | Path) -> None:
        self.path = Path(path)
        self.model_directory = Path(model_directory)
        if not self.path.is_dir():
            raise CalibrationDataError(f"calibration folder {self.path} does not exist")
        self.files, self.folders = _image_files(self.path)
        if not self.files:
            raise CalibrationDataError(f"{self.path} holds no images ({', '.join(IMAGE_SUFFIXES)}), directly or in "
                                       "one folder per class")

    def rows(self, input_names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """Batches of ``pixel_values`` (the model's one input, ``input_names``) as the saved processor writes
        them, with ``labels`` when the images sit in class folders."""
        from transformers import AutoConfig, AutoImageProcessor

        if importlib.util.find_spec("PIL") is None:
            raise CalibrationDataError("reading image files needs Pillow: pip install 'moco-compile[text]' (or pillow)")
        if len(input_names) != 1:
            raise CalibrationDataError(f"image folders calibrate a model with one input; this one takes {input_names}")
        if not (self.model_directory / PROCESSOR_FILE).is_file():
            raise CalibrationDataError(f"{self.model_directory} holds no image processor ({PROCESSOR_FILE}): save it "
                                       "beside the model (processor.save_pretrained(directory)), or pass the "
                                       "processed images as an .npz (pixel_values, labels)")
        processor = AutoImageProcessor.from_pretrained(self.model_directory, local_files_only=True)
        config = AutoConfig.from_pretrained(self.model_directory, local_files_only=True)
        mode = "L" if getattr(config, "num_channels", 3) == 1 else "RGB"
        labels = None if self.folders is None else _class_indices(self.folders, config, self.path)
        for start in range(0, len(self.files), BATCH_ROWS):
            images = [_open(file, mode) for file in self.files[start:start + BATCH_ROWS]]
            try:
                pixels = np.asarray(processor(images=images, return_tensors="np")["pixel_values"], np.float32)
            except (ValueError, TypeError) as error:  # e.g. a mean per channel for another number of channels
                raise CalibrationDataError(f"the image processor saved in {self.model_directory} failed on the "
                                           f"{mode} images of {self.path} ({error})") from error
            channels = 1 if mode == "L" else 3
            batch = {input_names[0]: pixels.reshape(len(images), channels, *pixels.shape[-2:])}
            if labels is not None:
                batch[LABELS] = labels[start:start + BATCH_ROWS]
            yield batch


def _image_files(path: Path) -> tuple[list[Path], list[str] | None]:
    """The images directly in ``path`` (no labels), else those in its subfolders, with each one's folder name."""
    direct = sorted(file for file in path.iterdir() if file.suffix.lower() in IMAGE_SUFFIXES)
    if direct:
        return direct, None
    files, folders = [], []
    for folder in sorted(entry for entry in path.iterdir() if entry.is_dir()):
        found = sorted(file for file in folder.iterdir() if file.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        folders += [folder.name] * len(found)
    return files, folders


def _open(file: Path, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError) as error:
        raise CalibrationDataError(f"cannot read the image {file} ({error}); remove it or replace it") from error


def _class_indices(folders: list[str], config, path: Path) -> np.ndarray:
    """Each image's class: its folder's name as an index, or as a name in the config's ``label2id``."""
    names = {str(name): index for name, index in (getattr(config, "label2id", None) or {}).items()}
    classes = getattr(config, "num_labels", len(names))
    indices = {}
    for folder in sorted(set(folders)):
        if folder in names:
            indices[folder] = names[folder]
        elif folder.isdigit() and int(folder) < classes:
            indices[folder] = int(folder)
        else:
            raise CalibrationDataError(f"{path / folder}: a class folder must be named by a class index "
                                       f"(0-{classes - 1}) or a class name of the model ({sorted(names)[:10]}, its "
                                       "config's label2id)")
    return np.asarray([indices[folder] for folder in folders], np.int64)
