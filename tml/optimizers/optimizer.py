"""Optimizer classes and learning-rate schedules built from `OptimizerConfig`."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from tml.optimizers.config import (
    LearningRate,
    OptimizerConfig,
    get_optimizer_algorithm_config,
)


def get_optimizer_class(optimizer_config: OptimizerConfig) -> type[torch.optim.Optimizer]:
    """torch optimizer class of the configured algorithm (TorchRec fuses these into TBEs)."""
    if optimizer_config.adam is not None:
        return torch.optim.Adam
    if optimizer_config.sgd is not None:
        return torch.optim.SGD
    if optimizer_config.adagrad is not None:
        return torch.optim.Adagrad
    raise ValueError("no optimizer selected")


def optimizer_kwargs(optimizer_config: OptimizerConfig) -> dict:
    """Keyword arguments for the optimizer class."""
    kwargs = get_optimizer_algorithm_config(optimizer_config).model_dump()
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return kwargs


def compute_lr(lr_config: LearningRate, step: int) -> float:
    """Learning rate at `step` (0-based) under the schedule."""
    if lr_config.constant is not None:
        return lr_config.constant
    if lr_config.piecewise_constant is not None:
        pc = lr_config.piecewise_constant
        index = sum(1 for boundary in pc.learning_rate_boundaries if step >= boundary)
        return pc.learning_rate_values[index]
    if lr_config.linear_ramp_to_constant is not None:
        ramp = lr_config.linear_ramp_to_constant
        return ramp.learning_rate * min(1.0, step / ramp.num_ramp_steps)
    if lr_config.linear_ramp_to_cosine is not None:
        cfg = lr_config.linear_ramp_to_cosine
        if step < cfg.num_ramp_steps:
            return cfg.learning_rate * step / cfg.num_ramp_steps
        if step >= cfg.final_num_steps:
            return cfg.final_learning_rate
        progress = (step - cfg.num_ramp_steps) / max(1, cfg.final_num_steps - cfg.num_ramp_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.final_learning_rate + (cfg.learning_rate - cfg.final_learning_rate) * cosine
    raise ValueError("no learning rate schedule selected")


class LRShim(torch.optim.lr_scheduler.LRScheduler):
    """Per-parameter-group schedules for a combined optimizer.

    `group_schedules[i]` is the schedule of `optimizer.param_groups[i]`. TorchRec's fused
    embedding optimizers read `param_groups[0]["lr"]` in `step()` / `zero_grad()`, so a
    schedule set here reaches the fused kernels too.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 group_schedules: Mapping[int, LearningRate], last_epoch: int = -1) -> None:
        if len(group_schedules) != len(optimizer.param_groups):
            raise ValueError(f"{len(group_schedules)} schedules for "
                             f"{len(optimizer.param_groups)} parameter groups")
        self.group_schedules = dict(group_schedules)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # noqa: D102 (torch API)
        return [compute_lr(self.group_schedules[i], self.last_epoch)
                for i in range(len(self.optimizer.param_groups))]
