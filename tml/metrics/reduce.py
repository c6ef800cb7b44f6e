"""Values averaged over workers: what a log line or a metrics record should show."""

from __future__ import annotations

import torch
import torch.distributed as dist


def global_mean(value: torch.Tensor) -> float:
    """The mean of `value` (a scalar per rank) over every rank; collective.

    Every rank must call it at the same point. Without a process group: `value` itself.
    """
    reduced = value.detach().reshape(()).double().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(reduced)
        reduced /= dist.get_world_size()
    return float(reduced)
