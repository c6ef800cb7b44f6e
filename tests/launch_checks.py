"""Run a check function in local gloo workers forked from the test process.

The checks in tests/*_checks.py are about what the workers compute (sharded steps,
checkpoints, metrics), not about how workers start: `launch_function`'s spawn path, torchrun
and the launchers have tests of their own (tests/tml/common/test_run_training.py,
tests/tml/launch/). Forked workers inherit the test process's imports, which saves each
worker the ~5-10 s of importing torch, TorchRec and fbgemm again, and they run one intra-op
thread (`tml.common.run_training._one_thread_when_forked`). `TML_TEST_SPAWN=1` spawns them
instead, as the checks ran before; so does a test process that has gRPC threads
(`tml.common.fork_safety`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tml.common.fork_safety import grpc_threads_running
from tml.common.run_training import launch_function


def launch_checks(fn: Callable[..., Any], nproc_per_node: int, *args: Any) -> dict[int, Any]:
    """`launch_function(fn, nproc_per_node, *args)` with forked workers, or spawned ones
    where a fork is unsafe (see the module)."""
    spawn = os.environ.get("TML_TEST_SPAWN") == "1" or grpc_threads_running()
    method = "spawn" if spawn else "fork"
    return launch_function(fn, nproc_per_node, *args, start_method=method)
