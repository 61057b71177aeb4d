"""ActivationFrame: multi-dimensional columns, Arrow round trip, row selection."""
from __future__ import annotations

import numpy as np
import pytest

from moco_compile import ActivationFrame, load_frame
from moco_compile.frame import FrameWriter


def test_round_trip_keeps_shapes_and_values(tmp_path, calibration):
    images = calibration["images"][:50]
    frame = ActivationFrame.from_arrays({"images": images, "pooled": images.mean(axis=(2, 3)),
                                         "labels": calibration["labels"][:50]})
    frame.save(tmp_path / "f.arrow")
    loaded = load_frame(tmp_path / "f.arrow")
    assert len(loaded) == 50 and loaded.columns == ["images", "pooled", "labels"]
    assert loaded.row_shape("images") == (1, 28, 28)
    np.testing.assert_array_equal(loaded["images"], images)
    np.testing.assert_array_equal(loaded["labels"], calibration["labels"][:50])
    subset = loaded[[3, 7]]
    np.testing.assert_array_equal(subset["images"], images[[3, 7]])
    assert list(loaded.to_pandas().columns) == ["labels"]


def test_streamed_batches_read_back_in_order(tmp_path):
    with FrameWriter(tmp_path / "s.arrow") as writer:
        for start in range(0, 30, 10):
            writer.write({"x": np.arange(start, start + 10, dtype=np.float32)[:, None].repeat(3, 1)})
    frame = load_frame(tmp_path / "s.arrow")
    np.testing.assert_array_equal(frame["x"][:, 0], np.arange(30))
    assert [len(part) for part in frame.iter_batches(rows=12)] == [12, 12, 6]


def test_unknown_column_lists_the_existing_ones():
    frame = ActivationFrame.from_arrays({"a": np.zeros(3), "b": np.zeros((3, 2))})
    with pytest.raises(KeyError, match="its columns are: a, b"):
        frame["c"]


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with FrameWriter(tmp_path / "broken.arrow") as writer:
            writer.write({"x": np.zeros((4, 2), np.float32)})
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_calibrate_frame_writes_and_overwrites_a_frame(tmp_path, reference_onnx, calibration):
    from moco_compile import calibrate_frame

    path = tmp_path / "frame.arrow"
    calibrate_frame(reference_onnx, {k: v[:100] for k, v in calibration.items()}, path, show_progress=False)
    sample = {k: v[100:400] for k, v in calibration.items()}
    frame = calibrate_frame(reference_onnx, sample, path, raw=True, show_progress=False, force=True)  # replaces it
    loaded = load_frame(path)
    assert len(loaded) == 300 and loaded.row_shape("layer1.0:raw") == (16, 28, 28)
    np.testing.assert_array_equal(loaded["labels"], sample["labels"])
    assert {"layer1.0", "layer1.0:max", "layer1.0:grid", "predictions", "labels"} <= set(loaded.columns)
    np.testing.assert_allclose(loaded["layer1.0"], loaded["layer1.0:raw"].mean(axis=(2, 3)), atol=1e-5)
    assert frame.columns == loaded.columns


def test_frame_from_a_dict_of_arrays_round_trips(tmp_path):
    """``ActivationFrame({...})`` takes column name -> array (rows on axis 0), as ``pandas.DataFrame`` does."""
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    labels = np.array([3, 1, 4, 1])
    frame = ActivationFrame({"features": features, "labels": labels})
    assert len(frame) == 4 and frame.columns == ["features", "labels"] and frame.row_shape("features") == (3,)
    loaded = load_frame(frame.save(tmp_path / "d.arrow"))
    np.testing.assert_array_equal(loaded["features"], features)
    np.testing.assert_array_equal(loaded["labels"], labels)
    assert loaded.row_shape("features") == (3,) and loaded.row_shape("labels") == ()


def test_frame_from_a_dict_names_columns_of_different_lengths():
    with pytest.raises(ValueError, match=r"different row counts \('features' has 4, 'labels' has 3\)"):
        ActivationFrame({"features": np.zeros((4, 3)), "labels": np.zeros(3)})


@pytest.mark.parametrize("value", [3.0, "abc", None, [[1], [1, 2]]])
def test_frame_from_a_dict_rejects_values_that_are_not_arrays(value):
    with pytest.raises(TypeError, match="column 'x' is not an array with one entry per row"):
        ActivationFrame({"x": value})


def test_frame_rejects_what_is_neither_a_mapping_nor_a_table():
    with pytest.raises(TypeError, match="mapping of column name to numpy array"):
        ActivationFrame([np.zeros(3)])
