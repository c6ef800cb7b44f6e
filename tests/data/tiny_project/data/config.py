"""The data section (the doc's step 2)."""

from __future__ import annotations

import pydantic

from tml.core.config.base_config import BaseConfig, Field


class TinyDataConfig(BaseConfig):
    """One parquet file of (user, item, label) rows."""

    path: str = Field(..., description="A parquet file with int64 user and item columns and "
                      "a 0/1 label column.")
    per_replica_batch_size: pydantic.PositiveInt = Field(..., description="Rows per batch "
                                                         "per worker.")
