"""Embedding tables of the ranker: `large_embeddings` (sharded TorchRec tables looked up by
id) and `small_embeddings` (small tables over discrete features, inside the model).

The schema is the original recap one; additions (all optional) say which id column feeds a
table, how it is sharded, and where its initial vectors come from (a `twhin export`).
"""

from __future__ import annotations

import pydantic

from tml.common.modules.embedding.config import ShardingType
from tml.core.config.base_config import BaseConfig, Field
from tml.optimizers.config import LearningRate

from ..config_support import refuse_when_set


class EmbeddingSnapshot(BaseConfig):
    emb_name: str = Field(..., description="Table name in the snapshot (not supported).")
    embedding_snapshot_uri: str = Field(..., description="Snapshot path (not supported).")


class InitFromExport(BaseConfig):
    """Start a table from vectors a `twhin export` wrote (`<table>.parquet`: id, vector)."""

    path: str = Field(..., description="A `<table>.parquet` of a twhin export: one row per "
                      "table row, in row order, column `vector` of embedding_dim floats.")
    frozen: bool = Field(True, description="Keep the vectors fixed (learning rate 0) instead "
                         "of training them further.")


class EmbeddingBagConfig(BaseConfig):
    """One large table: `num_embeddings` rows of `embedding_dim`, looked up by an id column."""

    name: str = Field(..., description="Table name.")
    num_embeddings: pydantic.PositiveInt = Field(..., description="Rows (ids 0..N-1).")
    embedding_dim: pydantic.PositiveInt = Field(..., description="Columns.")
    pretrained: EmbeddingSnapshot | None = Field(None, description="Not supported; use "
                                                 "init_from_export.")
    vocab: str | None = Field(None, description="Not supported: ids must already be rows.")
    feature: str | None = Field(None, description="Data feature (after renaming, e.g. "
                                "meta__user_id) holding the row id; default the table name.")
    sharding_type: ShardingType | None = Field(None, description="table_wise (default), "
                                               "row_wise or column_wise.")
    init_from_export: InitFromExport | None = Field(None, description="Initial vectors.")

    _refuse = refuse_when_set("pretrained", "vocab")


class EmbeddingOptimizerConfig(BaseConfig):
    """The tables' optimizer: SGD (fused into the table kernels) at this learning rate."""

    learning_rate: LearningRate | None = Field(None, description="Schedule; default constant "
                                               "init_learning_rate.")
    init_learning_rate: float = Field(..., description="Initial (or constant) learning rate.")


class LargeEmbeddingsConfig(BaseConfig):
    """Tables gathered into one sharded TorchRec EmbeddingBagCollection."""

    tables: list[EmbeddingBagConfig] = Field(..., description="The tables.")
    optimizer: EmbeddingOptimizerConfig
    tables_to_log: list[str] | None = Field(None, description="Not supported.")

    _refuse = refuse_when_set("tables_to_log")

    @pydantic.field_validator("tables")
    @classmethod
    def _unique(cls, tables: list[EmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
        names = [t.name for t in tables]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"table name '{name}' is used twice")
        return tables


class StratifierConfig(BaseConfig):
    name: str
    index: int
    value: int


class SmallEmbeddingBagConfig(BaseConfig):
    """A small table over one column of the discrete features."""

    name: str = Field(..., description="Table name.")
    num_embeddings: pydantic.PositiveInt = Field(..., description="Rows; values outside "
                                                 "0..N-1 are a data error.")
    embedding_dim: pydantic.PositiveInt = Field(..., description="Columns.")
    index: pydantic.NonNegativeInt = Field(..., description="Column of the discrete features.")


class SmallEmbeddingsConfig(BaseConfig):
    """Small tables trained with the rest of the model by its dense optimizer."""

    tables: list[SmallEmbeddingBagConfig] = Field(..., description="The tables.")
