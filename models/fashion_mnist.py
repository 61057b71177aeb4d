"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (idx files).

``apt-get install dataset-fashion-mnist`` puts the files in
``/usr/share/datasets/fashion-mnist``.  Images come back as float32 in [0, 1]
with shape ``[N, 1, 28, 28]``, labels as int64.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CALIBRATION_HOLDOUT = 10_000
SPLIT_SEED = 0


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header_bytes)


def load_split(split: str, root: Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of the official ``"train"`` or ``"test"`` split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(
            f"{images_path} not found: install Debian's package with "
            "'apt-get install dataset-fashion-mnist'"
        )
    images = _read_idx(images_path, 16).reshape(-1, 1, 28, 28)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
    return (images.astype(np.float32) / 255.0), labels


def train_and_calibration_splits(root: Path = DEFAULT_ROOT):
    """Split the official training set into (training, calibration) parts.

    The calibration part (10,000 rows, fixed seed) is never used for training,
    so the compiler sees the network's behaviour on unseen data.
    """
    images, labels = load_split("train", root)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    calibration, train = order[:CALIBRATION_HOLDOUT], order[CALIBRATION_HOLDOUT:]
    return (images[train], labels[train]), (images[calibration], labels[calibration])
