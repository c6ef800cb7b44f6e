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
With `vocab` (a parquet of id, row), vectors are placed by id instead: an export of another
vocabulary (other order, a subset) lands on the right rows, and an id the vocab lacks is
refused rather than written to a wrong row.
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


def _string_column(path: str, table: pa.Table, name: str) -> list[str]:
    if name not in table.column_names:
        raise DataError(f"{path}: no column '{name}'")
    column = table.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) \
            or column.null_count:
        raise DataError(f"{path}: column '{name}' must hold strings without nulls")
    return column.to_pylist()


def rows_by_id(export_path: str, vocab_path: str, rows: int, count: int,
               what: str) -> np.ndarray:
    """The table row of each of the `count` vectors of `export_path` (its column `id`),
    from `vocab_path` (columns id, row: rows 0..rows-1, ids and rows each once)."""
    try:
        vocab = pq.read_table(vocab_path, columns=["id", "row"])
        ids = pq.read_table(export_path, columns=["id"])
    except FileNotFoundError as error:
        raise ConfigError(f"{what}: {error.filename or vocab_path} not found") from None
    except (OSError, pa.ArrowException, ValueError, KeyError) as error:
        raise DataError(f"{vocab_path} / {export_path}: cannot read the id columns: "
                        f"{error_line(error)}") from None
    known = _string_column(vocab_path, vocab, "id")
    row_column = vocab.column("row")
    if not pa.types.is_integer(row_column.type) or row_column.null_count:
        raise DataError(f"{vocab_path}: column 'row' must hold integers without nulls")
    table_rows = row_column.to_numpy()
    if len(table_rows) and (table_rows.min() < 0 or table_rows.max() >= rows):
        raise DataError(f"{vocab_path}: rows must lie in 0..{rows - 1} ({what} has {rows})")
    if len(np.unique(table_rows)) != len(table_rows):
        raise DataError(f"{vocab_path}: a row is given to two ids")
    row_of = dict(zip(known, table_rows.tolist()))
    if len(row_of) != len(known):
        raise DataError(f"{vocab_path}: an id is listed twice")
    wanted = _string_column(export_path, ids, "id")
    if len(wanted) != count:
        raise DataError(f"{export_path}: column 'id' has {len(wanted)} values for {count} "
                        "vectors")
    out = np.empty(count, np.int64)
    for i, entity in enumerate(wanted):
        row = row_of.get(entity)
        if row is None:
            raise DataError(f"{export_path}: id {entity!r} (row {i}) is not in {vocab_path}")
        out[i] = row
    if len(np.unique(out)) != count:
        raise DataError(f"{export_path}: an id is listed twice")
    return out


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


@torch.no_grad()
def whole_table(value: object) -> torch.Tensor:
    """A (possibly sharded) weight as one fp32 tensor, the same bits on every worker.

    Why: whatever reads a live model whole (evaluation during training, a metric over all
    rows) must not care how the planner sharded it. Sharded (DTensor over TorchRec's
    LocalShardsWrapper, or ShardedTensor; rows, columns or whole tables): each worker
    writes its shards into zeros at their offsets and the buffers are summed over the
    workers (adding zeros is exact). Another DTensor: `full_tensor`. A plain tensor
    (a replicated dense parameter): as it is. Collective for sharded values: every worker
    calls it in the same order.
    """
    import torch.distributed as dist

    if hasattr(value, "to_local") and not hasattr(value.to_local(), "local_shards"):
        return value.full_tensor().float()  # type: ignore[attr-defined]
    if isinstance(value, torch.Tensor) and not hasattr(value, "to_local") \
            and not hasattr(value, "local_shards"):
        return value.detach().float()
    out = torch.zeros(tuple(value.size()), dtype=torch.float32)  # type: ignore[attr-defined]
    for shard, (row, column) in local_shards(value):
        out[row:row + shard.shape[0], column:column + shard.shape[1]] = shard.float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def table_weight(model: nn.Module, table: str, what: str) -> object:
    """The (possibly sharded) weight of table `table` in `model`'s state dict."""
    state = model.state_dict(keep_vars=True)
    keys = [k for k in state if k.endswith(f"embedding_bags.{table}.weight")]
    if len(keys) != 1:
        raise ConfigError(f"{what}: not found in the model")
    return state[keys[0]]


@torch.no_grad()
def write_rows(weight: object, vectors: torch.Tensor,
               rows_of: torch.Tensor | None = None) -> None:
    """Copy `vectors` into this worker's shards: vector i into row `rows_of[i]`, or (no
    `rows_of`) into row i (the table's first len(vectors) rows)."""
    for shard, (row, column) in local_shards(weight):
        rows, columns = shard.shape
        if rows_of is None:
            end = min(row + rows, len(vectors))
            if end > row:
                shard[:end - row].copy_(
                    vectors[row:end, column:column + columns].to(shard.dtype))
            continue
        mine = ((rows_of >= row) & (rows_of < row + rows)).nonzero().flatten()
        shard[rows_of[mine] - row] = vectors[mine, column:column + columns].to(shard.dtype)


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
        source = table.init_from_export
        vectors = read_vectors(source.path, table.num_embeddings, table.embedding_dim, what,
                               allow_fewer=True)
        rows_of = None
        if source.vocab is not None:
            rows_of = torch.from_numpy(rows_by_id(source.path, source.vocab,
                                                  table.num_embeddings, len(vectors), what))
        write_rows(weight, torch.from_numpy(vectors), rows_of)
        logger.info("table %s: %d rows from %s%s%s", table.name, len(vectors), source.path,
                    f" by id ({source.vocab})" if source.vocab else "",
                    " (frozen)" if table.frozen else "")
        done.append(table.name)
    return done
