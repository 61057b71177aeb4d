"""Calibration data: validation against the model's inputs and batching.

The CLI reads an ``.npz`` with one array per model input plus optional ``labels`` (or, for a Hugging
Face directory, texts or image files: :func:`load_calibration`); the API takes such a mapping, any
iterable of such mappings (a DataLoader yielding dicts works), or a path.  Problems are reported with
the key, what was expected and what to do.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from moco_compile.constants import LABELS
from moco_compile.errors import CalibrationDataError


def load_calibration(path: str | Path, model: Any = None) -> Any:
    """The rows a calibration path names: an ``.npz``, in memory; or, for a Hugging Face classifier saved in the
    directory ``model``, texts (``.csv``/``.jsonl``/``.txt``, :mod:`~moco_compile.calibration_text`) or a folder
    of image files (:mod:`~moco_compile.calibration_images`), prepared once the model is imported."""
    from moco_compile.calibration_images import ImageCalibration
    from moco_compile.calibration_text import TextCalibration, is_text_calibration

    texts, images = is_text_calibration(path), Path(path).is_dir()
    if not (texts or images):
        return load_npz(path)
    if images and (any(Path(path).glob("*.npz")) or any(Path(path).glob("*.parquet"))):
        raise CalibrationDataError(f"{path} is a folder of .npz/.parquet shards, which the Ray engine reads: "
                                   "pass --engine ray (or one .npz file)")
    if not isinstance(model, (str, Path)) or not Path(model).is_dir():
        what = "texts, which moco tokenizes with the tokenizer" if texts else \
            "images, which moco processes with the image processor"
        raise CalibrationDataError(f"{path} holds {what} saved in a Hugging Face model directory, and the model is "
                                   "not one: give an .npz of the model's inputs instead")
    return TextCalibration(path, model) if texts else ImageCalibration(path, model)


def for_inputs(calibration: Any, input_names: Sequence[str]) -> Any:
    """``calibration`` as rows for a model taking ``input_names``: texts and image files
    (:func:`load_calibration`'s) prepared for those inputs, anything else as given."""
    from moco_compile.calibration_images import ImageCalibration
    from moco_compile.calibration_text import TextCalibration

    if isinstance(calibration, (TextCalibration, ImageCalibration)):
        return calibration.rows(input_names)
    return calibration


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read a calibration ``.npz`` into memory-mapped-free numpy arrays."""
    path = Path(path)
    if not path.exists():
        raise CalibrationDataError(f"calibration file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except Exception as error:
        raise CalibrationDataError(f"cannot read {path} as an .npz archive ({error}); save it with "
                                   "numpy.savez(path, <input name>=array, ..., labels=array)") from error


class CalibrationSpec:
    """What the model expects of each input: dtype and shape (None for dynamic axes)."""

    def __init__(self, model: onnx.ModelProto, num_classes: int, zeros_like: Mapping[str, str] | None = None) -> None:
        """``zeros_like``: inputs that may be left out, each then zeros shaped like another input
        (a text model's ``token_type_ids``, as Hugging Face fills them when not given)."""
        self.zeros_like = dict(zeros_like or {})
        initializers = {init.name for init in model.graph.initializer}
        self.inputs: dict[str, tuple[np.dtype, tuple[int | None, ...]]] = {}
        for value in model.graph.input:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
            self.inputs[value.name] = (dtype, shape)
        self.num_classes = num_classes

    def check(self, batch: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
        """Validate one batch; return it as numpy arrays cast to the input dtypes."""
        arrays = {key: _as_numpy(value) for key, value in batch.items()}
        for name, like in self.zeros_like.items():
            if name not in arrays and like in arrays:
                arrays[name] = np.zeros(arrays[like].shape, np.int64)
        missing = [name for name in self.inputs if name not in arrays]
        unknown = [key for key in arrays if key not in self.inputs and key != LABELS]
        if missing or unknown:
            raise CalibrationDataError(
                f"{where}: calibration keys {sorted(arrays)} do not match the model inputs "
                f"{list(self.inputs)}" + (f"; missing: {missing}" if missing else "")
                + (f"; not model inputs: {unknown}" if unknown else "")
                + f". Provide one array per model input (plus optional '{LABELS}').")
        rows = {key: len(value) if value.ndim else 0 for key, value in arrays.items()}
        if len(set(rows.values())) != 1:
            raise CalibrationDataError(f"{where}: arrays have different numbers of rows: {rows}")
        checked = {name: self._check_input(name, arrays[name], where) for name in self.inputs}
        if LABELS in arrays:
            checked[LABELS] = self._check_labels(arrays[LABELS], where)
        return checked

    def _check_input(self, name: str, values: np.ndarray, where: str) -> np.ndarray:
        dtype, shape = self.inputs[name]
        if values.ndim != len(shape) or any(want is not None and got != want
                                            for got, want in zip(values.shape[1:], shape[1:])):
            expected = ["N"] + ["?" if d is None else d for d in shape[1:]]
            raise CalibrationDataError(f"{where}: input {name!r} has shape {list(values.shape)}, "
                                       f"the model expects {expected}")
        same_kind = np.issubdtype(values.dtype, np.floating) == np.issubdtype(dtype, np.floating) \
            and np.issubdtype(values.dtype, np.integer) == np.issubdtype(dtype, np.integer)
        if values.dtype != dtype and not same_kind:
            hint = f"e.g. array.astype('{dtype}')"
            if np.issubdtype(dtype, np.integer) and values.size and 0 <= values.min() and values.max() <= 1:
                hint = (f"its values lie in [0, 1], which astype would turn into 0s and 1s: if the model takes "
                        f"{dtype} pixels in [0, 255], (array * 255).round().astype('{dtype}')")
            raise CalibrationDataError(f"{where}: input {name!r} has dtype {values.dtype}, the model "
                                       f"expects {dtype}; convert it ({hint})")
        if np.issubdtype(dtype, np.integer) and values.dtype != dtype and values.size:
            low, high, limits = values.min(), values.max(), np.iinfo(dtype)
            if low < limits.min or high > limits.max:  # astype would wrap them around
                raise CalibrationDataError(f"{where}: input {name!r} holds values from {low} to {high}, outside "
                                           f"the range of {dtype} ({limits.min} to {limits.max}) the model takes; "
                                           "give the values the model expects")
        values = values.astype(dtype, copy=False)
        if np.issubdtype(dtype, np.floating) and not np.isfinite(values).all():
            bad = int((~np.isfinite(values.reshape(len(values), -1))).any(axis=1).sum())
            raise CalibrationDataError(f"{where}: input {name!r} has NaN or Inf values in {bad} "
                                       "row(s); remove or repair those rows")
        return values

    def _check_labels(self, labels: np.ndarray, where: str) -> np.ndarray:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise CalibrationDataError(f"{where}: '{LABELS}' must be a 1-D integer array of class "
                                       f"indices, got {labels.dtype} with shape {list(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise CalibrationDataError(f"{where}: '{LABELS}' must lie in [0, {self.num_classes}), "
                                       f"got values from {labels.min()} to {labels.max()}")
        return labels.astype(np.int64)


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensors
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def iter_batches(calibration: Mapping[str, Any] | Iterable[Mapping[str, Any]], spec: CalibrationSpec,
                 batch_size: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """Validated batches of at most ``batch_size`` rows from a mapping or an iterable of mappings."""
    if isinstance(calibration, Mapping):
        checked = spec.check(calibration, "calibration data")
        rows = len(next(iter(checked.values())))
        for start in range(0, rows, batch_size):
            yield {key: value[start:start + batch_size] for key, value in checked.items()}
        return
    for number, batch in enumerate(calibration):
        if not isinstance(batch, Mapping):
            raise CalibrationDataError(f"calibration batch {number} is a {type(batch).__name__}; "
                                       "each batch must be a dict of input name -> array")
        yield spec.check(batch, f"calibration batch {number}")
