"""`LargeEmbeddings`: the configured tables as one TorchRec EmbeddingBagCollection.

Built on the meta device: no memory is allocated until `DistributedModelParallel` places
each shard on its worker, so a table far larger than one worker's memory can be declared.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType as TorchrecDataType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from tml.common.modules.embedding.config import DataType, LargeEmbeddingsConfig

_DATA_TYPES = {DataType.FP32: TorchrecDataType.FP32, DataType.FP16: TorchrecDataType.FP16}


def torchrec_table_configs(config: LargeEmbeddingsConfig) -> list[EmbeddingBagConfig]:
    """TorchRec table configs: one feature per table, named as the table, SUM pooling."""
    tables = []
    for table in config.tables:
        scale = table.init_scale or 1.0 / math.sqrt(table.embedding_dim)
        tables.append(EmbeddingBagConfig(
            name=table.name,
            embedding_dim=table.embedding_dim,
            num_embeddings=table.num_embeddings,
            feature_names=[table.name],
            pooling=PoolingType.SUM,
            data_type=_DATA_TYPES[table.data_type],
            weight_init_min=-scale,
            weight_init_max=scale,
        ))
    return tables


class LargeEmbeddings(nn.Module):
    """An EmbeddingBagCollection of the configured tables, on the meta device."""

    def __init__(self, config: LargeEmbeddingsConfig,
                 device: torch.device | str = "meta") -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=torchrec_table_configs(config),
                                          device=torch.device(device))

    def forward(self, sparse_features: KeyedJaggedTensor) -> KeyedTensor:
        return self.ebc(sparse_features)
