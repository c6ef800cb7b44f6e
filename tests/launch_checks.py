"""Run a check function in local gloo workers forked from the test process.

The checks in tests/*_checks.py are about what the workers compute (sharded steps,
checkpoints, metrics), not about how workers start: `launch_function`'s spawn path, torchrun
and the launchers have tests of their own (tests/tml/common/test_run_training.py,
tests/tml/launch/). Forked workers inherit the test process's imports, which saves each
worker the ~5-10 s of importing torch, TorchRec and fbgemm again, and they run one intra-op
thread (`tml.common.run_training._one_thread_when_forked`). `TML_TEST_SPAWN=1` spawns them
instead, as the checks ran before; so does a test process that has gRPC threads (below).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tml.common.run_training import launch_function


def has_grpc_threads() -> bool:
    """This process runs gRPC threads (Arrow Flight's transport): once a Flight client or
    server was made in a process, gRPC keeps its threads for the life of the process, and a
    fork copies their locks mid-use. Seen: the reader tests' in-process Flight client, then
    a forked checkpoint check in the same pytest process hung in its workers."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:   # no procfs: no way to tell, and no such test ran here before
        return False
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
        except OSError:   # the thread ended meanwhile
            continue
        if name.startswith(("grpc", "event_engine")):
            return True
    return False


def launch_checks(fn: Callable[..., Any], nproc_per_node: int, *args: Any) -> dict[int, Any]:
    """`launch_function(fn, nproc_per_node, *args)` with forked workers, or spawned ones
    where a fork is unsafe (see the module)."""
    spawn = os.environ.get("TML_TEST_SPAWN") == "1" or has_grpc_threads()
    method = "spawn" if spawn else "fork"
    return launch_function(fn, nproc_per_node, *args, start_method=method)
