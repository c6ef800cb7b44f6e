"""A fault-injection hook for the crash and resume tests: kill one worker at a known step.

`TML_TEST_CRASH_AT_STEP=N` makes rank 1 (rank 0 in a 1-worker run) kill itself with
SIGKILL right after step N, on the first attempt of a torch elastic group only
(`TORCHELASTIC_RESTART_COUNT` 0), so the restarted group runs through. The tests of
restarts and of resume-equality use it to crash a real worker where they want; unset (as
in every real run), `maybe_crash` only reads one environment variable per step.

It lives apart from the training loop so that the loop's module holds only training; the
loop calls `maybe_crash(step)` once per step.
"""

from __future__ import annotations

import logging
import os
import signal

import torch.distributed as dist

logger = logging.getLogger(__name__)

CRASH_AT_STEP_ENV = "TML_TEST_CRASH_AT_STEP"


def crash_rank(world_size: int) -> int:
    """The rank that kills itself: rank 1, or rank 0 when it is alone."""
    return min(1, world_size - 1)


def maybe_crash(step: int) -> None:
    """SIGKILL this worker after `step` when `TML_TEST_CRASH_AT_STEP` says so (see above)."""
    crash_at = os.environ.get(CRASH_AT_STEP_ENV)
    if not crash_at or int(crash_at) != step:
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == crash_rank(world_size):
        logger.warning("%s=%s: killing rank %d at step %d (test hook)", CRASH_AT_STEP_ENV,
                       crash_at, rank, step)
        os.kill(os.getpid(), signal.SIGKILL)
