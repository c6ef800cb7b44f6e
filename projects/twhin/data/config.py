"""Where the edges come from and how they are batched."""

from __future__ import annotations

import pydantic

from tml.core.config.base_config import BaseConfig, Field


class TwhinDataConfig(BaseConfig):
    """A set of edge files (parquet with columns lhs, rel, rhs and optional weight).

    Each rank reads its own contiguous, disjoint share of the rows of all matching files
    (sorted by path), cut into batches of `per_replica_batch_size`; all ranks get the same
    number of batches (the remainder of fewer than world_size * batch rows is dropped).
    """

    data_root: str = Field(..., description="Glob, directory or file of parquet edge files "
                           "(any fsspec URL). A directory means all *.parquet inside it.")
    per_replica_batch_size: pydantic.PositiveInt = Field(..., description="Positive edges "
                                                         "per rank per step.")
    global_negatives: int = Field(0, description="Not supported yet; must be 0.")
    in_batch_negatives: pydantic.NonNegativeInt = Field(
        ..., description="Negatives per positive edge and side, drawn from the same "
        "relation's rows of the batch.")
    limit: pydantic.PositiveInt | None = Field(None, description="Read at most this many "
                                               "batches per rank per epoch.")
    offset: pydantic.NonNegativeInt | None = Field(None, description="Skip this many batches "
                                                   "per rank first (to hold out a split of "
                                                   "the same files).")

    @pydantic.field_validator("global_negatives")
    @classmethod
    def _no_global_negatives(cls, value: int) -> int:
        if value != 0:
            raise ValueError("global_negatives is not supported yet; set it to 0 and use "
                             "in_batch_negatives")
        return value
