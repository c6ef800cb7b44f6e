"""One optimizer for a sharded model: fused table optimizers plus a dense optimizer.

`DistributedModelParallel` exposes the optimizers it fused into the table kernels as
`model.fused_optimizer`. An unwrapped model (one process, no DMP) has no such attribute —
the original tml failed there — so the fused part is then collected from the optimizers
that `apply_optimizer_in_backward` attached to each parameter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from tml.optimizers.config import LearningRate, OptimizerConfig, learning_rate_of
from tml.optimizers.optimizer import LRShim, get_optimizer_class, optimizer_kwargs

# The names of the combined optimizer's parts: in checkpoints (`optim.<key>.…`), in the
# learning rates of metrics.jsonl and TensorBoard (`lr/<key>`). A project names its dense
# part for what it holds (TwHIN: "operator_opt", the translations, as in the original);
# DENSE_OPT_KEY is the name for a project that has no reason to choose another.
FUSED_OPT_KEY = "fused_opt"
DENSE_OPT_KEY = "dense_opt"


class InBackwardOptimizer(KeyedOptimizer):
    """A parameter's optimizer that `apply_optimizer_in_backward` runs during backward.

    `step` and `zero_grad` do nothing: the update already happened in backward. Its
    `param_groups` are the in-backward optimizer's own, so an LR schedule set here reaches it.
    """

    def __init__(self, name: str, param: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        super().__init__({name: param}, optimizer.state, optimizer.param_groups)

    def step(self, closure: Any = None) -> None:
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None


def fused_optimizer_of(model: nn.Module) -> KeyedOptimizer:
    """The optimizers fused into backward: DMP's `fused_optimizer`, else per parameter."""
    fused = getattr(model, "fused_optimizer", None)
    if fused is not None:
        return fused
    optimizers = []
    for name, param in model.named_parameters():
        for index, optimizer in enumerate(getattr(param, "_in_backward_optimizers", [])):
            optimizers.append(("" if not index else str(index),
                               InBackwardOptimizer(name, param, optimizer)))
    return CombinedOptimizer(optimizers)


def build_combined_optimizer(
    model: nn.Module,
    dense_config: OptimizerConfig,
    table_schedules: Mapping[str, LearningRate],
    table_of_param: Callable[[str], str | None],
    *,
    dense_key: str,
) -> tuple[CombinedOptimizer, LRShim]:
    """`CombinedOptimizer([fused tables, dense rest])` and an LR scheduler for all groups.

    Args:
      model: the (usually DMP-wrapped) model, optimizers already applied in backward.
      dense_config: optimizer of the parameters not fused into tables.
      table_schedules: table name -> learning-rate schedule.
      table_of_param: maps a parameter name to its table name (None if not a table).
      dense_key: the name of the dense part (`DENSE_OPT_KEY`, or the project's own); it is
        part of the checkpoint's keys, so a project keeps it once it has checkpoints.
    """
    dense_params = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense_factory = functools.partial(get_optimizer_class(dense_config),
                                      **optimizer_kwargs(dense_config))
    parts: list[tuple[str, KeyedOptimizer]] = [(FUSED_OPT_KEY, fused_optimizer_of(model))]
    if dense_params:
        parts.append((dense_key, KeyedOptimizerWrapper(dense_params, dense_factory)))
    optimizer = CombinedOptimizer(parts)

    names_by_param = {id(p): name for name, p in optimizer.params.items()}
    schedules: dict[int, LearningRate] = {}
    dense_schedule = learning_rate_of(dense_config)
    for index, group in enumerate(optimizer.param_groups):
        names = [names_by_param.get(id(p), "") for p in group["params"]]
        tables = {table_of_param(name) for name in names} - {None}
        if not tables:
            schedules[index] = dense_schedule
            continue
        found = {table_schedules[t].model_dump_json() for t in tables if t in table_schedules}
        if len(found) > 1:
            raise ValueError(f"tables {sorted(tables)} share one fused kernel but have "
                             "different learning-rate schedules; give them the same schedule")
        schedules[index] = table_schedules[next(iter(sorted(tables)))]
    return optimizer, LRShim(optimizer, schedules)


def lr_per_group(optimizer: torch.optim.Optimizer) -> list[float]:
    """Current learning rate of each parameter group, for logs and tests."""
    return [float(group["lr"]) for group in optimizer.param_groups]
