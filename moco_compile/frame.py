"""ActivationFrame: a table whose columns may be multi-dimensional arrays, stored as Arrow IPC.

Each column holds one array per row (``[N]``, ``[N, D]``, ``[N, C, H, W]``...).
Multi-dimensional columns are stored as fixed-size lists with their per-row
shape in the field metadata, so a saved frame is memory-mapped on load and
never needs to fit in memory as a whole.
"""
from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from moco_compile.constants import LABELS
from moco_compile.outputs import FRAME_MARK_KEY, GENERATOR

_SHAPE_KEY = b"moco.shape"


def _to_arrow(values: np.ndarray) -> tuple[pa.Array, dict[bytes, bytes]]:
    values = np.ascontiguousarray(values)
    if values.ndim == 1:
        return pa.array(values), {}
    width = int(np.prod(values.shape[1:]))
    flat = pa.array(values.reshape(-1)) if width else pa.array(np.zeros(0, values.dtype))
    column = pa.FixedSizeListArray.from_arrays(flat, width)
    return column, {_SHAPE_KEY: json.dumps(list(values.shape[1:])).encode()}


def _schema_for(columns: Mapping[str, np.ndarray]) -> pa.Schema:
    fields = []
    for name, values in columns.items():
        array, metadata = _to_arrow(np.asarray(values)[:0])
        fields.append(pa.field(name, array.type, metadata=metadata or None))
    return pa.schema(fields)


_GIVE_ARRAY = "give a numpy array whose axis 0 is the row axis (shape [N] or [N, *row_shape])"


def _as_column(name: object, values: object) -> np.ndarray:
    """``values`` as a numpy array with a row axis, or a ``TypeError``/``ValueError`` saying what is wrong."""
    if not isinstance(name, str):
        raise TypeError(f"column names must be strings, got {name!r} ({type(name).__name__})")
    if isinstance(values, (str, bytes)) or values is None:
        array = None
    else:
        try:
            array = np.asarray(values)
        except ValueError:  # ragged nested lists
            array = None
    if array is not None and array.dtype == object and array.ndim > 1:
        raise TypeError(f"column {name!r} is a multi-dimensional array of Python objects (dtype object); "
                        f"{_GIVE_ARRAY}, of a numeric dtype")
    if array is None or array.ndim == 0:
        raise TypeError(f"column {name!r} is not an array with one entry per row (got {type(values).__name__} "
                        f"{reprlib.repr(values)}); {_GIVE_ARRAY}")
    return array


def _table_from_columns(columns: Mapping[str, np.ndarray]) -> pa.Table:
    """An Arrow table from column name -> array (rows on axis 0), checked: arrays, equally many rows."""
    arrays = {name: _as_column(name, values) for name, values in columns.items()}
    lengths = {name: len(values) for name, values in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name!r} has {length}" for name, length in lengths.items())
        raise ValueError(f"columns have different row counts ({described}); every column needs one entry per "
                         "row, rows on axis 0")
    converted, fields = [], []
    for name, values in arrays.items():
        try:
            array, metadata = _to_arrow(values)
        except pa.ArrowException as error:
            raise TypeError(f"column {name!r} holds values Arrow cannot store ({error}); {_GIVE_ARRAY}") from None
        if pa.types.is_nested(array.type) and not metadata:
            raise TypeError(f"column {name!r} holds nested sequences, not one value or array per row; {_GIVE_ARRAY}")
        converted.append(array)
        fields.append(pa.field(name, array.type, metadata=metadata or None))
    return pa.Table.from_arrays(converted, schema=pa.schema(fields))


class ActivationFrame:
    """A DataFrame-like table of per-row arrays backed by an Arrow table.

    Built, as ``pandas.DataFrame`` is, from a mapping of column name to array (rows on axis 0;
    a column may be ``[N]`` or ``[N, *row_shape]``), or from a ``pyarrow.Table``.

    >>> frame = ActivationFrame({"x": np.zeros((3, 2)), "y": np.arange(3)})
    >>> frame["x"].shape
    (3, 2)
    """

    def __init__(self, data: "pa.Table | Mapping[str, np.ndarray]") -> None:
        if isinstance(data, pa.Table):
            self._table = data
        elif isinstance(data, Mapping):
            self._table = _table_from_columns(data)
        else:
            raise TypeError(f"ActivationFrame takes a mapping of column name to numpy array (rows on axis 0) "
                            f"or a pyarrow.Table, not {type(data).__name__}")

    @classmethod
    def from_arrays(cls, columns: Mapping[str, np.ndarray]) -> "ActivationFrame":
        """Build a frame in memory from equally long arrays (row axis first); same as ``ActivationFrame(columns)``."""
        return cls(_table_from_columns(columns))

    @property
    def columns(self) -> list[str]:
        return list(self._table.column_names)

    def __len__(self) -> int:
        return self._table.num_rows

    def __contains__(self, name: object) -> bool:
        return name in self._table.column_names

    def row_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one row of column ``name`` (``()`` for scalar columns)."""
        metadata = self._table.schema.field(self._column_name(name)).metadata or {}
        return tuple(json.loads(metadata[_SHAPE_KEY])) if _SHAPE_KEY in metadata else ()

    def _column_name(self, name: str) -> str:
        if name not in self._table.column_names:
            raise KeyError(f"no column {name!r} in this frame; its columns are: "
                           f"{', '.join(self._table.column_names)}")
        return name

    def column(self, name: str) -> np.ndarray:
        """Column ``name`` as a numpy array ``[N, *row_shape]``."""
        chunked = self._table.column(self._column_name(name))
        shape = self.row_shape(name)
        if not shape:
            return chunked.to_numpy()
        flat = pa.concat_arrays([chunk.flatten() for chunk in chunked.chunks]) if chunked.num_chunks \
            else pa.array([], type=chunked.type.value_type)
        return flat.to_numpy(zero_copy_only=False).reshape((len(self), *shape))

    def take(self, rows: Sequence[int] | np.ndarray) -> "ActivationFrame":
        """A new frame with the given rows (indices or a boolean mask)."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if len(rows) != len(self):
                raise ValueError(f"boolean mask has {len(rows)} entries for {len(self)} rows")
            rows = np.flatnonzero(rows)
        return ActivationFrame(self._table.take(pa.array(rows, type=pa.int64())))

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.column(key)
        if isinstance(key, list) and all(isinstance(k, str) for k in key):
            return ActivationFrame(self._table.select([self._column_name(k) for k in key]))
        if isinstance(key, slice):
            return ActivationFrame(self._table.slice(*_slice_bounds(key, len(self))))
        return self.take(key)

    def with_column(self, name: str, values: np.ndarray) -> "ActivationFrame":
        """A new frame with column ``name`` added (or replaced)."""
        if len(values) != len(self):
            raise ValueError(f"column {name!r} has {len(values)} rows, the frame has {len(self)}")
        array, metadata = _to_arrow(np.asarray(values))
        table = self._table.drop_columns([name]) if name in self else self._table
        return ActivationFrame(table.append_column(pa.field(name, array.type, metadata=metadata or None), array))

    def in_memory(self) -> "ActivationFrame":
        """A copy held in memory, independent of the file this frame may be mapped from."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self._table.schema) as writer:
            writer.write_table(self._table)
        return ActivationFrame(pa.ipc.open_stream(sink.getvalue()).read_all())

    def to_pandas(self):
        """The scalar columns as a pandas DataFrame (multi-dimensional columns are left out)."""
        try:
            import pandas  # noqa: F401
        except ImportError as error:
            raise ImportError("ActivationFrame.to_pandas needs pandas: pip install 'moco-compile[analytics]'") from error
        scalar = [name for name in self.columns if not self.row_shape(name)]
        return self._table.select(scalar).to_pandas()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the frame as an Arrow IPC file (atomically: temporary name, then rename)."""
        path = Path(path)
        with FrameWriter(path, self._table.schema) as writer:
            for batch in self._table.to_batches():
                writer.write_batch(batch)
        return path

    def iter_batches(self, rows: int = 4096) -> Iterator["ActivationFrame"]:
        """Iterate over the frame in slices of at most ``rows`` rows."""
        for start in range(0, len(self), rows):
            yield ActivationFrame(self._table.slice(start, rows))

    def __repr__(self) -> str:
        described = ", ".join(f"{name}{list(self.row_shape(name))}" for name in self.columns)
        return f"ActivationFrame({len(self)} rows: {described})"


def _slice_bounds(key: slice, length: int) -> tuple[int, int]:
    start, stop, step = key.indices(length)
    if step != 1:
        raise ValueError("frame slices must have step 1; use take() for other row selections")
    return start, max(stop - start, 0)


class FrameWriter:
    """Stream rows into an Arrow IPC file; the file appears under its name only on success."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema | None = None) -> None:
        self.path = Path(path)
        self._temporary = self.path.with_name(f".{self.path.name}.partial")
        self._schema = schema
        self._writer: pa.ipc.RecordBatchFileWriter | None = None

    def __enter__(self) -> "FrameWriter":
        return self

    def write(self, columns: Mapping[str, np.ndarray]) -> None:
        """Append rows given as arrays with the row axis first."""
        if self._schema is None:
            self._schema = _schema_for(columns)
        arrays = [_to_arrow(np.asarray(columns[field.name]))[0] for field in self._schema]
        self.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self._schema))

    def write_batch(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            self._open(self._schema or batch.schema)
        self._writer.write_batch(batch)

    def _open(self, schema: pa.Schema) -> None:
        """Start the file; its schema metadata marks it as written by moco (see
        :func:`moco_compile.outputs.written_by_moco`)."""
        marked = schema.with_metadata({**(schema.metadata or {}), FRAME_MARK_KEY: GENERATOR.encode()})
        self._writer = pa.ipc.new_file(str(self._temporary), marked)

    def __exit__(self, error_type, error, traceback) -> None:
        if self._writer is None and error_type is None:
            self._open(self._schema)
        if self._writer is not None:
            self._writer.close()
        if error_type is None:
            os.replace(self._temporary, self.path)
        else:
            self._temporary.unlink(missing_ok=True)


def load_frame(path: str | os.PathLike) -> ActivationFrame:
    """Open a saved frame, memory-mapped (nothing is read until a column is used)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no activation frame at {path}")
    source = pa.memory_map(str(path), "r")
    return ActivationFrame(pa.ipc.open_file(source).read_all())


def load_frames(paths: Sequence[str | os.PathLike], rows: np.ndarray | None = None) -> ActivationFrame:
    """Open frame shards (same columns, e.g. one per data shard) as one frame, memory-mapped, in order.

    ``rows``: sorted indices into the whole to keep; taken shard by shard into memory, each shard's
    mapping released before the next is opened, so only the kept rows and one shard's pages are
    ever held.
    """
    if not paths:
        raise ValueError("no frame shards to load")
    tables, columns, start = [], set(), 0
    for path in paths:
        table = load_frame(path)._table
        columns.add(tuple(table.column_names))
        if rows is not None:
            stop = start + table.num_rows
            table = table.take(pa.array(rows[(rows >= start) & (rows < stop)] - start, type=pa.int64()))
            start = stop
        tables.append(table)
    check_same_columns(columns)
    return ActivationFrame(pa.concat_tables(tables))


def check_same_columns(columns: set[tuple[str, ...]]) -> None:
    """A ``ValueError`` unless every frame shard has the same columns (``columns``: each shard's)."""
    if len(columns) > 1:
        raise ValueError(f"frame shards have different columns: {sorted(columns)}; every shard must hold the "
                         f"same inputs (and all or none of them '{LABELS}')")
