"""Pick the device and start the process group: CUDA + NCCL on LOCAL_RANK, else CPU + gloo."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from tml.common.allocator import tune_malloc_for_training
from tml.common.process_group import init_worker_process_group

logger = logging.getLogger(__name__)


def setup_and_get_device(timeout_s: float = 1800.0) -> torch.device:
    """The device of this worker, with the default process group initialised.

    Outside torchrun (no WORLD_SIZE) a single-process group is started on a free local port,
    so the same training code runs in a plain `python` process, a notebook or a test.
    Also keeps per-step buffers in the heap (`tml.common.allocator`).
    """
    tune_malloc_for_training()
    device = torch.device("cpu")
    backend = "gloo"
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        backend = "nccl"
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ or (os.environ["WORLD_SIZE"] == "1" and
                                              "MASTER_ADDR" not in os.environ):
            # No launcher, or the one worker run in the launcher's process
            # (`run_training.run_one_worker_here`): no store to reach, no port to take.
            _init_single_process_group(backend, timeout_s)
        else:
            init_worker_process_group(backend, timedelta(seconds=timeout_s))
    return device


def _init_single_process_group(backend: str, timeout_s: float) -> None:
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1,
                            timeout=timedelta(seconds=timeout_s))
