"""Start a torch elastic worker's default process group so that a restarted group comes up.

Why this exists: under plain `torchrun --max-restarts N` (torch 2.13) the agent hosts one
TCP store for its workers and keeps it for every attempt (`TORCHELASTIC_USE_AGENT_STORE=True`,
the default unless `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`). `init_process_group("env://")`
connects to it under the fixed prefix `default_pg`, so a restarted worker reads the keys
the previous attempt left there: gloo's rank addresses of processes that are gone. Measured:
after `kill -9` of one of two TwHIN workers the restarted rank 1 tried the dead rank 0's
port ("Gloo connectFullMesh failed ... Connection refused") until the restart failed.

The fix: on attempts after the first (`TORCHELASTIC_RESTART_COUNT` > 0) with the agent's
store, the worker opens that store itself and starts the group under a prefix of its own
per attempt, so every attempt starts from empty keys. Every worker of one agent sees the
same restart count, so all of them agree on the prefix. The first attempt, and launches
without the shared store (tml's own launcher with restarts sets
`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`), go through torch's `env://` path unchanged.

Also here, because it must happen before any default group exists: importing
`torch.distributed.nn.functional` first. That module's collectives take `group=group.WORLD`
as a default argument, evaluated when it is imported; DDP and functional collectives import
it lazily, so in torch 2.13 it captured the live default group, which then outlived
`destroy_process_group` with gloo's threads running until interpreter teardown, where a
worker now and then aborted ("terminate called without an active exception") after a run
that had finished and saved (seen in CI on a restarted 2-worker run). Imported before the
group exists, the defaults hold None and the group is destroyed when asked.

Limit: agents restart together after a failure, so their counts agree across nodes; an
elastic membership change (a node joining a running job) restarts the old agents' workers
without counting a restart while the new agent starts at 0. tml launches a fixed number of
nodes, where that does not arise; torch's shared store mishandles that case with or
without this prefix.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch.distributed as dist

# Before any process group exists: see the module docstring (its defaults capture the group).
import torch.distributed.nn.functional  # noqa: F401  isort: skip

logger = logging.getLogger(__name__)


def restart_store_prefix() -> str | None:
    """The key prefix of this attempt's process group, or None to use torch's own set-up."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart in ("", "0"):
        return None
    return f"tml_attempt_{restart}/default_pg"


def init_worker_process_group(backend: str, timeout: timedelta) -> None:
    """`dist.init_process_group(backend)` from torchrun's environment, safe across restarts."""
    prefix = restart_store_prefix()
    if prefix is None:
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world_size, is_master=False, timeout=timeout)
    logger.info("restart %s: starting the process group under the store prefix %s",
                os.environ["TORCHELASTIC_RESTART_COUNT"], prefix)
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank,
                            world_size=world_size, timeout=timeout)
