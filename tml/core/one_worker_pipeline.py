"""The training step of one CPU worker, without TorchRec's sparse-dist pipeline.

Why: `TrainPipelineSparseDist` overlaps the next batches' embedding input dists (all-to-alls
of ids between workers) and their host-to-device copies with the current step. One worker
on CPU has neither to overlap: its dists are local (`tml.common.sharding`) and its batches
are already in host memory. What is left of the pipeline is its bookkeeping per step
(contexts, awaitables, the model rewritten by torch.fx so that each sharded module's input
dist runs a step ahead), measured at ~8% of a one-worker CPU step (docs/performance.md).
This pipeline runs the step as written: zero the gradients, forward, backward, optimizer
step, in the same order and with the same random draws, so the numbers are the same
(tests/tml/common/test_one_worker.py). The optimizer is stepped through
`tml.optimizers.direct_step.DirectStep`: the same work without TorchRec's and torch's
wrappers around each level of the combined optimizer.

`train_pipeline` picks it for one worker on CPU and TorchRec's pipeline otherwise (several
workers, or a GPU, whose copies and all-to-alls the pipeline overlaps).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from tml.optimizers.direct_step import DirectStep


class OneWorkerTrainPipeline:
    """`progress` / `attach` / `detach` as in TorchRec's `TrainPipelineSparseDist`, for a
    model whose forward returns `(losses, outputs)`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device) -> None:
        self._model = model
        self._optimizer = optimizer
        self._step = DirectStep(optimizer)
        self._device = device

    def progress(self, dataloader_iter: Iterator[Any]) -> Any:
        """One step on the next batch; `StopIteration` when the data is used up."""
        batch = next(dataloader_iter)
        if self._device.type != "cpu":
            batch = batch.to(self._device, non_blocking=True)
        if not self._model.training:
            return self._model(batch)[1]
        self._step.zero_grad()
        losses, outputs = self._model(batch)
        torch.sum(losses, dim=0).backward()
        self._step.step()
        return outputs

    def attach(self, model: nn.Module | None = None) -> None:
        if model is not None:
            self._model = model

    def detach(self) -> nn.Module:
        return self._model


def one_worker_on_cpu(device: torch.device) -> bool:
    """Whether this process trains alone on CPU (no process group, or a world of one)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return world_size == 1 and device.type == "cpu"


def train_pipeline(model: nn.Module, optimizer: torch.optim.Optimizer,
                   device: torch.device) -> OneWorkerTrainPipeline | TrainPipelineSparseDist:
    """`OneWorkerTrainPipeline` for one worker on CPU, else TorchRec's pipeline."""
    if one_worker_on_cpu(device):
        return OneWorkerTrainPipeline(model, optimizer, device)
    return TrainPipelineSparseDist(model, optimizer, device)  # type: ignore[arg-type]
