"""Configuration of large embedding tables (a TorchRec EmbeddingBagCollection)."""

from __future__ import annotations

import enum

import pydantic

from tml.core.config.base_config import BaseConfig, Field
from tml.core.config.compat import compat_field
from tml.optimizers.config import OptimizerConfig


class DataType(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"


class ShardingType(str, enum.Enum):
    """How a table is split across workers (TorchRec sharding types)."""

    TABLE_WISE = "table_wise"
    ROW_WISE = "row_wise"
    COLUMN_WISE = "column_wise"


class ComputeKernel(str, enum.Enum):
    """Where a table's rows live and which fbgemm kernel looks them up (TorchRec's names).

    `fused` keeps the rows in the worker's memory (GPU memory on CUDA) with the optimizer
    fused into the kernel; the only kernel TorchRec runs on CPU. `fused_uvm` keeps them in
    host memory that the GPU reads through unified memory; `fused_uvm_caching` does the same
    with a cache of the hottest rows in GPU memory, for tables larger than the GPU. Both
    need CUDA.
    """

    FUSED = "fused"
    FUSED_UVM = "fused_uvm"
    FUSED_UVM_CACHING = "fused_uvm_caching"


class EmbeddingSnapshot(BaseConfig):
    emb_name: str = Field(..., description="Table name in the loaded checkpoint.")
    embedding_snapshot_uri: str = Field(..., description="Path of the checkpoint.")


class InitFromExport(BaseConfig):
    """Start a table from vectors in a parquet file (see tml.common.modules.embedding.vectors)."""

    path: str = Field(..., description="A `<table>.parquet` of a `twhin export` (or any "
                      "parquet with a column `vector` of embedding_dim floats), one row per "
                      "table row in row order; fewer rows than the table leave the rest "
                      "initialised as usual (a table grown by `twhin import --vocab`).")
    vocab: str | None = Field(None, description="Place vectors by id instead of by position: "
                              "a parquet of (id, row), e.g. the importer's "
                              "vocab/tables/<table>.parquet; each id of `path` (column `id`) "
                              "goes to its row here, and an id it lacks is refused.")


class EmbeddingBagConfig(BaseConfig):
    """One table: `num_embeddings` rows of `embedding_dim`, with its own fused optimizer
    (so each table has its own learning rate and schedule)."""

    name: str = Field(..., description="Table name (an entity type, e.g. user).")
    num_embeddings: pydantic.PositiveInt = Field(..., description="Rows.")
    embedding_dim: pydantic.PositiveInt = Field(..., description="Columns.")
    pretrained: EmbeddingSnapshot | None = Field(None, description="Not supported yet.")
    vocab: str | None = compat_field(None, "ids are mapped to rows by `twhin import`, "
                                     "whose vocab/ directory `twhin export` reads; "
                                     "init_from_export.vocab places vectors by id")
    optimizer: OptimizerConfig = Field(..., description="Fused into backward for this table.")
    data_type: DataType = Field(DataType.FP32, description="fp32 or fp16 weights.")
    sharding_type: ShardingType | None = Field(
        None, description="table_wise (default), row_wise or column_wise.")
    compute_kernel: ComputeKernel | None = Field(
        None, description="fused, fused_uvm or fused_uvm_caching (the last two need CUDA). "
        "Default: fused on CPU; on CUDA the planner keeps fused while the tables fit in GPU "
        "memory and falls back to fused_uvm_caching for what does not.")
    cache_load_factor: float | None = Field(
        None, gt=0, le=1, description="fused_uvm_caching only: the fraction of the "
        "table's rows cached in GPU memory (TorchRec's default 0.2).")
    init_scale: pydantic.PositiveFloat | None = Field(
        None, description="Initial weights uniform in [-s, s]; default 1/sqrt(embedding_dim).")
    init_from_export: InitFromExport | None = Field(
        None, description="Initial vectors from a parquet file, written after sharding (a "
        "checkpoint loaded later, to resume or warm start, replaces them).")
    frozen: bool = Field(False, description="Never update this table: its optimizer is "
                         "replaced by SGD at learning rate 0 (no optimizer state).")

    @pydantic.model_validator(mode="after")
    def _cache_needs_caching_kernel(self) -> EmbeddingBagConfig:
        if self.cache_load_factor is not None and \
                self.compute_kernel is not ComputeKernel.FUSED_UVM_CACHING:
            raise ValueError("cache_load_factor is only used with compute_kernel: "
                             "fused_uvm_caching")
        return self

    @pydantic.field_validator("pretrained")
    @classmethod
    def _no_pretrained(cls, value: EmbeddingSnapshot | None) -> EmbeddingSnapshot | None:
        if value is not None:
            raise ValueError("pretrained snapshots are not supported; use "
                             "init_from_export for vectors from a `twhin export`, or "
                             "training.initial_checkpoint_dir for a warm start")
        return value


class LargeEmbeddingsConfig(BaseConfig):
    """Tables gathered into one TorchRec EmbeddingBagCollection."""

    tables: list[EmbeddingBagConfig] = Field(..., description="The embedding tables.")
    tables_to_log: list[str] | None = compat_field(None, "no table contents are logged")

    @pydantic.field_validator("tables")
    @classmethod
    def _unique_names(cls, tables: list[EmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
        names = [table.name for table in tables]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"table name '{name}' is used twice")
        return tables
