"""Where the edges come from and how they are batched."""

from __future__ import annotations

import pydantic

from tml.core.config.base_config import BaseConfig, Field


class TwhinDataConfig(BaseConfig):
    """A set of edge files (parquet with columns lhs, rel, rhs and optional weight).

    Every chunk read is checked: ids inside their tables, `rel` a configured relation, a
    weight a finite number >= 0 (a NaN, infinite or negative weight is refused with the
    file and 0-based row; it would make the loss NaN or reward wrong scores).

    Each rank reads its own contiguous, disjoint share of the rows of all matching files
    (sorted by path), cut into batches of `per_replica_batch_size`; all ranks get the same
    number of batches (the remainder of fewer than world_size * batch rows is dropped).
    """

    data_root: str = Field(..., description="Glob, directory or file of parquet edge files "
                           "(any fsspec URL). A directory means all *.parquet inside it.")
    per_replica_batch_size: pydantic.PositiveInt = Field(..., description="Positive edges "
                                                         "per rank per step.")
    global_negatives: pydantic.NonNegativeInt = Field(
        0, description="Negatives per positive edge and side drawn uniformly from the whole "
        "table of that side (lhs table for the lhs side, rhs table for the rhs side); looked "
        "up through the sharded tables with the batch.")
    shared_negatives: pydantic.NonNegativeInt = Field(
        0, description="Negatives drawn once per batch and table: this many ids uniform over "
        "each table, looked up once and scored against every positive whose relation uses "
        "that table on the side predicted (one B x K matrix product per side): hundreds of "
        "negatives per positive for the cost of K lookups per table.")
    in_batch_negatives: pydantic.NonNegativeInt = Field(
        ..., description="Negatives per positive edge and side, drawn from the same "
        "relation's rows of the batch.")
    limit: pydantic.PositiveInt | None = Field(None, description="Read at most this many "
                                               "batches per rank per epoch.")
    offset: pydantic.NonNegativeInt | None = Field(None, description="Skip this many batches "
                                                   "per rank first (to hold out a split of "
                                                   "the same files).")

    @pydantic.field_validator("data_root")
    @classmethod
    def _builtin_graph_place(cls, value: str) -> str:
        """local.yaml names the built-in graph by its place in a checkout (data/twhin);
        in an installation it lives in the cache directory instead (never in the
        installation): see projects/twhin/data/generate.py, builtin_graph_dir."""
        from .generate import resolve_builtin_path

        return resolve_builtin_path(value)
