"""Shared fixtures: the shipped reference CNN, its calibration data, and one compile of it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "models" / "artifacts"
REFERENCE_ONNX = ARTIFACTS / "fashion_resnet.onnx"
CALIBRATION_NPZ = ARTIFACTS / "fashion_calib.npz"
COMPILE_ROWS = 4000


@pytest.fixture(scope="session")
def reference_onnx() -> Path:
    return REFERENCE_ONNX


@pytest.fixture(scope="session")
def reference_model() -> onnx.ModelProto:
    return onnx.load(str(REFERENCE_ONNX))


@pytest.fixture(scope="session")
def calibration() -> dict[str, np.ndarray]:
    """The first rows of the shipped calibration set (images the network never trained on)."""
    with np.load(CALIBRATION_NPZ) as data:
        return {"images": data["images"][:COMPILE_ROWS], "labels": data["labels"][:COMPILE_ROWS]}


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, calibration):
    """One compile of the reference CNN at the default budget, written to disk."""
    from moco_compile import compile

    out = tmp_path_factory.mktemp("compiled") / "out"
    result = compile(REFERENCE_ONNX, calibration, out_dir=out, measure_latency=False, show_progress=False)
    return result, out


@pytest.fixture(scope="session")
def plan_split():
    """``plan_split(result, name)``: a compile's calibration split ``name`` as a ``passes.plan.Split``."""
    return _plan_split


def _plan_split(result, name: str, shuffle_predictions: bool = False):
    from moco_compile.api import SPLITS
    from moco_compile.passes.calibrate import variant_features
    from moco_compile.passes.plan import Split

    rows = result.frame[result.frame["split"] == SPLITS.index(name)]
    predictions = rows["predictions"]
    if shuffle_predictions:
        predictions = np.random.default_rng(0).permutation(predictions)
    return Split([e.scores(variant_features(rows, e.column, e.pooling)) for e in result.plan.exits], predictions)
