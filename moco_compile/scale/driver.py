"""Compile and evaluate on sharded data: the driver's side of ``--engine ray``.

Compile: the driver lists the shards, reads the first rows (at most ``MAX_VERIFIED_ROWS``: the
cut points are measured on them and the compiled graph is verified on them), has the cluster
calibrate every shard (:mod:`moco_compile.scale.ray_engine`), and hands the planner the frame shards
in shard order as :class:`ShardedRows`: the rows the single-process path plans on, split the
same way.  The driver reads only the rules rows (at most ``PlannerConfig.max_design_rows``) and
the first rows; the cluster counts what each plan does on the test and report rows, shard by
shard, and the driver sums those counts (a few integers per plan), so its memory does not grow
with the data.

Evaluate: the cluster shadow-runs every shard through the original and the compiled model; the
driver reads back per row the two classes and the exit (the drift windows need the stream).
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx

from moco_compile.calibration_data import CalibrationSpec
from moco_compile.constants import LABELS, SPLIT_COLUMN
from moco_compile.errors import CalibrationDataError, MocoError
from moco_compile.frame import ActivationFrame, check_same_columns, load_frame, load_frames
from moco_compile.importer import ImportedModel
from moco_compile.passes.graph.cut_points import CutPoint
from moco_compile.passes.planning.pipeline import Counts, RowCounter
from moco_compile.passes.planning.splits import RowSplit
from moco_compile.prepare import MAX_VERIFIED_ROWS, calibration_spec, cut_points_of
from moco_compile.runtime.shadow import ShadowRun
from moco_compile.scale.shards import ShardedData, list_shards, read_shard

RAY_INSTALL = "pip install 'moco-compile[ray]'"
log = logging.getLogger(__name__)


def ray_engine() -> ModuleType:
    """:mod:`moco_compile.scale.ray_engine`, or a :class:`MocoError` saying how to install Ray."""
    try:
        from moco_compile.scale import ray_engine
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "ray":
            raise
        raise MocoError(f"--engine ray needs Ray, which is not installed: {RAY_INSTALL}") from error
    return ray_engine


def calibrate_sharded(imported: ImportedModel, data: ShardedData, scratch: Path, batch_size: int,
                      show_progress: bool) -> tuple["ShardedRows", list[CutPoint], dict[str, np.ndarray]]:
    """Calibrate ``data`` on Ray into frame shards under ``scratch``: the rows to plan on, the cuts,
    and the inputs kept for verification."""
    engine = ray_engine()
    filesystem, shards = list_shards(data.source)
    spec = calibration_spec(imported)
    verified = MAX_VERIFIED_ROWS if data.max_rows is None else min(MAX_VERIFIED_ROWS, data.max_rows // 2)
    head = _head(filesystem, shards, spec, batch_size, verified)
    _, cuts = cut_points_of(imported, head, batch_size)
    paths = engine.calibrate_on_ray(imported.model, imported.output, cuts, spec, data, filesystem, shards,
                                    scratch / "frames", batch_size=batch_size, show_progress=show_progress)
    kept = {name: head[name][:verified] for name in imported.input_names}
    return ShardedRows(paths, data, verified, show_progress), cuts, kept


class ShardedRows:
    """Calibrated rows in frame shards (one per data shard, in shard order), as the planner reads
    them (:class:`~moco_compile.passes.planning.pipeline.PlanningRows`): a few rows read on the driver, counts
    over every row made on the cluster.

    With ``data.max_rows`` below the calibrated rows, planning reads a sample of them
    (:func:`planning_rows`, keeping the ``first`` rows): ``sample`` holds their sorted indices,
    and row ``p`` of the planning rows is calibrated row ``sample[p]`` (None: every row).
    """

    def __init__(self, paths: list[Path], data: ShardedData, first: int, show_progress: bool = False) -> None:
        self.paths, self.data, self.show_progress = paths, data, show_progress
        lengths, columns = [], set()
        for path in paths:  # memory-mapped one at a time: file metadata only
            frame = load_frame(path)
            lengths.append(len(frame))
            columns.add(tuple(frame.columns))
        try:
            check_same_columns(columns)
        except ValueError as error:
            raise CalibrationDataError(str(error)) from None
        self.starts = np.cumsum([0] + lengths)
        self.labelled = LABELS in frame
        self.sample = None
        if data.max_rows is not None and self.calibrated > data.max_rows:
            log.info("planning on %d of %d calibrated rows (max_rows)", data.max_rows, self.calibrated)
            self.sample = planning_rows(self.calibrated, first, data.max_rows, data.seed)

    @property
    def calibrated(self) -> int:
        """Rows in the frame shards."""
        return int(self.starts[-1])

    def __len__(self) -> int:
        return self.calibrated if self.sample is None else len(self.sample)

    def read(self, positions: np.ndarray) -> ActivationFrame:
        """The planning rows at sorted ``positions``, read from the shards into memory."""
        rows = positions if self.sample is None else self.sample[positions]
        return load_frames(self.paths, rows)  # taken shard by shard: in memory, no shard left mapped

    def count(self, counter: RowCounter) -> Counts:
        """``counter`` over every planning row, one task per frame shard on the cluster."""
        jobs = []
        for path, low, high in zip(self.paths, self.starts[:-1], self.starts[1:]):
            if self.sample is None:
                jobs.append((str(path), None, int(low)))
                continue
            first, last = np.searchsorted(self.sample, [low, high])
            if last > first:
                jobs.append((str(path), self.sample[first:last] - low, int(first)))
        return ray_engine().count_on_ray(counter, jobs, self.data, self.show_progress)

    def kept_frame(self, split: RowSplit, first: int) -> ActivationFrame:
        """The first rows and the rules rows (the rows the driver read), with their split."""
        positions = np.union1d(np.arange(first), split.positions("rules"))
        return self.read(positions).with_column(SPLIT_COLUMN, split.labels_at(positions))


def planning_rows(total: int, first: int, limit: int, seed: int) -> np.ndarray:
    """``limit`` sorted row indices out of ``total``: the ``first`` rows (they verify the compiled
    graph) and a ``seed``-ed uniform sample without replacement of the others."""
    rest = np.random.default_rng(seed).choice(total - first, size=limit - first, replace=False) + first
    return np.concatenate([np.arange(first), np.sort(rest)])


def shadow_sharded(original: Path | onnx.ModelProto, compiled: Path, output: str, spec: CalibrationSpec,
                   data: ShardedData, providers: list[str] | None, batch_size: int, show_progress: bool,
                   classes: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[ShadowRun, np.ndarray | None]:
    """Shadow-run the traffic shards on Ray; the run in shard order, and the labels if the shards have them.
    ``classes``: as :func:`~moco_compile.runtime.shadow.shadow_run`'s."""
    engine = ray_engine()
    filesystem, shards = list_shards(data.source)
    _head(filesystem, shards, spec, batch_size, 1)  # wrong columns fail here, before the cluster starts
    with tempfile.TemporaryDirectory(prefix="moco-") as scratch:
        original = original if isinstance(original, onnx.ModelProto) else onnx.load(str(original))
        paths = engine.shadow_on_ray(original, onnx.load(str(compiled)), output, spec, data,
                                     filesystem, shards, Path(scratch), providers=providers,
                                     batch_size=batch_size, show_progress=show_progress, classes=classes)
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
