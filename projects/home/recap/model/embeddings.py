"""The ranker's embedding tables.

`large_embeddings`: one TorchRec EmbeddingBagCollection built on the meta device (nothing
allocated until `maybe_shard_model` places each shard on its worker), one feature per table
named as the table. `trainer_tables` states them as tml table configs: SGD at the configured
learning rate (0 for frozen tables), which `tml.trainer` fuses into the table kernels. `small_embeddings`: plain `nn.Embedding`s over discrete-feature
columns, trained by the dense optimizer.

`init_tables_from_exports` writes vectors of a `twhin export` (`<table>.parquet`: id,
vector, one row per table row in row order) into the tables after sharding: each worker
copies the rows of its own shards (table-, row- or column-wise), whatever the layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from projects.home.recap.embedding.config import LargeEmbeddingsConfig, SmallEmbeddingsConfig
from tml.common.modules.embedding import config as tml_embedding
from tml.errors import ConfigError, DataError, error_line
from tml.optimizers.config import LearningRate, OptimizerConfig, SgdConfig


def is_frozen(table: object) -> bool:
    init = getattr(table, "init_from_export", None)
    return bool(init is not None and init.frozen)


def trainer_tables(config: LargeEmbeddingsConfig | None) -> list[tml_embedding.EmbeddingBagConfig]:
    """The large tables as tml table configs (SGD, its schedule, the sharding type)."""
    tables = []
    for table in (config.tables if config is not None else []):
        if is_frozen(table):
            lr, schedule = 0.0, LearningRate(constant=0.0)
        else:
            lr = config.optimizer.init_learning_rate  # type: ignore[union-attr]
            schedule = config.optimizer.learning_rate  # type: ignore[union-attr]
        tables.append(tml_embedding.EmbeddingBagConfig(
            name=table.name, num_embeddings=table.num_embeddings,
            embedding_dim=table.embedding_dim, sharding_type=table.sharding_type,
            optimizer=OptimizerConfig(sgd=SgdConfig(lr=lr), learning_rate=schedule)))
    return tables


class LargeEmbeddings(nn.Module):
    """The large tables as one EmbeddingBagCollection; output `[B, sum of dims]` in config
    order (looked up by name: sharded outputs come in rank order)."""

    def __init__(self, config: LargeEmbeddingsConfig, device: str = "meta") -> None:
        super().__init__()
        self.names = [t.name for t in config.tables]
        tables = []
        for table in config.tables:
            scale = 1.0 / math.sqrt(table.embedding_dim)
            tables.append(EmbeddingBagConfig(
                name=table.name, embedding_dim=table.embedding_dim,
                num_embeddings=table.num_embeddings, feature_names=[table.name],
                pooling=PoolingType.SUM, weight_init_min=-scale, weight_init_max=scale))
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device(device))
        self.out_features = sum(t.embedding_dim for t in config.tables)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(features).to_dict()
        return torch.cat([pooled[name] for name in self.names], dim=1)


class SmallEmbeddings(nn.Module):
    """One embedding per configured discrete column, concatenated."""

    def __init__(self, config: SmallEmbeddingsConfig) -> None:
        super().__init__()
        self.indices = [t.index for t in config.tables]
        self.tables = nn.ModuleList(nn.Embedding(t.num_embeddings, t.embedding_dim)
                                    for t in config.tables)
        self.out_features = sum(t.embedding_dim for t in config.tables)

    def forward(self, discrete: torch.Tensor) -> torch.Tensor:
        return torch.cat([table(discrete[:, index].long())
                          for index, table in zip(self.indices, self.tables)], dim=1)


def read_export(path: str, rows: int, dim: int, what: str) -> np.ndarray:
    """The `(rows, dim)` float32 vectors of a twhin export table file."""
    try:
        table = pq.read_table(path, columns=["vector"])
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} not found") from None
    except (OSError, pa.ArrowException, ValueError, KeyError) as error:
        raise DataError(f"{path}: cannot read a twhin export table: {error_line(error)}") \
            from None
    column = table.column("vector").combine_chunks()
    kind = column.type
    if not (pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)) or \
            not pa.types.is_floating(kind.value_type):
        raise DataError(f"{path}: column 'vector' has type {kind}; expected a list of floats")
    if len(column) != rows:
        raise DataError(f"{path}: {len(column)} vectors; {what} has {rows} rows")
    if column.null_count or column.flatten().null_count:
        raise DataError(f"{path}: column 'vector' holds nulls")
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if flat.size != rows * dim:
        raise DataError(f"{path}: vectors are not all of {dim} values ({what}'s embedding_dim)")
    values = flat.reshape(rows, dim)
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


@torch.no_grad()
def init_tables_from_exports(model: nn.Module, config: LargeEmbeddingsConfig) -> list[str]:
    """Copy each configured export into its table's local shards; the tables done."""
    state = model.state_dict(keep_vars=True)
    done = []
    for table in config.tables:
        if table.init_from_export is None:
            continue
        what = f"model.large_embeddings table '{table.name}'"
        keys = [k for k in state if k.endswith(f"ebc.embedding_bags.{table.name}.weight")]
        if len(keys) != 1:
            raise ConfigError(f"{what}: not found in the model")
        vectors = torch.from_numpy(read_export(table.init_from_export.path,
                                               table.num_embeddings, table.embedding_dim, what))
        for shard, (row, column) in local_shards(state[keys[0]]):
            rows, columns = shard.shape
            shard.copy_(vectors[row:row + rows, column:column + columns].to(shard.dtype))
        done.append(table.name)
    return done
