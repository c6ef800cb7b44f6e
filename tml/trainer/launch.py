"""Starting and ending a run's workers the same way from every entry point.

`launch` is `maybe_run_training` with the config's `training.max_restarts`: a script,
`twhin train` and `tml launch` (tml.launch.common) all restart a failed worker group as the
config says (None: `TML_MAX_RESTARTS`, else 0). `finish_workers` is the last thing a worker
does: every rank leaves together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tml.common.run_training import maybe_run_training
from tml.core.config.training import TrainingConfig


def launch(train_fn: Callable[..., Any], module_name: str, training: TrainingConfig,
           nproc_per_node: int | None = None, **training_kwargs: Any) -> Any:
    """`maybe_run_training(train_fn, module_name, ...)` honouring `training.max_restarts`."""
    return maybe_run_training(train_fn, module_name, nproc_per_node=nproc_per_node,
                              max_restarts=training.max_restarts, **training_kwargs)


def finish_workers() -> None:
    """Leave together: barrier, then destroy the process group.

    Rank 0 may host the store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), and a rank still
    tearing down its process group when rank 0 exits aborts.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
