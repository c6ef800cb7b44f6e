"""Read this worker's share of segdense parquet files as `RecapBatch`es.

The rows of all files, in sorted path order, form one sequence; rank r of W reads the
contiguous slice `[r*n, (r+1)*n)`, `n = rows // W`, cut into full batches of
`global_batch_size / W` (the rest is dropped), so shares are disjoint, every rank runs the
same number of steps (a rank with one batch more would wait forever in a collective), and no
rank needs another to know what to read. Row counts come from the parquet footers; reading
goes file by file and row group by row group over the share only.

Training repeats the share (as the original's datasets repeat) with a resumable position
(`state_dict`: epoch and batch); evaluation reads it once.

Checks, vectorised, before a row becomes a tensor, each a one-line DataError naming the file
and 0-based row: value lists of the schema's length without nulls, labels 0 or 1, ids and
small-embedding values inside their tables (an out-of-range lookup is a crash far from its
cause on CPU and garbage on GPU).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from tml.common.parquet_files import resolve_parquet_files
from tml.errors import ConfigError, DataError, error_line

from ..model.config import ModelConfig
from .config import RecapDataConfig
from .schema import EMBEDDING_INPUTS, Feature, load_schema

if TYPE_CHECKING:
    from .batch import RecapBatch

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class Column:
    """One model input read from one parquet column."""

    feature: Feature
    keep: int                          # values kept per row (truncation)
    low: int | None = None             # allowed range of int values, [low, high)
    high: int | None = None
    range_columns: tuple[int, ...] = ()  # for lists: which positions the range applies to
    what: str = ""


@dataclasses.dataclass
class InputSpec:
    """What to read, from the config: the model's inputs and where they are."""

    continuous: Column
    binary: Column
    discrete: Column | None
    embeddings: dict[str, Column]
    labels: list[Column]
    ids: dict[str, Column]             # table name -> id column
    tasks: list[str]
    pos_rates: np.ndarray
    neg_rates: np.ndarray

    @property
    def columns(self) -> list[Column]:
        found = [self.continuous, self.binary, *self.embeddings.values(), *self.labels,
                 *self.ids.values()]
        return found + ([self.discrete] if self.discrete is not None else [])

    def input_shapes(self) -> dict[str, int]:
        """Width of each dense input, for building the model."""
        shapes = {"continuous": self.continuous.keep, "binary": self.binary.keep,
                  "discrete": self.discrete.keep if self.discrete else 0}
        shapes.update({name: column.keep for name, column in self.embeddings.items()})
        return shapes


def input_spec(data: RecapDataConfig, model: ModelConfig, source: str = "train_data") -> InputSpec:
    """Resolve the config's feature names against the schema (ConfigError naming them)."""
    schema = load_schema(data.seg_dense_schema.schema_path)
    renamed = data.seg_dense_schema.renamed_features

    def feature(model_name: str, required: bool = True) -> Feature | None:
        name = renamed.get(model_name, model_name)
        if name not in schema:
            if not required and model_name not in renamed:
                return None
            raise ConfigError(f"{source}.seg_dense_schema: feature '{name}' ('{model_name}') "
                              f"is not in {data.seg_dense_schema.schema_path}")
        return schema[name]

    truncation = data.preprocess.truncate_and_slice if data.preprocess else None

    def list_column(model_name: str, dtype: str, cut: int | None, required: bool = True,
                    **kwargs: object) -> Column | None:
        found = feature(model_name, required)
        if found is None:
            return None
        if found.dtype != dtype:
            raise ConfigError(f"{source}.seg_dense_schema: feature '{found.name}' "
                              f"('{model_name}') is {found.dtype}; expected {dtype}")
        keep = min(found.length, cut) if cut else found.length
        return Column(found, keep, what=model_name, **kwargs)  # type: ignore[arg-type]

    continuous = list_column("continuous", "float_list",
                             truncation.continuous_feature_truncation if truncation else None)
    binary = list_column("binary", "int64_list",
                         truncation.binary_feature_truncation if truncation else None)
    small_tables = model.small_embeddings.tables if model.small_embeddings else []
    debias = model.position_debias_config
    needs_discrete = bool(small_tables) or debias is not None
    discrete = list_column("discrete", "int64_list", None, required=needs_discrete)
    if discrete is not None:
        width = discrete.keep
        for table in small_tables:
            if table.index >= width:
                raise ConfigError(f"model.small_embeddings: table '{table.name}' index "
                                  f"{table.index} is past the {width} discrete features")
        if debias is not None and debias.position_feature_index >= width:
            raise ConfigError(f"model.position_debias_config.position_feature_index "
                              f"{debias.position_feature_index} is past the {width} discrete "
                              "features")
        if small_tables:
            sizes = {t.index: t.num_embeddings for t in small_tables}
            # One range per column would be exact; the smallest table bounds them all.
            discrete = dataclasses.replace(discrete, low=0, high=min(sizes.values()),
                                           range_columns=tuple(sorted(sizes)))
    embeddings = {}
    for name in EMBEDDING_INPUTS:
        if name in renamed:
            embeddings[name] = list_column(name, "float_list", None)
    labels = []
    for task in model.tasks:
        if task not in schema:
            raise ConfigError(f"{source}.tasks: label '{task}' is not in "
                              f"{data.seg_dense_schema.schema_path}")
        if schema[task].length != 1 or schema[task].dtype != "int64_list":
            raise ConfigError(f"{source}.tasks: label '{task}' must be an int64_list of "
                              "length 1 in the schema")
        labels.append(Column(schema[task], 1, 0, 2, what=f"label '{task}'"))
    ids = {}
    for table in (model.large_embeddings.tables if model.large_embeddings else []):
        wanted = table.feature or table.name
        found = feature(wanted)
        assert found is not None
        if found.dtype != "int64_list" or found.length != 1:
            raise ConfigError(f"model.large_embeddings: table '{table.name}' reads "
                              f"'{found.name}', which is not a single int64 id")
        ids[table.name] = Column(found, 1, 0, table.num_embeddings,
                                 what=f"id of table '{table.name}'")
    tasks = list(model.tasks)
    return InputSpec(
        continuous=continuous, binary=binary, discrete=discrete,  # type: ignore[arg-type]
        embeddings=embeddings, labels=labels, ids=ids, tasks=tasks,  # type: ignore[arg-type]
        pos_rates=np.array([data.tasks[t].pos_downsampling_rate for t in tasks], np.float32),
        neg_rates=np.array([data.tasks[t].neg_downsampling_rate for t in tasks], np.float32))


def resolve_files(inputs: str, keep: int | None = None) -> tuple[fsspec.AbstractFileSystem,
                                                                 list[str]]:
    """The filesystem and sorted files of a glob, a directory (its *.parquet) or a file."""
    fs, paths = resolve_parquet_files(inputs)
    if not paths:
        raise DataError(f"inputs '{inputs}' matches no files (write some with python -m "
                        f"{__package__}.generate --out DIR)")
    return fs, paths[:keep] if keep else paths


class RecapDataset:
    """This rank's batches (see the module docstring).

    Args:
      config: the data config; `model`: which inputs and labels the model needs.
      rank, world_size: this worker among all.
      repeat: go over the share again and again (training) or once (evaluation).
    """

    def __init__(self, config: RecapDataConfig, model: ModelConfig, rank: int = 0,
                 world_size: int = 1, repeat: bool = True, source: str = "train_data") -> None:
        if config.global_batch_size % world_size:
            raise ConfigError(f"{source}.global_batch_size {config.global_batch_size} is not "
                              f"divisible by the {world_size} workers")
        self.spec = input_spec(config, model, source)
        self.batch_size = config.global_batch_size // world_size
        self.repeat = repeat
        self._fs, paths = resolve_files(config.inputs or "", config.num_files_to_keep)
        self._files: list[tuple[str, list[int]]] = []   # path, rows per row group
        for path in paths:
            self._files.append((path, self._check_file(path)))
        total = sum(sum(groups) for _, groups in self._files)
        share = total // world_size
        self._share_start = rank * share
        self._batches = share // self.batch_size
        if self._batches == 0:
            raise DataError(f"{source}: {total} rows in {len(paths)} file(s) give each of the "
                            f"{world_size} workers less than one batch of {self.batch_size}")
        self._epoch, self._batch = 0, 0
        self._pending: dict[str, int] | None = None
        self._cache: tuple[tuple, dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self._batches

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        epoch, batch = epoch + batch // self._batches, batch % self._batches
        self._pending = {"epoch": epoch, "batch": batch}

    def __iter__(self) -> Iterator[RecapBatch]:
        start = self._pending or {"epoch": 0, "batch": 0}
        self._pending = None
        epoch, batch = start["epoch"], start["batch"]
        while True:
            first = self._share_start + batch * self.batch_size
            end = self._share_start + self._batches * self.batch_size
            for index, rows in enumerate(self._read(first, end)):
                self._epoch, self._batch = epoch, batch + index + 1
                yield self._to_batch(rows)
            if not self.repeat:
                return
            epoch, batch = epoch + 1, 0

    # -- reading --------------------------------------------------------------------------

    def _check_file(self, path: str) -> list[int]:
        try:
            with self._fs.open(path, "rb") as handle, pq.ParquetFile(handle) as parquet:
                schema, metadata = parquet.schema_arrow, parquet.metadata
                groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        except (OSError, pa.ArrowException, ValueError) as error:
            raise DataError(f"{path}: cannot read as parquet: {error_line(error)}") from None
        for column in self.spec.columns:
            name, kind = column.feature.name, column.feature.arrow_type
            if name not in schema.names:
                raise DataError(f"{path}: missing column '{name}' ({column.what})")
            found = schema.field(name).type
            ok = (found == kind) if column.feature.length == 1 else (
                (pa.types.is_list(found) or pa.types.is_large_list(found)
                 or pa.types.is_fixed_size_list(found)) and found.value_type == kind.value_type)
            if not ok:
                raise DataError(f"{path}: column '{name}' has type {found}; expected {kind}")
        if any(n < 0 for n in groups) or sum(groups) != metadata.num_rows:
            raise DataError(f"{path}: cannot read as parquet: inconsistent row counts in its "
                            "footer")
        return groups

    def _read(self, first: int, end: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches of rows [first, end) of all files, as arrays by column name."""
        names = sorted({c.feature.name for c in self.spec.columns})
        buffered: list[dict[str, np.ndarray]] = []
        count = 0
        offset = 0
        for path, groups in self._files:
            for group, size in enumerate(groups):
                lo, hi = max(first, offset), min(end, offset + size)
                if lo < hi:
                    arrays = self._read_group(path, group, names, lo - offset, hi - offset)
                    buffered.append(arrays)
                    count += hi - lo
                    if count >= self.batch_size:
                        merged = {n: np.concatenate([b[n] for b in buffered]) if
                                  len(buffered) > 1 else buffered[0][n] for n in names}
                        used = 0
                        while count - used >= self.batch_size:
                            yield {n: v[used:used + self.batch_size] for n, v in merged.items()}
                            used += self.batch_size
                        buffered = [{n: v[used:] for n, v in merged.items()}]
                        count -= used
                offset += size
                if offset >= end:
                    return

    def _read_group(self, path: str, group: int, names: list[str], lo: int,
                    hi: int) -> dict[str, np.ndarray]:
        # Evaluation reads the same rows at every evaluation: keep the last group decoded
        # (parquet list columns decode slowly: ~0.7 s for 1024 rows of 6000 values).
        key = (path, group, lo, hi)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        arrays = self._decode_group(path, group, names, lo, hi)
        if not self.repeat:
            self._cache = (key, arrays)
        return arrays

    def _decode_group(self, path: str, group: int, names: list[str], lo: int,
                      hi: int) -> dict[str, np.ndarray]:
        try:
            with self._fs.open(path, "rb") as handle, pq.ParquetFile(handle) as parquet:
                table = parquet.read_row_group(group, columns=names)
        except (OSError, pa.ArrowException, ValueError) as error:
            raise DataError(f"{path}: cannot read row group {group}: {error_line(error)}") \
                from None
        row_base = sum(self._files_groups(path)[:group])
        table = table.slice(lo, hi - lo)
        out: dict[str, np.ndarray] = {}
        for column in self.spec.columns:
            name = column.feature.name
            if name in out:
                continue
            out[name] = _column_values(table.column(name), column, path, row_base + lo)
        return out

    def _files_groups(self, path: str) -> list[int]:
        for known, groups in self._files:
            if known == path:
                return groups
        return []

    def _to_batch(self, rows: dict[str, np.ndarray]) -> RecapBatch:
        # Imported here: the launcher checks the data without paying for torchrec.
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        from .batch import RecapBatch

        spec = self.spec
        labels = np.stack([rows[c.feature.name] for c in spec.labels], axis=1).astype(np.float32)
        weights = labels / spec.pos_rates + (1.0 - labels) / spec.neg_rates
        discrete = rows[spec.discrete.feature.name][:, :spec.discrete.keep] if spec.discrete \
            else np.zeros((len(labels), 0), np.int64)
        embeddings = {name: torch.from_numpy(np.array(rows[c.feature.name]))
                      for name, c in spec.embeddings.items()}
        sparse = None
        if spec.ids:
            values = np.concatenate([rows[c.feature.name] for c in spec.ids.values()])
            sparse = KeyedJaggedTensor.from_lengths_sync(
                keys=list(spec.ids), values=torch.from_numpy(values.astype(np.int64)),
                lengths=torch.ones(len(values), dtype=torch.int32))
        return RecapBatch(
            continuous_features=torch.from_numpy(np.array(
                rows[spec.continuous.feature.name][:, :spec.continuous.keep])),
            binary_features=torch.from_numpy(np.array(
                rows[spec.binary.feature.name][:, :spec.binary.keep].astype(np.float32))),
            discrete_features=torch.from_numpy(np.array(discrete)),
            labels=torch.from_numpy(labels), weights=torch.from_numpy(weights),
            user_embedding=embeddings.get("user_embedding"),
            user_eng_embedding=embeddings.get("user_eng_embedding"),
            author_embedding=embeddings.get("author_embedding"),
            sparse_features=sparse)


def _column_values(array: pa.ChunkedArray, column: Column, path: str,
                   first_row: int) -> np.ndarray:
    """The column as numpy (`[rows]` or `[rows, length]`), checked (module docstring)."""
    feature = column.feature
    name = feature.name
    array = array.combine_chunks()
    if array.null_count:
        row = int(np.flatnonzero(np.asarray(array.is_null()))[0])
        raise DataError(f"{path}: row {first_row + row}: column '{name}' is null")
    if feature.length == 1:
        values = array.to_numpy(zero_copy_only=False)
    else:
        lengths = np.asarray(pc.list_value_length(array))
        bad = np.flatnonzero(lengths != feature.length)
        if len(bad):
            raise DataError(f"{path}: row {first_row + int(bad[0])}: column '{name}' holds "
                            f"{int(lengths[bad[0]])} values; the schema says {feature.length}")
        flat = array.flatten()
        if flat.null_count:
            row = int(np.flatnonzero(np.asarray(flat.is_null()))[0]) // feature.length
            raise DataError(f"{path}: row {first_row + row}: column '{name}' holds a null value")
        values = flat.to_numpy(zero_copy_only=False).reshape(-1, feature.length)
    if column.low is not None:
        checked = values if feature.length == 1 else values[:, list(column.range_columns)]
        bad_mask = (checked < column.low) | (checked >= column.high)
        if bad_mask.any():
            row = int(np.flatnonzero(bad_mask.reshape(len(values), -1).any(axis=1))[0])
            value = int(checked.reshape(len(values), -1)[row][
                bad_mask.reshape(len(values), -1)[row]][0])
            raise DataError(f"{path}: row {first_row + row}: {column.what} ('{name}') is "
                            f"{value}; expected {column.low}..{column.high - 1}")
    return values
