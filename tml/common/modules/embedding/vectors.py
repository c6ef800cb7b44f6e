"""Tables started from vectors in a parquet file (`twhin export`), written into each
worker's own shards after sharding.

Why here: any project's table may start from vectors trained elsewhere (TwHIN's embeddings
in a ranker, yesterday's export in today's TwHIN run), and writing them is the same for
every project: read `(rows, dim)` float32 vectors, then copy into each local shard the
block it holds (table-, row- or column-wise, any world size), so nothing but the file is
ever whole in one worker.

File: a parquet with a column `vector` (list or fixed-size list of floats, `dim` values)
and one row per table row in row order, as `twhin export` writes (`<table>.parquet`: id,
vector). It may hold fewer rows than the table when the table grew since (`twhin import
--vocab` appends new ids after the known ones): those rows keep their initial values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from tml.common.modules.embedding.config import EmbeddingBagConfig
from tml.errors import ConfigError, DataError, error_line

logger = logging.getLogger(__name__)


def read_vectors(path: str, rows: int, dim: int, what: str,
                 allow_fewer: bool = False) -> np.ndarray:
    """The `(n, dim)` float32 vectors of `path`; n == rows, or n <= rows with `allow_fewer`.

    Every problem is one line naming the file: missing (ConfigError, `what` names the
    config field), unreadable, no float list column `vector`, nulls, too many rows, rows
    of another width, non-finite values (DataError).
    """
    try:
        table = pq.read_table(path, columns=["vector"])
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} not found") from None
    except (OSError, pa.ArrowException, ValueError, KeyError) as error:
        raise DataError(f"{path}: cannot read a twhin export table: {error_line(error)}") \
            from None
    column = table.column("vector").combine_chunks()
    kind = column.type
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)
            or pa.types.is_large_list(kind)) or not pa.types.is_floating(kind.value_type):
        raise DataError(f"{path}: column 'vector' has type {kind}; expected a list of floats")
    if len(column) > rows or (len(column) < rows and not allow_fewer):
        raise DataError(f"{path}: {len(column)} vectors; {what} has {rows} rows")
    if column.null_count or column.flatten().null_count:
        raise DataError(f"{path}: column 'vector' holds nulls")
    if pa.types.is_fixed_size_list(kind):
        widths_ok = kind.list_size == dim
    else:
        widths_ok = bool((np.diff(column.offsets.to_numpy()) == dim).all())
    if not widths_ok:
        raise DataError(f"{path}: vectors are not all of {dim} values ({what}'s embedding_dim)")
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    values = values.reshape(len(column), dim)
    if not np.isfinite(values).all():
        raise DataError(f"{path}: vectors hold non-finite values")
    return values


def local_shards(value: object) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
    """(tensor, (row, column) offset) of each shard of a table held by this worker."""
    if hasattr(value, "to_local"):                          # DTensor (LocalShardsWrapper)
        local = value.to_local()  # type: ignore[attr-defined]
        if hasattr(local, "local_shards"):
            for shard, offset in zip(local.local_shards(), local.local_offsets()):
                yield shard, (int(offset[0]), int(offset[1]))
        else:
            yield local, (0, 0)
    elif hasattr(value, "local_shards"):                    # ShardedTensor
        for shard in value.local_shards():  # type: ignore[attr-defined]
            offsets = shard.metadata.shard_offsets
            yield shard.tensor, (int(offsets[0]), int(offsets[1]))
    elif isinstance(value, torch.Tensor):                   # unsharded
        yield value, (0, 0)


def table_weight(model: nn.Module, table: str, what: str) -> object:
    """The (possibly sharded) weight of table `table` in `model`'s state dict."""
    state = model.state_dict(keep_vars=True)
    keys = [k for k in state if k.endswith(f"embedding_bags.{table}.weight")]
    if len(keys) != 1:
        raise ConfigError(f"{what}: not found in the model")
    return state[keys[0]]


@torch.no_grad()
def write_rows(weight: object, vectors: torch.Tensor) -> None:
    """Copy `vectors` (the table's first len(vectors) rows) into this worker's shards."""
    for shard, (row, column) in local_shards(weight):
        rows, columns = shard.shape
        end = min(row + rows, len(vectors))
        if end > row:
            shard[:end - row].copy_(vectors[row:end, column:column + columns].to(shard.dtype))


def load_table_vectors(model: nn.Module, tables: Sequence[EmbeddingBagConfig],
                       tables_field: str = "model.embeddings.tables") -> list[str]:
    """Write each table's `init_from_export` vectors into its local shards; the tables done.

    Call after sharding (every worker); rows beyond the file keep their initial values.
    """
    done = []
    for table in tables:
        if table.init_from_export is None:
            continue
        what = f"{tables_field} '{table.name}'"
        weight = table_weight(model, table.name, what)
        vectors = read_vectors(table.init_from_export.path, table.num_embeddings,
                               table.embedding_dim, what, allow_fewer=True)
        write_rows(weight, torch.from_numpy(vectors))
        logger.info("table %s: rows 0..%d from %s%s", table.name, len(vectors) - 1,
                    table.init_from_export.path, " (frozen)" if table.frozen else "")
        done.append(table.name)
    return done
