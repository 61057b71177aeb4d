"""Checking and pooling what the analytics engine is given: embeddings, per-row targets, pooling."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from moco_compile.analytics.results import AnalyticsError
from moco_compile.constants import PREDICTIONS

POOLINGS = ("mean", "max", "flatten")


def pool_features(values: np.ndarray, pooling: str = "mean", channel_axis: int | None = None,
                  name: str = "embedding") -> np.ndarray:
    """``[N, D]`` features from an array of any rank (row axis first); see :meth:`AnalyticsEngine.from_frame`."""
    values = np.asarray(values)
    if pooling not in POOLINGS:
        raise AnalyticsError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if values.ndim == 0:
        raise AnalyticsError(f"{name!r} is a scalar, not one row per input")
    if values.ndim <= 2:
        return values.reshape(len(values), -1)
    if pooling == "flatten":
        return values.reshape(len(values), -1)
    if channel_axis is None:
        channel_axis = -1 if values.ndim == 3 else 1
    if not -values.ndim < channel_axis < values.ndim or channel_axis % values.ndim == 0:
        raise AnalyticsError(f"channel_axis {channel_axis} is not a feature axis of {name!r} with shape "
                             f"{values.shape}; use 1..{values.ndim - 1} (axis 0 holds the rows)")
    channel_axis %= values.ndim
    axes = tuple(a for a in range(1, values.ndim) if a != channel_axis)
    reduce = np.mean if pooling == "mean" else np.max
    return reduce(values, axis=axes)


def check_embedding(embedding: np.ndarray, name: str) -> np.ndarray:
    try:
        array = np.asarray(embedding)
    except (TypeError, ValueError) as error:
        raise AnalyticsError(f"embedding {name!r} is not an array: {error}") from error
    if array.ndim != 2:
        raise AnalyticsError(f"embedding {name!r} must be [N, D] (one row per input); got shape {array.shape}. "
                             "Reshape or pool it first, or use AnalyticsEngine.from_frame(..., pooling=...)")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise AnalyticsError(f"embedding {name!r} must hold real numbers, got dtype {array.dtype}")
    if len(array) < 2 or array.shape[1] < 1:
        raise AnalyticsError(f"embedding {name!r} has shape {array.shape}; it needs at least 2 rows and 1 feature")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).sum())
        raise AnalyticsError(f"embedding {name!r} contains NaN or Inf in {bad} of {len(array)} rows; "
                             "check the model's activations there, or drop those rows")
    return array


def check_targets(targets: Mapping[str, np.ndarray], rows: int, name: str) -> dict[str, np.ndarray]:
    if not isinstance(targets, Mapping):
        raise AnalyticsError(f"targets must be a dict {{name: [N] class ids}}, e.g. {{'{PREDICTIONS}': preds}}; "
                             f"got {type(targets).__name__}")
    checked = {}
    for key, values in targets.items():
        values = np.asarray(values)
        if values.ndim != 1:
            raise AnalyticsError(f"target {key!r} must be one class id per row ([N]); got shape {values.shape}. "
                                 "For logits or probabilities pass their argmax")
        if len(values) != rows:
            raise AnalyticsError(f"row counts differ: embedding {name!r} has {rows} rows but target {key!r} has "
                                 f"{len(values)}; pass targets for the same rows, in the same order")
        if values.dtype == bool:
            values = values.astype(np.int64)
        if np.issubdtype(values.dtype, np.floating):
            if not (np.isfinite(values).all() and (values == np.round(values)).all()):
                raise AnalyticsError(f"target {key!r} must hold integer class ids, got non-integer values")
            values = values.astype(np.int64)
        if not np.issubdtype(values.dtype, np.integer):
            raise AnalyticsError(f"target {key!r} must hold integer class ids 0..C-1, got dtype {values.dtype}; "
                                 "encode the classes as integers first")
        if len(values) and values.min() < 0:
            raise AnalyticsError(f"target {key!r} has negative class ids (min {values.min()}); "
                                 "class ids must be 0..C-1")
        checked[str(key)] = values.astype(np.int64, copy=False)
    return checked
