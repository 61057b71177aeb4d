"""The Ray engine: calibration and shadow evaluation of sharded data on a Ray cluster (``--engine ray``).

Ray Data maps an actor pool over the shard list (``map_batches`` of a callable class, one
shard per call, :class:`ShardMapper`).  A calibrating actor holds ONE onnxruntime session, the
same :class:`~moco_compile.passes.calibration.calibrate.FeatureProbe` the single-process path uses; a
shadow-evaluating actor the original and the compiled model's sessions, run by the same
:func:`~moco_compile.runtime.shadow.shadow_run`.  Each reads its shard in batches and writes the
shard's ActivationFrame (``part-<index>.arrow``, atomically) into a directory the driver can
read (on a multi-machine cluster: storage every node and the driver share).  The driver only
sees shard names and row counts, so its memory does not grow with the data; the frame shards,
read in shard order, are exactly the frame the single-process path writes for the same rows.

A worker that dies is restarted and its shard retried: Ray Data's actor pools default to
``max_restarts=-1`` and ``max_task_retries=-1`` (Ray 2.60 deprecates setting them per call).  So
that a shard which kills its worker every time does not retry forever, each start of a shard
claims an attempt marker beside its frame file (``.part-<index>.arrow.attempt-<n>``, created
exclusively, so it counts across restarted actors); past ``ShardedData.max_attempts`` the shard
is not run again but reported, and the driver fails naming it.  An exception a worker raises is
not retried but reported.  A retried shard is rewritten whole (the frame file appears under its
name only when complete), so no partial shard is ever read.

Planning's counts (:func:`count_on_ray`): one Ray task per frame shard runs the planner's
:class:`~moco_compile.passes.planning.pipeline.RowCounter` over its rows, chunk by chunk; the driver sums
the counts as they arrive (a few integers per plan), so it never holds a shard's rows.  Ray is
imported only here.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow.fs as pafs
import ray
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moco_compile import errors
from moco_compile.calibration_data import CalibrationSpec
from moco_compile.constants import LABELS
from moco_compile.errors import CalibrationDataError, MocoError
from moco_compile.frame import FrameWriter, load_frame
from moco_compile.passes.calibration.calibrate import FeatureProbe
from moco_compile.passes.graph.cut_points import CutPoint
from moco_compile.passes.planning.pipeline import Counts, RowCounter, add_counts
from moco_compile.runtime.session import ExitSession
from moco_compile.runtime.shadow import shadow_run
from moco_compile.scale.shards import ShardedData, read_shard

log = logging.getLogger(__name__)


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or the running one; else start a local one on this machine's CPUs).

    An unreachable address is a :class:`MocoError` saying how to start or find the cluster.
    """
    where = "a local Ray cluster" if address is None else f"the Ray cluster at {address}"
    try:
        if address is not None:
            _check_reachable(address)
        if ray.is_initialized():
            return
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (OSError, RuntimeError, ValueError) as error:
        raise MocoError(f"cannot reach {where} ({error}); start one with 'ray start --head' and pass "
                        "its address (host:port, or 'auto' on a node of the cluster) as --ray-address") from error


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at a ``host:port`` address (``ray.init`` retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        socket.create_connection((host, int(port)), timeout=timeout).close()


class ShardMapper:
    """Ray Data actor: each call maps whole shards, batch by batch, into one frame file per shard.

    Subclasses say what a batch becomes (:meth:`columns`); their sessions are made once per actor.
    """

    def __init__(self, spec: CalibrationSpec, filesystem: pafs.FileSystem, out_dir: str, batch_size: int,
                 max_attempts: int) -> None:
        self.spec, self.filesystem, self.out_dir, self.batch_size = spec, filesystem, Path(out_dir), batch_size
        self.max_attempts = max_attempts

    def columns(self, batch: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        """The frame columns of one validated batch."""
        raise NotImplementedError

    def __call__(self, shards: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``shards``: ``index`` and ``path`` columns; returns each shard's frame file and row count, or
        the problem with the shard (a :class:`MocoError`'s class and message: Ray does not carry the
        exception object itself back to the driver)."""
        files, rows, errors = [], [], []
        for index, path in zip(shards["index"], shards["path"]):
            target = self.out_dir / shard_frame_name(int(index))
            try:
                self._claim_attempt(target, str(path))
                rows.append(self._map(str(path), target))
                errors.append("")
            except MocoError as error:
                rows.append(0)
                errors.append(f"{type(error).__name__}:{error}")
            files.append(str(target))
        return {"index": shards["index"], "frame": np.array(files), "rows": np.array(rows, np.int64),
                "error": np.array(errors)}

    def _claim_attempt(self, target: Path, path: str) -> None:
        """Count this start of the shard (a marker file per start, beside its frame file); a
        :class:`MocoError` instead when its worker died on every one of ``max_attempts`` starts."""
        for attempt in itertools.count(1):
            marker = target.with_name(f".{target.name}.attempt-{attempt}")
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            if attempt > self.max_attempts:
                raise MocoError(_died_message(path, self.max_attempts))
            return

    def _map(self, path: str, target: Path) -> int:
        count = 0
        with FrameWriter(target) as writer:
            for number, batch in enumerate(read_shard(self.filesystem, path, self.spec, self.batch_size)):
                columns = self.columns(batch, f"shard {path}, batch {number}")
                writer.write(columns)
                count += len(next(iter(columns.values())))
            if not count:
                raise CalibrationDataError(f"shard {path} has no rows; remove it or fill it")
        return count


class ShardCalibrator(ShardMapper):
    """Calibration: one onnxruntime session over the probe model (pooled cut features, predictions)."""

    def __init__(self, model: bytes, output: str, cuts: Sequence[CutPoint], threads: int, **shards: Any) -> None:
        super().__init__(**shards)
        self.probe = FeatureProbe(onnx.load_from_string(model), output, cuts, threads=threads)

    def columns(self, batch: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        return self.probe(batch, where)


class ShardShadow(ShardMapper):
    """Shadow evaluation: the original and the compiled model side by side, per row their classes,
    the exit taken and each model's share of its batch's seconds."""

    def __init__(self, original: bytes, compiled: bytes, output: str, providers: Sequence[str] | None,
                 threads: int, classes: Callable[[np.ndarray], np.ndarray] | None = None, **shards: Any) -> None:
        super().__init__(**shards)
        self.original, self.compiled = (ExitSession(onnx.load_from_string(model), providers, threads)
                                        for model in (original, compiled))
        self.output, self.classes = output, classes

    def columns(self, batch: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        run = shadow_run(self.original, self.compiled, [batch], self.output, classes=self.classes)
        columns = {"original": run.original_classes, "compiled": run.compiled_classes, "exits": run.exits,
                   "original_seconds": np.full(run.rows, run.original_seconds / run.rows),
                   "compiled_seconds": np.full(run.rows, run.compiled_seconds / run.rows)}
        if LABELS in batch:
            columns[LABELS] = batch[LABELS]
        return columns


def _died_message(shard: str, attempts: int) -> str:
    return (f"the Ray worker processing shard {shard} died on each of its {attempts} attempts (killed: out of "
            "memory, or a crash in onnxruntime?); run that shard alone to see why (e.g. convert it to .npz and "
            "`moco calibrate MODEL --calib SHARD.npz --out frame.arrow`), give the workers more memory, or "
            "move the shard out of the data")


def shard_frame_name(index: int) -> str:
    """File name of the frame of shard ``index`` (sorts in shard order)."""
    return f"part-{index:06d}.arrow"


def calibrate_on_ray(model: onnx.ModelProto, output: str, cuts: Sequence[CutPoint], spec: CalibrationSpec,
                     data: ShardedData, filesystem: pafs.FileSystem, shards: Sequence[str], out_dir: Path, *,
                     batch_size: int = 256, show_progress: bool = True,
                     calibrator: type[ShardCalibrator] = ShardCalibrator) -> list[Path]:
    """Calibrate every shard on the cluster; return the frame files in shard order.

    ``calibrator``: the actor class (a subclass may add behaviour, e.g. a test's failure).
    """
    arguments = dict(model=model.SerializeToString(), output=output, cuts=list(cuts),
                     threads=max(1, round(data.cpus_per_worker)))
    return map_shards(calibrator, arguments, spec, data, filesystem, shards, out_dir, batch_size,
                      "calibrating on Ray", show_progress)


def shadow_on_ray(original: onnx.ModelProto, compiled: onnx.ModelProto, output: str, spec: CalibrationSpec,
                  data: ShardedData, filesystem: pafs.FileSystem, shards: Sequence[str], out_dir: Path, *,
                  providers: Sequence[str] | None = None, batch_size: int = 64, show_progress: bool = True,
                  classes: Callable[[np.ndarray], np.ndarray] | None = None) -> list[Path]:
    """Shadow-run every shard through both models on the cluster; return the per-row files in shard order.
    ``classes``: as :func:`~moco_compile.runtime.shadow.shadow_run`'s."""
    arguments = dict(original=original.SerializeToString(), compiled=compiled.SerializeToString(), output=output,
                     providers=providers, threads=max(1, round(data.cpus_per_worker)), classes=classes)
    return map_shards(ShardShadow, arguments, spec, data, filesystem, shards, out_dir, batch_size,
                      "shadow run on Ray", show_progress)


def map_shards(mapper: type[ShardMapper], arguments: dict, spec: CalibrationSpec, data: ShardedData,
               filesystem: pafs.FileSystem, shards: Sequence[str], out_dir: Path, batch_size: int,
               description: str, show_progress: bool) -> list[Path]:
    """Run ``mapper`` actors over every shard; return the frame files in shard order.

    Progress (shards done, rows) is shown on the driver while the cluster works.
    """
    connect(data.address)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = ray.data.from_items([{"index": index, "path": path} for index, path in enumerate(shards)],
                                  override_num_blocks=len(shards))
    frames = dataset.map_batches(
        mapper, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(data.workers, len(shards))),
        num_cpus=data.cpus_per_worker,
        fn_constructor_kwargs=dict(arguments, spec=spec, filesystem=filesystem, out_dir=str(out_dir),
                                   batch_size=batch_size, max_attempts=data.max_attempts))
    done: dict[int, Path] = {}
    total_rows = 0
    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                  TextColumn("{task.fields[rows]:,} rows"), TimeElapsedColumn(),
                  disable=not show_progress, transient=True) as progress:
        task = progress.add_task("shards", total=len(shards), rows=0)
        try:
            for row in frames.iter_rows():
                if str(row["error"]):
                    kind, _, message = str(row["error"]).partition(":")
                    raise getattr(errors, kind, MocoError)(message)
                done[int(row["index"])] = Path(str(row["frame"]))
                total_rows += int(row["rows"])
                progress.update(task, completed=len(done), rows=total_rows)
        except ray.exceptions.RayError as error:
            raise MocoError(f"{description} failed: {error}") from error
    log.info("%s: %d rows in %d shards", description, total_rows, len(shards))
    return [done[index] for index in range(len(shards))]


def count_on_ray(counter: RowCounter, jobs: Sequence[tuple[str, np.ndarray | None, int]], data: ShardedData,
                 show_progress: bool = True) -> Counts:
    """``counter``'s counts over every job's rows, summed; one Ray task per job.

    A job is ``(frame shard path, rows of it to count or None for all, position of its first row
    among the planning rows)``.  A task whose worker dies is retried, ``data.max_attempts`` starts
    in all; then the run fails naming the shard.
    """
    connect(data.address)
    count = ray.remote(num_cpus=data.cpus_per_worker, max_retries=data.max_attempts - 1)(_count_shard)
    shared = ray.put(counter)
    pending = {count.remote(shared, *job): job[0] for job in jobs}
    total: Counts | None = None
    with Progress(TextColumn("counting plans on Ray"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                  TimeElapsedColumn(), disable=not show_progress, transient=True) as progress:
        task = progress.add_task("shards", total=len(jobs))
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            shard = pending.pop(done)
            try:
                counts = ray.get(done)
            except ray.exceptions.RayTaskError as error:
                if isinstance(error.cause, MocoError):
                    raise error.cause from None
                raise MocoError(f"counting plans on shard {shard} failed: {error}") from error
            except ray.exceptions.RayError as error:
                raise MocoError(f"{_died_message(shard, data.max_attempts)} ({type(error).__name__})") from error
            total = counts if total is None else add_counts(total, counts)
            progress.advance(task)
    return total


def _count_shard(counter: RowCounter, path: str, rows: np.ndarray | None, start: int) -> Counts:
    """On a worker: ``counter`` over a frame shard's ``rows`` (all when None), memory-mapped, chunk by chunk."""
    frame = load_frame(path)
    return counter.count(frame if rows is None else frame.take(rows), start)
