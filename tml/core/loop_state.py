"""The training loop's own state in a checkpoint, beside the model and the optimizer.

`tml.common.checkpointing` saves and loads any mapping of stateful parts; what the loop
needs to continue where it stopped is defined here, by the loop: `TrainState` (the step,
the data position, the training time so far) and `SchedulerState` (the learning-rate
schedule's position). The loop checkpoints them as the parts `train` and `scheduler`, so a
checkpoint holds `train.step`, `train.batches_consumed`, `train.wall_time` and
`scheduler.last_epoch` (the names every checkpoint so far has used).

`EVALUATION_FILE`: what the only-evaluate mode writes into a checkpoint it evaluated.
"""

from __future__ import annotations

from typing import Any

import torch

EVALUATION_FILE = "evaluation.json"


class TrainState:
    """The small state of the loop that must survive a restart.

    step: the last completed step; batches_consumed: the data position; wall_time: seconds
    spent training so far, summed over restarts.
    """

    def __init__(self) -> None:
        self.step = 0
        self.batches_consumed = 0
        self.wall_time = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step), "batches_consumed":
                torch.tensor(self.batches_consumed),
                "wall_time": torch.tensor(self.wall_time, dtype=torch.float64)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.batches_consumed = int(state_dict["batches_consumed"])
        self.wall_time = float(state_dict.get("wall_time", 0.0))


class SchedulerState:
    """The LR scheduler's position as a tensor (its own state dict holds Python objects).

    On load the scheduler is moved to the saved step and the learning rates recomputed.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": torch.tensor(int(self.scheduler.last_epoch))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_schedule_step(self.scheduler, int(state_dict["last_epoch"]))


def set_schedule_step(scheduler: Any, step: int) -> None:
    """Put `scheduler` at `step` and set each group's learning rate for that step."""
    if scheduler is None:
        return
    scheduler.last_epoch = step
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr
