"""Compatibility home of `maybe_shard_model` (the original tml's `tml.model`)."""

from tml.common.sharding import maybe_shard_model

__all__ = ["maybe_shard_model"]
