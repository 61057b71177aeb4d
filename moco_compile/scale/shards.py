"""Sharded calibration data: Parquet or NPZ files in a directory or matching a glob, on any
filesystem pyarrow supports (local paths, ``s3://``, ``gs://``, ``hdfs://``...).

Shards are listed in sorted order and each is read in batches, so the rows of the sharded
data come in one fixed order whichever engine reads them.  Nothing here imports Ray: the
Ray engine (:mod:`moco_compile.scale.ray_engine`) and the driver both read shards through it.

A Parquet shard has one column per model input (plus optional ``labels``); an input with
more than one axis per row is a list column holding the row flattened (row-major), reshaped
to the model's input shape on reading.  An NPZ shard is what ``moco compile --calib`` reads.
"""
from __future__ import annotations

import fnmatch
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moco_compile.calibration_data import CalibrationSpec
from moco_compile.constants import LABELS
from moco_compile.errors import CalibrationDataError, MocoError

SHARD_SUFFIXES = (".parquet", ".npz")


@dataclass(frozen=True)
class ShardedData:
    """Calibration (or traffic) data in shard files, processed on a Ray cluster.

    ``source``: a directory or a glob of ``.parquet`` / ``.npz`` files, local or a URI pyarrow
    understands.  ``address``: the Ray cluster to join (``None``: use the running one or start a
    local one).  ``workers``: actors, each with one onnxruntime session and ``cpus_per_worker``
    CPUs (fractional: whole-CPU actors deadlock behind read tasks on a small machine).
    ``max_rows``: compile plans and certifies on at most this many of the calibrated rows (the
    first rows, which verify the compiled graph, and a ``seed``-ed uniform sample of the rest);
    ``None``: every row (the single-process path's answer).  The driver's memory is bounded
    either way (it reads at most ``PlannerConfig.max_design_rows`` rules rows; the cluster counts
    the others).  ``max_attempts``: how many times a shard may be started on a worker that then
    dies (Ray restarts it) before the run fails naming that shard.
    """

    source: str
    address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 0.5
    max_rows: int | None = None
    seed: int = 0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        problems = [f"{name} must be {rule}, got {value}" for name, value, ok, rule in (
            ("workers (--ray-workers)", self.workers, self.workers >= 1, "at least 1"),
            ("cpus_per_worker", self.cpus_per_worker, self.cpus_per_worker > 0, "positive"),
            ("max_rows (--ray-max-rows)", self.max_rows, self.max_rows is None or self.max_rows >= 2,
             "at least 2"),
            ("max_attempts", self.max_attempts, self.max_attempts >= 1, "at least 1")) if not ok]
        if problems:
            raise MocoError("; ".join(problems))


def list_shards(source: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the sorted shard paths of ``source`` (a directory or a glob)."""
    try:
        filesystem, path = pafs.FileSystem.from_uri(source)
    except (pa.ArrowInvalid, ValueError):  # a relative path or a glob: absolute, for workers elsewhere
        filesystem, path = pafs.LocalFileSystem(), os.path.abspath(source)
    if not any(char in path for char in "*?["):
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            paths = [path]
        elif info.type == pafs.FileType.Directory:
            paths = _files_under(filesystem, path, "*")
        else:
            raise CalibrationDataError(f"{source} does not exist; give a directory or a glob of "
                                       f"{' or '.join(SHARD_SUFFIXES)} shard files")
    else:
        base = path[:min(path.index(char) for char in "*?[" if char in path)].rpartition("/")[0] or "."
        paths = _files_under(filesystem, base, path) if filesystem.get_file_info(base).type \
            == pafs.FileType.Directory else []
    shards = sorted(p for p in paths if p.endswith(SHARD_SUFFIXES))
    if not shards:
        raise CalibrationDataError(f"{source} holds no shard files (*{' or *'.join(SHARD_SUFFIXES)}); write the "
                                   "calibration data as Parquet (one column per model input, plus optional "
                                   f"'{LABELS}') or as .npz files, and point at their directory or a glob")
    return filesystem, shards


def _files_under(filesystem: pafs.FileSystem, base: str, pattern: str) -> list[str]:
    infos = filesystem.get_file_info(pafs.FileSelector(base, recursive="/" in pattern[len(base) + 1:]))
    return [info.path for info in infos if info.type == pafs.FileType.File
            and (pattern == "*" or fnmatch.fnmatch(info.path, pattern))]


def read_shard(filesystem: pafs.FileSystem, path: str, spec: CalibrationSpec,
               batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Validated batches of at most ``batch_size`` rows of one shard (errors name the shard)."""
    if path.endswith(".npz"):
        batches = _npz_batches(filesystem, path, batch_size)
    else:
        batches = _parquet_batches(filesystem, path, spec, batch_size)
    for number, batch in enumerate(batches):
        yield spec.check(batch, f"shard {path}, batch {number}")


def _npz_batches(filesystem: pafs.FileSystem, path: str, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    with filesystem.open_input_file(path) as stream:
        buffer = io.BytesIO(stream.read())
    try:
        with np.load(buffer, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as error:
        raise CalibrationDataError(f"cannot read shard {path} as an .npz archive ({error}); save it with "
                                   "numpy.savez(path, <input name>=array, ..., labels=array)") from error
    rows = max((len(values) for values in arrays.values() if values.ndim), default=0)
    for start in range(0, rows, batch_size):
        yield {key: values[start:start + batch_size] for key, values in arrays.items()}


def _parquet_batches(filesystem: pafs.FileSystem, path: str, spec: CalibrationSpec,
                     batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    try:
        parquet = pq.ParquetFile(filesystem.open_input_file(path))
    except (OSError, pa.ArrowException) as error:
        raise CalibrationDataError(f"cannot read shard {path} as Parquet ({error})") from error
    for batch in parquet.iter_batches(batch_size):
        yield {name: _column_array(batch.column(name), spec.inputs.get(name), f"shard {path}, column {name!r}")
               for name in batch.schema.names}


def _column_array(column: pa.Array, expected: tuple[np.dtype, tuple[int | None, ...]] | None,
                  where: str) -> np.ndarray:
    """A Parquet column as numpy: list columns flattened and reshaped to the input's row shape."""
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type) \
            and not pa.types.is_fixed_size_list(column.type):
        return column.to_numpy(zero_copy_only=False)
    values = column.flatten()
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False)
    row_shape = [-1] if expected is None else [-1 if d is None else d for d in expected[1][1:]]
    if row_shape.count(-1) > 1:
        row_shape = [-1]
    try:
        return flat.reshape(len(column), *row_shape)
    except ValueError:
        raise CalibrationDataError(f"{where}: {flat.size} values in {len(column)} rows do not fill rows of shape "
                                   f"{[d if d != -1 else '?' for d in row_shape]}; store each row flattened "
                                   "(row-major), all rows the same length") from None
