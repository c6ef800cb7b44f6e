"""The ranker's embedding tables.

`large_embeddings`: one TorchRec EmbeddingBagCollection built on the meta device (nothing
allocated until `shard_model` places each shard on its worker), one feature per table
named as the table. `trainer_tables` states them as tml table configs: SGD at the configured
learning rate (0 for frozen tables), which `tml.trainer` fuses into the table kernels. `small_embeddings`: plain `nn.Embedding`s over discrete-feature
columns, trained by the dense optimizer.

`init_tables_from_exports` writes vectors of a `twhin export` (`<table>.parquet`: id,
vector, one row per table row in row order) into the tables after sharding: each worker
copies the rows of its own shards (table-, row- or column-wise), whatever the layout, with
tml's `tml.common.modules.embedding.vectors` (reading, checks, shard writes).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tml.common.modules.embedding import config as tml_embedding
from tml.common.modules.embedding.vectors import local_shards, read_vectors, write_rows
from tml.errors import ConfigError
from tml.optimizers.config import OptimizerConfig, SgdConfig

from ..embedding.config import LargeEmbeddingsConfig, SmallEmbeddingsConfig

__all__ = ["LargeEmbeddings", "SmallEmbeddings", "init_tables_from_exports", "is_frozen",
           "local_shards", "read_export", "trainer_tables"]


def is_frozen(table: object) -> bool:
    init = getattr(table, "init_from_export", None)
    return bool(init is not None and init.frozen)


def trainer_tables(config: LargeEmbeddingsConfig | None) -> list[tml_embedding.EmbeddingBagConfig]:
    """The large tables as tml table configs (SGD, its schedule, the sharding type; a
    frozen table is tml's `frozen`). Their vectors are written by `init_tables_from_exports`
    (which insists on one vector per row), so `init_from_export` is not passed on."""
    tables = []
    for table in (config.tables if config is not None else []):
        lr = config.optimizer.init_learning_rate  # type: ignore[union-attr]
        schedule = config.optimizer.learning_rate  # type: ignore[union-attr]
        tables.append(tml_embedding.EmbeddingBagConfig(
            name=table.name, num_embeddings=table.num_embeddings,
            embedding_dim=table.embedding_dim, sharding_type=table.sharding_type,
            frozen=is_frozen(table),
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
    """The `(rows, dim)` float32 vectors of a twhin export table file (exactly `rows`)."""
    return read_vectors(path, rows, dim, what)


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
        write_rows(state[keys[0]], vectors)
        done.append(table.name)
    return done
