"""Stream this rank's share of the TwHIN edge files as `EdgeBatch`es.

Why it is built this way:

* Disjoint, equal shares. The rows of all files, concatenated in sorted path order, form one
  global sequence. Rank r owns the contiguous slice `[r*n, (r+1)*n)` with
  `n = total_rows // world_size`, so no edge is trained on twice per epoch and no rank needs
  to talk to another to know what to read.
* Drop the remainder. Each share is cut into `n // batch_size` full batches; the rows left
  over (fewer than `world_size * batch_size` plus the per-rank tails) are dropped. Every
  rank therefore runs exactly the same number of steps: a rank with one batch more would
  wait forever in a collective (the sharded embedding all-to-all) that the others never join.
* Streaming. Row counts come from the parquet footers, so sizing a share reads no data.
  Iteration opens one file at a time, reads only the row groups that overlap the share (in
  chunks of at most `_READ_ROWS` rows) and carries leftover rows across file boundaries:
  memory stays bounded by one chunk plus one batch, whatever the size of the data.
* Resumable. The position (`epoch`, `batch`) maps arithmetically to a global row, so resuming
  skips whole files and row groups without reading them.
* Validated. Every chunk is checked, vectorised, before it becomes a batch: a relation index
  or entity id outside its table would otherwise be an out-of-bounds embedding lookup (a crash
  far from the cause on CPU, silent garbage or a device assert on GPU); a weight that is
  NaN, infinite or negative would turn the loss into NaN (or reward a wrong score) a few
  steps later. Errors name the file and the 0-based row within it, in one line (pyarrow's
  own messages for a file it cannot decode are cut to their first line).
* Grouped by relation. Each batch's edges are reordered by relation (stably, in the reader
  thread): the model then scores each relation's in-batch negatives as one block
  (`models._BlockScores`), 1/R of the work of scoring every edge against every
  relation's sample. The loss is a mean over the batch and the in-batch sample draws the
  same edges in either order, so the training is the same up to float summation order.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem

from tml.common.data_position import ResumablePosition
from tml.common.parquet_files import resolve_parquet_files
from tml.errors import ConfigError, DataError, error_line

from ..models.config import Relation
from .edges import EdgeBatch, edges_to_kjt, gathers_global_negatives, relation_tables, whole_tables

logger = logging.getLogger(__name__)

# Rows per record batch read from parquet: bounds memory when row groups are large.
_READ_ROWS = 1 << 16


@dataclasses.dataclass(frozen=True)
class _RowGroup:
    file_index: int
    index: int          # row group index within its file
    start: int          # first global row
    num_rows: int


@dataclasses.dataclass
class _File:
    path: str           # path as the filesystem knows it
    display: str        # path for messages (with the URL scheme if it is not local)
    num_rows: int
    has_weight: bool


class EdgesDataset(ResumablePosition):
    """This rank's batches of positive edges, for `num_epochs` epochs (see module docstring).

    Args:
      data_root: a glob, a directory (all `*.parquet` directly inside it) or one file; any
        fsspec URL.
      table_sizes: num_embeddings of each table, in config order (the KJT key order).
      relations: the relations; the `rel` column holds an index into this list.
      batch_size: edges per batch per rank.
      rank, world_size: this rank and the number of ranks sharing the data.
      limit: keep at most this many batches per rank per epoch (after `offset`).
      offset: skip this many batches per rank per epoch first.
      num_epochs: how many times iteration goes over the share (same order each time).
      lhs_column, rhs_column, rel_column, weight_column: column names; weight is optional.
      global_negatives: per edge and side, this many ids drawn uniformly from the edge's lhs
        and rhs tables and appended to the batch's lookups (`edges_to_kjt`). Drawn from a
        generator seeded by `seed`, rank, epoch and batch, so a resumed run draws the same.
      shared_negatives: per batch and table, this many ids drawn uniformly from the table,
        shared by every edge of the batch (`EdgeBatch.shared`); same generator.
      gather_negatives: look the global negatives up as whole tables and send their ids in
        `EdgeBatch.negatives` (`edges.gathers_global_negatives`, which decides when None);
        the same draws, scores and updates either way.

    Iteration: each `iter()` starts at the beginning, or exactly at the position given to
    `load_state_dict` just before. While iterating, `state_dict()` is the next batch to yield.
    """

    def __init__(self, data_root: str, table_sizes: dict[str, int], relations: list[Relation],
                 batch_size: int, rank: int = 0, world_size: int = 1,
                 limit: int | None = None, offset: int | None = None, num_epochs: int = 1,
                 lhs_column: str = "lhs", rhs_column: str = "rhs", rel_column: str = "rel",
                 weight_column: str = "weight", global_negatives: int = 0,
                 seed: int = 0, shared_negatives: int = 0,
                 gather_negatives: bool | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if num_epochs < 0:
            raise ValueError(f"num_epochs must be >= 0, got {num_epochs}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if offset is not None and offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        if global_negatives < 0:
            raise ValueError(f"global_negatives must be >= 0, got {global_negatives}")
        if shared_negatives < 0:
            raise ValueError(f"shared_negatives must be >= 0, got {shared_negatives}")
        if not relations:
            raise ConfigError("at least one relation is required")
        self.data_root = data_root
        self.table_names = list(table_sizes)
        self.table_sizes = dict(table_sizes)
        self.relations = list(relations)
        for index, relation in enumerate(self.relations):
            for side in ("lhs", "rhs"):
                if getattr(relation, side) not in self.table_sizes:
                    raise ConfigError(
                        f"relations[{index}] ('{relation.name}'): {side} names unknown table "
                        f"'{getattr(relation, side)}' (tables: {', '.join(self.table_names)})")
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_epochs = num_epochs
        self.lhs_column = lhs_column
        self.rhs_column = rhs_column
        self.rel_column = rel_column
        self.weight_column = weight_column
        self.global_negatives = global_negatives
        self.shared_negatives = shared_negatives
        self.seed = seed

        self._relation_tables = relation_tables(self.relations, self.table_names)
        rows = [self.table_sizes[t] for t in self.table_names]
        if gather_negatives is None:
            gather_negatives = gathers_global_negatives(rows, batch_size, global_negatives,
                                                        shared_negatives)
        elif gather_negatives and (not global_negatives or shared_negatives):
            raise ConfigError("gathered global negatives need global_negatives > 0 and no "
                              "shared_negatives")
        self._whole_tables = whole_tables(rows) if gather_negatives else None
        self._lhs_sizes = np.array([self.table_sizes[r.lhs] for r in self.relations], np.int64)
        self._rhs_sizes = np.array([self.table_sizes[r.rhs] for r in self.relations], np.int64)

        self._fs, paths = _resolve(data_root)
        self._files: list[_File] = []
        self._file_starts: list[int] = []   # global row of each file's first row
        self._row_groups: list[_RowGroup] = []
        for path in paths:
            self._add_file(path)
        self._row_group_starts = [g.start for g in self._row_groups]
        self.total_rows = sum(f.num_rows for f in self._files)

        self.rows_per_rank = self.total_rows // world_size
        self._rank_start = rank * self.rows_per_rank
        full_batches = self.rows_per_rank // batch_size
        self._offset = offset or 0
        available = max(0, full_batches - self._offset)
        self._num_batches = available if limit is None else min(limit, available)
        if self._num_batches == 0:
            logger.warning("%s: %d rows give no batch of %d per rank (world size %d, offset "
                           "%s, limit %s)", data_root, self.total_rows, batch_size, world_size,
                           offset, limit)
        else:
            logger.info("%s: %d rows in %d file(s); rank %d of %d reads %d batches of %d per "
                        "epoch", data_root, self.total_rows, len(self._files), rank,
                        world_size, self._num_batches, batch_size)
        self._reset_position()

    # -- sizes and position ---------------------------------------------------------------

    # -- iteration ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[EdgeBatch]:
        return self._generate(*self._start_iteration())

    def _generate(self, epoch: int, batch: int) -> Iterator[EdgeBatch]:
        while epoch < self.num_epochs and self._num_batches:
            first_row = self._rank_start + (self._offset + batch) * self.batch_size
            end_row = self._rank_start + (self._offset + self._num_batches) * self.batch_size
            for arrays in self._read_batches(first_row, end_row):
                batch += 1
                if batch == self._num_batches:
                    epoch, batch = epoch + 1, 0
                self._epoch, self._batch = epoch, batch
                yield self._to_batch(*arrays, position=(epoch, batch))
            if batch:  # the files changed under us: fewer rows than their footers said
                raise DataError(f"{self.data_root}: the files ended before the rows their "
                                "metadata announced; were they rewritten during training?")
        self._epoch, self._batch = max(epoch, self.num_epochs), 0

    def _to_batch(self, lhs: np.ndarray, rhs: np.ndarray, rel: np.ndarray,
                  weight: np.ndarray, position: tuple[int, int] = (0, 0)) -> EdgeBatch:
        lhs_t, rhs_t, rel_t = (torch.from_numpy(a) for a in (lhs, rhs, rel))
        negative_lhs = negative_rhs = None
        rng = np.random.default_rng([self.seed, self.rank, *position])
        if self.global_negatives:
            shape = (len(lhs), self.global_negatives)
            sizes = (self._lhs_sizes[rel][:, None], self._rhs_sizes[rel][:, None])
            negative_lhs, negative_rhs = (
                torch.from_numpy((rng.random(shape) * size).astype(np.int64))
                for size in sizes)
        shared = torch.zeros(0, 0, dtype=torch.long)
        if self.shared_negatives:
            sizes = np.array([self.table_sizes[t] for t in self.table_names], np.int64)
            shared = torch.from_numpy((rng.random((len(sizes), self.shared_negatives))
                                       * sizes[:, None]).astype(np.int64))
        if len(rel) > 1 and (rel[1:] < rel[:-1]).any():
            # Grouped by relation (stable: within a relation, file order), here in the
            # reader: each relation's edges are then one block of the batch, which the
            # model scores with one product per relation (`models._BlockScores`). The
            # loss is a mean over the batch and the in-batch sample picks the same edges
            # (`models._in_batch_sample`); the global negatives follow their edges.
            order = torch.from_numpy(np.argsort(rel, kind="stable"))
            lhs_t, rhs_t, rel_t = lhs_t[order], rhs_t[order], rel_t[order]
            weight = weight[order.numpy()]
            if negative_lhs is not None and negative_rhs is not None:
                negative_lhs, negative_rhs = negative_lhs[order], negative_rhs[order]
        negatives = torch.zeros(2, 0, 0, dtype=torch.long)
        if self._whole_tables is not None and negative_lhs is not None \
                and negative_rhs is not None:
            negatives = torch.stack([negative_lhs, negative_rhs])
            negative_lhs = negative_rhs = None
            shared = self._whole_tables
        nodes, slots = edges_to_kjt(lhs_t, rhs_t, rel_t, self._relation_tables,
                                    self.table_names, negative_lhs, negative_rhs, shared)
        return EdgeBatch(nodes=nodes, slots=slots, labels=torch.ones(len(lhs_t)), rels=rel_t,
                         weights=torch.from_numpy(weight), shared=shared, negatives=negatives)

    def _read_batches(self, first_row: int, end_row: int) -> Iterator[tuple[np.ndarray, ...]]:
        """Full batches of global rows [first_row, end_row), a multiple of batch_size."""
        pending: list[tuple[np.ndarray, ...]] = []
        pending_rows = 0
        for chunk in self._read_rows(first_row, end_row):
            pending.append(chunk)
            pending_rows += len(chunk[0])
            if pending_rows < self.batch_size:
                continue
            columns = [np.concatenate(parts) if len(pending) > 1 else parts[0]
                       for parts in zip(*pending)]
            usable = pending_rows - pending_rows % self.batch_size
            for start in range(0, usable, self.batch_size):
                # Copies so that each batch owns its memory (not a view of a large chunk).
                yield tuple(c[start:start + self.batch_size].copy() for c in columns)
            pending = [tuple(c[usable:] for c in columns)] if usable < pending_rows else []
            pending_rows -= usable

    def _read_rows(self, first_row: int, end_row: int) -> Iterator[tuple[np.ndarray, ...]]:
        """Validated (lhs, rhs, rel, weight) chunks of global rows [first_row, end_row)."""
        if first_row >= end_row:
            return
        group_index = bisect.bisect_right(self._row_group_starts, first_row) - 1
        while group_index < len(self._row_groups):
            first_group = self._row_groups[group_index]
            if first_group.start >= end_row:
                return
            # The consecutive row groups of this file that overlap the range.
            groups = [first_group.index]
            file_index = first_group.file_index
            group_index += 1
            while (group_index < len(self._row_groups)
                   and self._row_groups[group_index].file_index == file_index
                   and self._row_groups[group_index].start < end_row):
                groups.append(self._row_groups[group_index].index)
                group_index += 1
            yield from self._read_file(file_index, groups, first_group.start, first_row,
                                       end_row)

    def _read_file(self, file_index: int, groups: list[int], position: int, first_row: int,
                   end_row: int) -> Iterator[tuple[np.ndarray, ...]]:
        file = self._files[file_index]
        file_start = self._file_starts[file_index]
        columns = [self.lhs_column, self.rhs_column, self.rel_column]
        if file.has_weight:
            columns.append(self.weight_column)
        with self._open(file.path) as parquet:
            batches = parquet.iter_batches(batch_size=_READ_ROWS, row_groups=groups,
                                           columns=columns, use_threads=True)
            while True:
                try:
                    record_batch = next(batches)
                except StopIteration:
                    return
                except (OSError, pa.ArrowException, ValueError) as error:
                    raise DataError(f"{file.display} row {position - file_start}: cannot read "
                                    f"the rows from here on: {error_line(error)}") from None
                begin, end = position, position + record_batch.num_rows
                position = end
                if end <= first_row:
                    continue
                if begin >= end_row:
                    return
                lo, hi = max(begin, first_row) - begin, min(end, end_row) - begin
                if lo or hi < record_batch.num_rows:
                    record_batch = record_batch.slice(lo, hi - lo)
                yield self._validate(file, record_batch, begin + lo - file_start)
                if end >= end_row:
                    return

    def _validate(self, file: _File, record_batch: pa.RecordBatch,
                  file_row: int) -> tuple[np.ndarray, ...]:
        """Check a chunk whose first row is row `file_row` of `file`; int64/float32 arrays."""
        arrays = {}
        names = [self.lhs_column, self.rhs_column, self.rel_column]
        if file.has_weight:
            names.append(self.weight_column)
        for name in names:
            column = record_batch.column(name)
            if column.null_count:
                first = int(np.argmax(pc.is_null(column).to_numpy(zero_copy_only=False)))
                raise DataError(f"{file.display} row {file_row + first}: {name} is null")
            arrays[name] = column.to_numpy(zero_copy_only=False)
        lhs, rhs, rel = arrays[self.lhs_column], arrays[self.rhs_column], arrays[self.rel_column]

        num_relations = len(self.relations)
        bad_rel = (rel < 0) | (rel >= num_relations)
        safe_rel = np.where(bad_rel, 0, rel).astype(np.int64)
        lhs_sizes, rhs_sizes = self._lhs_sizes[safe_rel], self._rhs_sizes[safe_rel]
        bad_lhs = (lhs < 0) | (lhs >= lhs_sizes)
        bad_rhs = (rhs < 0) | (rhs >= rhs_sizes)
        bad = bad_rel | bad_lhs | bad_rhs
        if bad.any():
            i = int(np.argmax(bad))
            where = f"{file.display} row {file_row + i}"
            if bad_rel[i]:
                raise DataError(f"{where}: {self.rel_column}={rel[i]} is outside the "
                                f"{num_relations} configured relations")
            relation = self.relations[int(rel[i])]
            if bad_lhs[i]:
                raise DataError(f"{where}: {self.lhs_column}={lhs[i]} is outside table "
                                f"'{relation.lhs}' (num_embeddings={lhs_sizes[i]})")
            raise DataError(f"{where}: {self.rhs_column}={rhs[i]} is outside table "
                            f"'{relation.rhs}' (num_embeddings={rhs_sizes[i]})")
        if file.has_weight:
            with np.errstate(over="ignore"):   # too large for float32: inf, refused below
                weight = arrays[self.weight_column].astype(np.float32, copy=False)
            bad_weight = ~(weight >= 0) | ~np.isfinite(weight)      # NaN fails both
            if bad_weight.any():
                i = int(np.argmax(bad_weight))
                raise DataError(f"{file.display} row {file_row + i}: {self.weight_column}="
                                f"{arrays[self.weight_column][i]} is not a finite number >= 0 "
                                "(as float32)")
        else:
            weight = np.ones(len(lhs), dtype=np.float32)
        return (lhs.astype(np.int64, copy=False), rhs.astype(np.int64, copy=False),
                rel.astype(np.int64, copy=False), weight)

    # -- files ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _open(self, path: str) -> Iterator[pq.ParquetFile]:
        """One parquet file, closed on exit (pyarrow's own reader for local files)."""
        if isinstance(self._fs, LocalFileSystem):
            with pq.ParquetFile(path) as parquet:
                yield parquet
        else:
            with self._fs.open(path, "rb") as handle, pq.ParquetFile(handle) as parquet:
                yield parquet

    def _add_file(self, path: str) -> None:
        """Read one file's footer: check its schema, record its row groups."""
        display = _display(self._fs, path)
        try:
            with self._open(path) as parquet:
                schema = parquet.schema_arrow
                metadata = parquet.metadata
        except (OSError, pa.ArrowException, ValueError) as error:
            raise DataError(f"{display}: cannot read as parquet: {error_line(error)}") from None
        for name in (self.lhs_column, self.rel_column, self.rhs_column, self.weight_column):
            if schema.names.count(name) > 1:
                raise DataError(f"{display}: column '{name}' occurs "
                                f"{schema.names.count(name)} times")
        for name in (self.lhs_column, self.rel_column, self.rhs_column):
            if name not in schema.names:
                raise DataError(f"{display}: missing column '{name}' "
                                f"(columns: {', '.join(schema.names)})")
            if not pa.types.is_integer(schema.field(name).type):
                raise DataError(f"{display}: column '{name}' has type "
                                f"{schema.field(name).type}; expected integers")
        has_weight = self.weight_column in schema.names
        if has_weight:
            kind = schema.field(self.weight_column).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                raise DataError(f"{display}: column '{self.weight_column}' has type {kind}; "
                                "expected numbers")
        file_index = len(self._files)
        start = self._file_starts[-1] if self._file_starts else 0
        if self._files:
            start += self._files[-1].num_rows
        group_rows = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        if any(n < 0 for n in group_rows) or sum(group_rows) != metadata.num_rows:
            raise DataError(f"{display}: cannot read as parquet: its footer announces "
                            f"{metadata.num_rows} rows, its row groups {sum(group_rows)}")
        for index, num_rows in enumerate(group_rows):
            if num_rows:
                self._row_groups.append(_RowGroup(file_index, index, start, num_rows))
            start += num_rows
        self._files.append(_File(path, display, metadata.num_rows, has_weight))
        self._file_starts.append(start - metadata.num_rows)


def _resolve(data_root: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem and the sorted parquet files that `data_root` names."""
    fs, paths = resolve_parquet_files(data_root)
    if not paths:
        raise DataError(f"data_root '{data_root}' matches no parquet files")
    return fs, paths


def _display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
