"""Batches of (user, item) pairs for the tiny project (the doc's step 2): DataclassBatch
batches, the same number on every rank, a resumable position, DataError naming file and
row for bad input."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.data.tiny_project.data.config import TinyDataConfig
from tml.common.batch import DataclassBatch
from tml.common.data_position import ResumablePosition
from tml.errors import DataError

TABLES = ("user", "item")


@dataclasses.dataclass
class PairBatch(DataclassBatch):
    """One id per table per row (a KeyedJaggedTensor) and the rows' 0/1 labels."""

    features: KeyedJaggedTensor
    labels: torch.Tensor


class PairDataset(ResumablePosition):
    """This rank's share of the file: rows // world_size rows in whole batches."""

    def __init__(self, config: TinyDataConfig, table_rows: dict[str, int], rank: int,
                 world_size: int, num_epochs: int = 1) -> None:
        try:
            table = pq.read_table(config.path)
        except (OSError, ValueError) as error:
            raise DataError(f"{config.path}: not a readable parquet file ({error})") from None
        columns = {}
        for name in (*TABLES, "label"):
            if name not in table.column_names:
                raise DataError(f"{config.path}: no column {name!r}")
            columns[name] = torch.from_numpy(table.column(name).to_numpy(zero_copy_only=False).copy())
        for name in TABLES:
            bad = ((columns[name] < 0) | (columns[name] >= table_rows[name])).nonzero()
            if len(bad):
                row = int(bad[0]) + 1
                raise DataError(f"{config.path}: row {row}: {name} id {int(columns[name][row - 1])} "
                                f"is outside the table's {table_rows[name]} rows")
        bad = ((columns["label"] != 0) & (columns["label"] != 1)).nonzero()
        if len(bad):
            raise DataError(f"{config.path}: row {int(bad[0]) + 1}: label is not 0 or 1")
        batch = config.per_replica_batch_size
        self._num_batches = table.num_rows // world_size // batch
        start = rank * self._num_batches * batch
        share = slice(start, start + self._num_batches * batch)
        self._users = columns["user"][share].long()
        self._items = columns["item"][share].long()
        self._labels = columns["label"][share].float()
        self._batch_size, self._num_epochs = batch, num_epochs
        self._reset_position()

    def _make_batch(self, index: int) -> PairBatch:
        rows = slice(index * self._batch_size, (index + 1) * self._batch_size)
        n = self._batch_size
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=list(TABLES), values=torch.cat([self._users[rows], self._items[rows]]),
            lengths=torch.ones(2 * n, dtype=torch.int32))
        return PairBatch(features=features, labels=self._labels[rows])

    def __iter__(self) -> Iterator[PairBatch]:
        epoch, batch = self._start_iteration()
        while epoch < self._num_epochs:
            while batch < self._num_batches:
                self._epoch, self._batch = epoch, batch + 1
                yield self._make_batch(batch)
                batch += 1
            epoch, batch = epoch + 1, 0
            self._epoch, self._batch = epoch, 0
