"""One worker's optimizer step without the wrappers around the optimizers that do the work.

Why: a TwHIN model's optimizer is a TorchRec `CombinedOptimizer` of the tables' fused
optimizers (nested `CombinedOptimizer`s down to one `EmbeddingFusedOptimizer` per kernel)
and a `KeyedOptimizerWrapper` around the dense optimizer. Each of those is a
`torch.optim.Optimizer`, so every `step()` and `zero_grad()` of each level runs torch's
profiling wrapper (a `record_function` and the step hooks), and the scheduler's wrapper on
the top: about a dozen wrappers a step around two pieces of work, the dense optimizer's
update and the fused kernels' learning rate (the tables were already updated in backward).
Measured at 5% of a 4000-edge CPU step and ~11% of a 250-edge one (docs/performance.md).

`DirectStep` does that work directly: the dense optimizers' `step()` / `zero_grad()` and
each fused kernel's `set_learning_rate(param_groups[0]["lr"])`, which is all that
TorchRec's `EmbeddingFusedOptimizer.step()` and `.zero_grad()` do (torchrec 1.8). So a step
changes the same numbers in the same order; an LR schedule still reaches every part,
through the same `param_groups`. An optimizer tree with any other part (gradient
accumulation's wrapper, another TorchRec kernel's optimizer, step hooks) is stepped as a
whole, as before. Used by the one-worker CPU loop (`tml.core.one_worker_pipeline`); several
workers keep TorchRec's pipeline, which calls the optimizer itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
from torchrec.distributed.batched_embedding_kernel import EmbeddingFusedOptimizer
from torchrec.optim.keyed import (
    CombinedOptimizer,
    KeyedOptimizer,
    KeyedOptimizerWrapper,
    OptimizerWrapper,
)

from tml.optimizers.combined import InBackwardOptimizer


def _parts(optimizer: Any) -> tuple[list[torch.optim.Optimizer], list[Any]] | None:
    """(dense optimizers, fused optimizers) under `optimizer`, or None where a part is
    of a kind whose step this module does not know to be only that."""
    if _has_hooks(optimizer):
        return None
    if type(optimizer) is CombinedOptimizer:
        dense: list[torch.optim.Optimizer] = []
        fused: list[Any] = []
        for _, part in optimizer.optimizers:
            found = _parts(part)
            if found is None:
                return None
            dense += found[0]
            fused += found[1]
        return dense, fused
    if type(optimizer) in (KeyedOptimizerWrapper, OptimizerWrapper):
        inner = optimizer._optimizer
        if isinstance(inner, KeyedOptimizer) or not isinstance(inner, torch.optim.Optimizer):
            return None
        return ([inner], []) if not _has_hooks(inner) else None
    if type(optimizer) is EmbeddingFusedOptimizer:
        return [], [optimizer]
    if type(optimizer) is InBackwardOptimizer:
        return [], []                     # its step and zero_grad do nothing
    return None


def _has_hooks(optimizer: Any) -> bool:
    return bool(getattr(optimizer, "_optimizer_step_pre_hooks", None)
                or getattr(optimizer, "_optimizer_step_post_hooks", None))


class DirectStep:
    """`step()` and `zero_grad()` of `optimizer`, calling only the parts that do work."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        parts = _parts(optimizer)
        self.direct = parts is not None
        self._dense, self._fused = parts if parts is not None else ([], [])

    def _set_fused_learning_rates(self) -> None:
        for fused in self._fused:
            fused._emb_module.set_learning_rate(fused.param_groups[0]["lr"])

    def step(self) -> None:
        if not self.direct or _global_optimizer_pre_hooks or _global_optimizer_post_hooks:
            self.optimizer.step()
            return
        # What the LR scheduler's wrapper of the top-level step records; without it the
        # scheduler would warn that it stepped before the optimizer.
        self.optimizer._opt_called = True
        self._set_fused_learning_rates()
        for dense in self._dense:
            if not _plain_sgd_step(dense):
                dense.step()

    def zero_grad(self) -> None:
        if not self.direct:
            self.optimizer.zero_grad()
            return
        self._set_fused_learning_rates()
        for dense in self._dense:
            if _is_plain_sgd(dense):
                for group in dense.param_groups:
                    for param in group["params"]:
                        param.grad = None
            else:
                dense.zero_grad()


def _is_plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """A `torch.optim.SGD` (no subclass) whose every group is `p -= lr * grad`: no momentum,
    weight decay, maximize, fused or differentiable update, a float lr, CPU parameters (the
    path torch takes there: its single-tensor loop), and zero_grad setting grads to None."""
    if type(optimizer) is not torch.optim.SGD or optimizer.state:
        return False
    if getattr(optimizer.zero_grad, "__func__", None) is not torch.optim.Optimizer.zero_grad:
        return False
    return all(not group["momentum"] and not group["weight_decay"] and not group["maximize"]
               and not group.get("fused") and not group.get("differentiable")
               and not group.get("foreach") and isinstance(group["lr"], float)
               and all(param.device.type == "cpu" for param in group["params"])
               for group in optimizer.param_groups)


def _plain_sgd_step(optimizer: torch.optim.Optimizer) -> bool:
    """`optimizer.step()` for a plain SGD (`_is_plain_sgd`): each parameter with a gradient
    gets `add_(grad, alpha=-lr)`, which is what torch's single-tensor SGD does for it, without
    the step's profiling wrapper and dispatch (~4% of a 4000-edge step). False (nothing
    done) for any other optimizer."""
    if not _is_plain_sgd(optimizer):
        return False
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.add_(param.grad, alpha=-group["lr"])
    optimizer._opt_called = True
    return True
