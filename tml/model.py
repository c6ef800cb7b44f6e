"""Compatibility home of the original tml's `tml.model.maybe_shard_model`.

Deprecated: use `tml.common.sharding.shard_model`, which always shards. The alias keeps
the original's behaviour (the model as it is without a process group) and warns.
"""

from tml.common.sharding import maybe_shard_model, shard_model

__all__ = ["maybe_shard_model", "shard_model"]
