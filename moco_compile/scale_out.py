"""Compile and evaluate on sharded data: the driver's side of ``--engine ray``.

Compile: the driver lists the shards, reads the first rows (at most ``MAX_VERIFIED_ROWS``: the
cut points are measured on them and the compiled graph is verified on them), has the cluster
calibrate every shard (:mod:`moco_compile.ray_engine`), and opens the frame shards in shard
order as the frame the planner reads, the same frame the single-process path computes.

Evaluate: the cluster shadow-runs every shard through the original and the compiled model; the
driver reads back per row the two classes and the exit (the drift windows need the stream).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx

from moco_compile.api import MAX_VERIFIED_ROWS, calibration_spec, cut_points_of
from moco_compile.calibration import CalibrationSpec
from moco_compile.errors import CalibrationDataError, MocoError
from moco_compile.frame import ActivationFrame, load_frame, load_frames
from moco_compile.importer import ImportedModel
from moco_compile.passes.calibrate import LABELS
from moco_compile.passes.cut_points import CutPoint
from moco_compile.runtime.shadow import ShadowRun
from moco_compile.shards import ShardedData, list_shards, read_shard

RAY_INSTALL = "pip install 'moco-compile[ray]'"
log = logging.getLogger(__name__)


def ray_engine() -> ModuleType:
    """:mod:`moco_compile.ray_engine`, or a :class:`MocoError` saying how to install Ray."""
    try:
        from moco_compile import ray_engine
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "ray":
            raise
        raise MocoError(f"--engine ray needs Ray, which is not installed: {RAY_INSTALL}") from error
    return ray_engine


def calibrate_sharded(imported: ImportedModel, data: ShardedData, scratch: Path, batch_size: int,
                      show_progress: bool) -> tuple[ActivationFrame, list[CutPoint], dict[str, np.ndarray]]:
    """Calibrate ``data`` on Ray: the frame (in memory), the cuts, and the inputs kept for verification."""
    engine = ray_engine()
    filesystem, shards = list_shards(data.source)
    spec = calibration_spec(imported)
    verified = MAX_VERIFIED_ROWS if data.max_rows is None else min(MAX_VERIFIED_ROWS, data.max_rows // 2)
    head = _head(filesystem, shards, spec, batch_size, verified)
    _, cuts = cut_points_of(imported, head, batch_size)
    paths = engine.calibrate_on_ray(imported.model, imported.output, cuts, spec, data, filesystem, shards,
                                    scratch / "frames", batch_size=batch_size, show_progress=show_progress)
    total = sum(len(load_frame(path)) for path in paths)  # file metadata only
    rows = None
    if data.max_rows is not None and total > data.max_rows:
        log.info("planning on %d of %d calibrated rows (max_rows)", data.max_rows, total)
        rows = planning_rows(total, verified, data.max_rows, data.seed)
    try:
        frame = load_frames(paths, rows).in_memory()  # memory-mapped: only these rows are read
    except ValueError as error:
        raise CalibrationDataError(str(error)) from error
    return frame, cuts, {name: head[name][:verified] for name in imported.input_names}


def planning_rows(total: int, first: int, limit: int, seed: int) -> np.ndarray:
    """``limit`` sorted row indices out of ``total``: the ``first`` rows (they verify the compiled
    graph) and a ``seed``-ed uniform sample without replacement of the others."""
    rest = np.random.default_rng(seed).choice(total - first, size=limit - first, replace=False) + first
    return np.concatenate([np.arange(first), np.sort(rest)])


def shadow_sharded(original: Path, compiled: Path, output: str, spec: CalibrationSpec, data: ShardedData,
                   providers: list[str] | None, batch_size: int,
                   show_progress: bool) -> tuple[ShadowRun, np.ndarray | None]:
    """Shadow-run the traffic shards on Ray; the run in shard order, and the labels if the shards have them."""
    engine = ray_engine()
    filesystem, shards = list_shards(data.source)
    _head(filesystem, shards, spec, batch_size, 1)  # wrong columns fail here, before the cluster starts
    with tempfile.TemporaryDirectory(prefix="moco-") as scratch:
        paths = engine.shadow_on_ray(onnx.load(str(original)), onnx.load(str(compiled)), output, spec, data,
                                     filesystem, shards, Path(scratch), providers=providers,
                                     batch_size=batch_size, show_progress=show_progress)
        try:
            frame = load_frames(paths).in_memory()
        except ValueError as error:
            raise CalibrationDataError(str(error)) from error
    run = ShadowRun(frame["original"], frame["compiled"], frame["exits"], float(frame["original_seconds"].sum()),
                    float(frame["compiled_seconds"].sum()))
    return run, frame[LABELS] if LABELS in frame else None


def _head(filesystem, shards: list[str], spec: CalibrationSpec, batch_size: int,
          limit: int) -> dict[str, np.ndarray]:
    """The first ``limit`` rows of the sharded data, read on the driver."""
    parts: list[dict[str, np.ndarray]] = []
    rows = 0
    for path in shards:
        for batch in read_shard(filesystem, path, spec, batch_size):
            take = min(limit - rows, len(next(iter(batch.values()))))
            parts.append({key: values[:take] for key, values in batch.items()})
            rows += take
            if rows >= limit:
                break
        if rows >= limit:
            break
    if not rows:
        raise CalibrationDataError("the sharded calibration data has no rows")
    keys = set.intersection(*(set(part) for part in parts))
    return {key: np.concatenate([part[key] for part in parts]) for key in keys}
