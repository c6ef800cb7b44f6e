"""The training loop: TorchRec's sparse-dist pipeline, logs, evaluation and checkpoints.

`train` is what every project calls after building its model and optimizer. It runs
`TrainPipelineSparseDist` (which overlaps the next batch's embedding all-to-all with the
current step, on CPU as on GPU), logs step / loss / steps/s / examples/s every
`logging_interval` steps, evaluates through a callback, saves a DCP checkpoint every
`checkpoint_frequency` steps and at the end, and resumes from the newest complete
checkpoint in `save_dir` — at the same step, the same optimizer state and the same place in
the data (the dataset must offer `state_dict` / `load_state_dict` of its position).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from tml.common.checkpointing import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What a finished `train` call did."""

    start_step: int
    final_step: int
    last_loss: float | None
    checkpoint: str | None
    eval_metrics: dict[str, float]
    resumed_from: str | None


class _AccumulatingOptimizer:
    """Steps the wrapped optimizer every `n` batches (gradients averaged over them).

    Embedding tables with fused optimizers still update in every backward; this applies to
    the dense parameters (the translations in TwHIN).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, n: int) -> None:
        self.optimizer = optimizer
        self.n = n
        self.calls = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.calls % self.n == 0:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> None:
        self.calls += 1
        if self.calls % self.n == 0:
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.div_(self.n)
            self.optimizer.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


def _progress_bar(total: int, initial: int):  # noqa: ANN202
    is_rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if not (is_rank0 and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _set_schedule_step(scheduler: Any, step: int) -> None:
    if scheduler is None:
        return
    scheduler.last_epoch = step
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_lr()):
        group["lr"] = lr


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    save_dir: str,
    logging_interval: int,
    train_steps: int,
    checkpoint_frequency: int,
    dataset: Iterable,
    worker_batch_size: int,
    num_workers: int = 0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    initial_checkpoint_dir: str | None = None,
    gradient_accumulation: int | None = None,
    checkpoint_max_to_keep: int | None = None,
    evaluate_fn: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
    eval_every_n: int | None = None,
) -> TrainResult:
    """Train `model` (returns `(loss, outputs)`) for up to `train_steps` steps.

    Args:
      model: the DMP-wrapped model-and-loss.
      optimizer: the combined optimizer (fused tables + dense).
      device: this worker's device.
      save_dir: checkpoints go to `save_dir/<step>`; the newest is resumed.
      logging_interval: log every N steps.
      train_steps: the last step; training also ends when `dataset` runs out.
      checkpoint_frequency: save every N steps (and always at the end).
      dataset: iterable of Pipelineable batches, with `state_dict`/`load_state_dict` of its
        position and `len()` (batches per epoch) when resumable.
      worker_batch_size: examples per step summed over workers (for examples/s).
      scheduler: stepped once per step.
      initial_checkpoint_dir: warm start (weights only, step 0) when save_dir has none.
      gradient_accumulation: step the dense optimizer every N batches.
      evaluate_fn: `evaluate_fn(model, step) -> metrics`, called every `eval_every_n` steps
        and at the end, on every rank (it may run collectives).
    """
    del num_workers  # reading happens in the dataset's own iterator
    train_state = TrainState()
    parts: dict[str, Any] = {"model": model, "optim": optimizer, "train": train_state}
    resumed_from = latest_checkpoint(save_dir)
    if resumed_from is not None:
        load_checkpoint(resumed_from, parts)
        logger.info("resumed from %s at step %d", resumed_from, train_state.step)
    elif initial_checkpoint_dir:
        load_checkpoint(initial_checkpoint_dir, {"model": model})
        logger.info("warm start: weights from %s, starting at step 0", initial_checkpoint_dir)
    start_step = train_state.step
    _set_schedule_step(scheduler, start_step)

    if start_step >= train_steps:
        logger.info("the checkpoint %s already reached step %d (the run ends at step %d); "
                    "nothing to train", resumed_from, start_step, train_steps)
        return TrainResult(start_step, start_step, None, resumed_from, {}, resumed_from)

    _seek(dataset, train_state.batches_consumed)
    step_optimizer = optimizer if not gradient_accumulation or gradient_accumulation == 1 \
        else _AccumulatingOptimizer(optimizer, gradient_accumulation)
    pipeline = TrainPipelineSparseDist(model, step_optimizer, device)  # type: ignore[arg-type]
    data_iter = iter(dataset)
    model.train()

    step = start_step
    losses: list[torch.Tensor] = []
    last_loss: float | None = None
    eval_metrics: dict[str, float] = {}
    checkpoint: str | None = resumed_from
    bar = _progress_bar(train_steps, start_step)
    interval_start, interval_steps = time.perf_counter(), 0
    while step < train_steps:
        try:
            outputs = pipeline.progress(data_iter)
        except StopIteration:
            logger.info("the training data is used up after step %d", step)
            break
        step += 1
        interval_steps += 1
        train_state.step = step
        train_state.batches_consumed += 1
        if scheduler is not None:
            scheduler.step()
        losses.append(outputs["loss"].detach())
        if bar is not None:
            bar.update(1)
        if step % logging_interval == 0:
            last_loss = float(torch.stack(losses).mean())
            elapsed = time.perf_counter() - interval_start
            rate = interval_steps / max(elapsed, 1e-9)
            logger.info("step %d: loss %.5f, %.1f steps/s, %.0f examples/s", step, last_loss,
                        rate, rate * worker_batch_size)
            losses, interval_start, interval_steps = [], time.perf_counter(), 0
        if evaluate_fn is not None and eval_every_n and step % eval_every_n == 0 \
                and step < train_steps:
            eval_metrics = _evaluate(pipeline, evaluate_fn, step)
        if step % checkpoint_frequency == 0 and step < train_steps:
            checkpoint = save_checkpoint(save_dir, step, parts, checkpoint_max_to_keep)
    if bar is not None:
        bar.close()
    if losses:
        last_loss = float(torch.stack(losses).mean())

    model = pipeline.detach()
    if evaluate_fn is not None:
        eval_metrics = evaluate_fn(model, step)
        model.train()
    if step > start_step and checkpoint != os.path.join(save_dir, str(step)):
        checkpoint = save_checkpoint(save_dir, step, parts, checkpoint_max_to_keep)
    return TrainResult(start_step, step, last_loss, checkpoint, eval_metrics, resumed_from)


def _seek(dataset: Any, batches_consumed: int) -> None:
    """Put a resumable dataset at the batch after the last one trained on."""
    if not batches_consumed:
        return
    if not hasattr(dataset, "load_state_dict"):
        logger.warning("the dataset cannot seek: resuming reads the data from its start")
        return
    per_epoch = len(dataset)
    dataset.load_state_dict({"epoch": batches_consumed // per_epoch,
                             "batch": batches_consumed % per_epoch})


def _evaluate(pipeline: TrainPipelineSparseDist, evaluate_fn: Callable, step: int) -> dict:
    model = pipeline.detach()
    try:
        return evaluate_fn(model, step)
    finally:
        model.train()
        pipeline.attach(model)
