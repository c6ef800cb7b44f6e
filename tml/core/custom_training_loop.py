"""The training loop: TorchRec's sparse-dist pipeline, logs, evaluation and checkpoints.

`train` is what every project calls after building its model and optimizer. It runs
TorchRec's `TrainPipelineSparseDist` (which overlaps the next batch's embedding all-to-all
with the current step) with several workers or on GPU, and the plain step of
`tml.core.one_worker_pipeline` for one worker on CPU (nothing to overlap there), logs step / loss / steps/s / examples/s every
`logging_interval` steps, evaluates through a callback, saves a DCP checkpoint every
`checkpoint_frequency` steps and at the end (asynchronously when asked: training goes on
while the files are written), and resumes from the newest complete checkpoint in
`save_dir` — at the same step, the same optimizer state, the same LR schedule position and
the same place in the data (the dataset must offer `state_dict` / `load_state_dict` of its
position). `evaluate_checkpoints` is the `only_evaluate` mode: it follows a save_dir and
evaluates each new complete checkpoint once.

Records: every log step and evaluation goes to `save_dir/metrics.jsonl` and TensorBoard
(`tml.core.run_records`); the logged loss is the mean over every worker. Early stopping
(`tml.core.early_stopping`) ends the run when a validation metric stops improving, and the
checkpoint of its best evaluation is written, marked (`best.json`) and kept.

Determinism across restarts: with `seed` set, the torch RNG is re-seeded before every step
from (seed, step, world size, rank), so a run resumed from a checkpoint draws the same
random numbers (TwHIN's in-batch negatives) as a run that was never interrupted.

Divergence: a loss that turns non-finite (nan or inf: a learning rate far too large, bad
edge weights) stops the run with a `TrainingDivergedError` naming the first such step,
before any checkpoint of non-finite values is written; the earlier checkpoints stay. Nothing
is added to a step: the per-step losses the log line averages stay on their device and are
checked at every log step and before every checkpoint, the first bad step all-reduced (MIN,
so that every rank stops together and none waits in a collective); before a checkpoint the
state to be saved is checked too (a finite loss can come with an infinite update).

The crash and resume tests kill a worker at a known step through `tml.core.crash_hook`
(`TML_TEST_CRASH_AT_STEP`), called once per step; it does nothing in a real run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from tml.common.atomic_file import write_json_atomic
from tml.common.checkpointing import (
    Checkpointer,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    read_metadata,
)
from tml.common.prefetch import prefetch
from tml.core.crash_hook import maybe_crash
from tml.core.early_stopping import EarlyStopping, mark_best
from tml.core.loop_state import EVALUATION_FILE, SchedulerState, TrainState, set_schedule_step
from tml.core.one_worker_pipeline import OneWorkerTrainPipeline, train_pipeline
from tml.core.run_records import RunRecorder, learning_rates, record_checkpoint_evaluation
from tml.errors import CheckpointError, TmlError
from tml.metrics.reduce import global_mean

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
    # Seconds in the training loop itself (data reading included; set-up, the final
    # evaluation and checkpoint excluded): what throughput figures divide by.
    train_seconds: float = 0.0
    # Early stopping ended the run before train_steps; the best checkpoint (if tracked).
    stopped_early: bool = False
    best_checkpoint: str | None = None


class TrainingDivergedError(TmlError):
    """The loss or the weights became non-finite; training stopped before saving them."""


_NO_BAD_STEP = 2 ** 62


def _check_finite(losses: list[torch.Tensor], first_step: int, step: int,
                  device: torch.device, state: Any = None,
                  last_checkpoint: str | None = None) -> None:
    """Raise `TrainingDivergedError` on every rank if a loss or the state is non-finite.

    `losses` are the per-step losses kept for the log line anyway (still on their device,
    `losses[i]` of step `first_step + i`): nothing is added to a step, and the one host
    sync is here. Collective: every rank calls it at the same steps (log steps, before each
    checkpoint); the first bad step and whether all of `state` (what is about to be saved)
    is finite are all-reduced (MIN), so every rank stops together and none is left waiting
    in a collective.
    """
    if losses:
        values = torch.stack([loss.reshape(()) for loss in losses]).to(device)
        steps = torch.arange(first_step, first_step + len(losses), device=device)
        bad_step = torch.where(torch.isfinite(values), _NO_BAD_STEP, steps).min()
    else:
        bad_step = torch.tensor(_NO_BAD_STEP, device=device)
    state_ok = _all_finite(state, device) if state is not None \
        else torch.ones((), dtype=torch.long, device=device)
    flags = torch.stack([bad_step.reshape(()).long(), state_ok.reshape(()).long()])
    if dist.is_initialized() and dist.get_world_size() > 1:   # one rank: nothing to agree on
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    first_bad, all_ok = (int(x) for x in flags.tolist())
    kept = f"the last checkpoint is {last_checkpoint}" if last_checkpoint \
        else "no checkpoint was written"
    advice = "lower the learning rate or check the edge weights"
    if first_bad != _NO_BAD_STEP:
        raise TrainingDivergedError(
            f"training diverged: the loss became non-finite (nan or inf) at step "
            f"{first_bad}; stopped at step {step} without saving it ({kept}); {advice}")
    if not all_ok:
        raise TrainingDivergedError(
            f"training diverged: the weights or optimizer state became non-finite by "
            f"step {step} (the loss was still finite); stopped without saving them "
            f"({kept}); {advice}")


def _local_tensors(value: Any) -> Iterable[torch.Tensor]:
    """The local tensors of a state dict tree (DTensor and ShardedTensor: this rank's part)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _local_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _local_tensors(item)
    elif hasattr(value, "to_local"):                     # DTensor
        yield from _local_tensors(value.to_local())
    elif hasattr(value, "local_shards"):                 # ShardedTensor, LocalShardsWrapper
        for shard in value.local_shards():
            yield from _local_tensors(getattr(shard, "tensor", shard))
    elif isinstance(value, torch.Tensor):
        yield value


_FINITE_CHECK_CHUNK = 1 << 20   # elements checked at a time


def _all_finite(state: Any, device: torch.device) -> torch.Tensor:
    """1 (long, on `device`) if every floating-point tensor in `state` is finite, else 0.

    Checked in chunks of `_FINITE_CHECK_CHUNK` elements: `isfinite` of a whole table makes
    temporaries of the table's size (an `abs` copy and boolean masks: 1.7x the bytes of a
    100M-row table, measured by tests/benchmarks/test_scale.py), which a large table cannot afford.
    """
    ok = torch.ones((), dtype=torch.bool, device=device)
    for tensor in _local_tensors(state):
        if not tensor.is_floating_point() or not tensor.numel():
            continue
        rows = tensor.reshape(1) if tensor.dim() == 0 else tensor
        per_row = max(1, rows.numel() // rows.shape[0])
        for chunk in rows.split(max(1, _FINITE_CHECK_CHUNK // per_row)):
            ok = ok & torch.isfinite(chunk).all().to(device)
    return ok.long()


def _state_to_check(parts: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint saves of the model and the optimizer (the float parts)."""
    return {name: parts[name].state_dict() for name in ("model", "optim") if name in parts}


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


def seed_step(seed: int, step: int) -> None:
    """Seed torch's RNG for the step after `step`, distinct per rank, equal across restarts.

    Without CUDA only the CPU generator is seeded, as `torch.manual_seed` would: it also
    queues the seeding of every accelerator type torch knows (CUDA, XPU, MTIA), each with
    `traceback.format_stack()`: 0.17 ms a call from a shallow stack, and the loop's time
    outside the step fell from ~0.7 to ~0.2 ms without it (docs/performance.md);
    `torch.default_generator.manual_seed` takes 5 us.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    value = seed + step * world_size + rank
    if torch.cuda.is_available():
        torch.manual_seed(value)
    else:
        torch.default_generator.manual_seed(value)


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    save_dir: str,
    logging_interval: int,
    train_steps: int,
    checkpoint_frequency: int,
    dataset: Iterable,
    global_batch_size: int | None = None,
    num_workers: int = 0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    initial_checkpoint_dir: str | None = None,
    gradient_accumulation: int | None = None,
    checkpoint_max_to_keep: int | None = None,
    evaluate_fn: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
    eval_every_n: int | None = None,
    async_checkpoint: bool = False,
    seed: int | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    verify_checkpoint: Callable[[str], None] | None = None,
    prefetch_batches: int = 2,
    tensorboard: bool = True,
    early_stopping: EarlyStopping | None = None,
    verify_warm_start: Callable[[str], None] | None = None,
    worker_batch_size: int | None = None,
) -> TrainResult:
    """Train `model` (returns `(loss, outputs)`) for up to `train_steps` steps.

    Args:
      model: the DMP-wrapped model-and-loss.
      optimizer: the combined optimizer (fused tables + dense).
      device: this worker's device.
      save_dir: checkpoints go to `save_dir/<step>`; the newest complete one is resumed.
      logging_interval: log every N steps.
      train_steps: the last step; training also ends when `dataset` runs out.
      checkpoint_frequency: save every N steps (and always at the end).
      dataset: iterable of Pipelineable batches, with `state_dict`/`load_state_dict` of its
        position and `len()` (batches per epoch) when resumable.
      global_batch_size: examples per step summed over every worker (for examples/s).
      scheduler: stepped once per step; its position is saved and restored.
      initial_checkpoint_dir: warm start (weights only, step 0) when save_dir has none.
      gradient_accumulation: step the dense optimizer every N batches.
      evaluate_fn: `evaluate_fn(model, step) -> metrics`, called every `eval_every_n` steps
        and at the end, on every rank (it may run collectives).
      async_checkpoint: write checkpoints in the background (needs DTensor state: shard
        with `output_dtensor=True`); at most one in flight, waited for at the end.
      seed: re-seed torch's RNG before every step (see the module docstring).
      prefetch_batches: batches read ahead by a background thread (0: read in the step).
      checkpoint_extra: JSON-serialisable facts saved with every checkpoint
        (`Checkpointer.save(extra=...)`), e.g. how the model scores.
      verify_checkpoint: called with a checkpoint's path before it is resumed from or
        warm started from; raises (CheckpointError) when the checkpoint does not fit the
        model, e.g. its `checkpoint_extra` disagrees with this run's.
      tensorboard: write TensorBoard events beside `save_dir/metrics.jsonl`
        (tml.core.run_records; both on rank 0).
      early_stopping: stop when its metric stops improving (tml.core.early_stopping);
        each improvement is checkpointed and marked best; its state is checkpointed.
      verify_warm_start: the same for `initial_checkpoint_dir` (default
        `verify_checkpoint`); a warm start may load into grown tables (more rows than
        saved: saved rows bit for bit, new rows keep their initialisation), so a project
        accepts there what it refuses on resume.
      worker_batch_size: deprecated name of `global_batch_size` (the original tml's, which
        held the global batch too); still accepted, with a DeprecationWarning.

    The logged loss is the mean over the steps since the last log line and over every
    worker (`global_mean`). Without a terminal (no progress bar) the log line carries an
    ETA; with one, log lines print above the bar (tqdm's logging redirect).
    """
    del num_workers  # reading happens in the dataset's own iterator
    global_batch_size = _global_batch_size(global_batch_size, worker_batch_size)
    train_state = TrainState()
    parts: dict[str, Any] = {"model": model, "optim": optimizer, "train": train_state}
    if scheduler is not None:
        parts["scheduler"] = SchedulerState(scheduler)
    if early_stopping is not None:
        parts["early_stopping"] = early_stopping
    checkpointer = Checkpointer(save_dir, checkpoint_max_to_keep, async_save=async_checkpoint)
    resumed_from = latest_checkpoint(save_dir)
    if dist.is_initialized():
        # Every rank must resume from the same checkpoint: rank 0's listing decides.
        listing = [resumed_from]
        dist.broadcast_object_list(listing, src=0)
        resumed_from = listing[0]
    if resumed_from is not None:
        if verify_checkpoint is not None:
            verify_checkpoint(resumed_from)
        load_checkpoint(resumed_from, _parts_in(resumed_from, parts))
        logger.info("resumed from %s at step %d (%.1fs of training so far)", resumed_from,
                    train_state.step, train_state.wall_time)
    elif initial_checkpoint_dir:
        verify = verify_warm_start or verify_checkpoint
        if verify is not None:
            verify(initial_checkpoint_dir)
        grown = load_checkpoint(initial_checkpoint_dir, {"model": model}, grow_rows=True)
        logger.info("warm start: weights from %s, starting at step 0", initial_checkpoint_dir)
        for key, (saved, rows) in grown.items():
            logger.info("warm start: %s grew from %d to %d rows (rows %d.. initialised)",
                        key, saved, rows, saved)
    start_step = train_state.step
    if resumed_from is None or scheduler is None:
        set_schedule_step(scheduler, start_step)

    if start_step >= train_steps:
        logger.info("the checkpoint %s already reached step %d (the run ends at step %d); "
                    "nothing to train", resumed_from, start_step, train_steps)
        return TrainResult(start_step, start_step, None, resumed_from, {}, resumed_from)
    checkpointer.prepare()
    if early_stopping is not None and early_stopping.best_step is not None:
        checkpointer.keep.add(early_stopping.best_step)
    recorder = RunRecorder(save_dir, start_step, tensorboard=tensorboard)

    _seek(dataset, train_state.batches_consumed)
    step_optimizer = optimizer if not gradient_accumulation or gradient_accumulation == 1 \
        else _AccumulatingOptimizer(optimizer, gradient_accumulation)
    pipeline = train_pipeline(model, step_optimizer, device)
    # Batches are read ahead by a thread (see tml.common.prefetch): ~8% of a CPU step.
    data_iter = prefetch(iter(dataset), depth=prefetch_batches)
    model.train()

    step = start_step
    losses: list[torch.Tensor] = []
    losses_first_step = start_step + 1   # the step of losses[0]
    last_loss: float | None = None
    eval_metrics: dict[str, float] = {}
    checkpoint: str | None = resumed_from
    bar = _progress_bar(train_steps, start_step)
    redirect = contextlib.ExitStack()
    if bar is not None:
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect.enter_context(logging_redirect_tqdm())
    evaluated_step, stopped_early = -1, False
    interval_start, interval_steps = time.perf_counter(), 0
    wall_start, wall_base = time.perf_counter(), train_state.wall_time
    def check_finite(with_state: bool) -> None:
        try:
            _check_finite(losses, losses_first_step, step, device,
                          _state_to_check(parts) if with_state else None,
                          checkpointer.wait() or checkpoint if with_state else checkpoint)
        except TrainingDivergedError:
            data_iter.close()
            if bar is not None:
                bar.close()
            redirect.close()
            recorder.close()
            checkpointer.wait()   # an earlier, finite save in flight completes
            raise

    def log_interval(log: bool = True) -> float:
        """Log and record the losses since the last log line (collective)."""
        loss = global_mean(torch.stack(losses).mean())
        rate = interval_steps / max(time.perf_counter() - interval_start, 1e-9)
        eta = "" if bar is not None else f", ETA {_duration((train_steps - step) / rate)}"
        logger.log(logging.INFO if log else logging.DEBUG,
                   "step %d: loss %.5f, %.1f steps/s, %.0f examples/s%s", step, loss, rate,
                   rate * global_batch_size, eta)
        recorder.train(step, train_state.wall_time, loss, rate, rate * global_batch_size,
                       learning_rates(optimizer))
        return loss

    def after_evaluation(metrics: dict[str, float]) -> bool:
        """Record an evaluation at `step`; whether early stopping marks it the best."""
        recorder.evaluation(step, train_state.wall_time, metrics)
        if early_stopping is None or not metrics:
            return False
        improved, stop = early_stopping.update(step, metrics)
        nonlocal stopped_early
        stopped_early = stopped_early or stop
        return improved

    def keep_best() -> None:
        """Keep this step's checkpoint; mark it best once it is complete on disk."""
        checkpointer.keep.add(step)
        metric = early_stopping.config.metric  # type: ignore[union-attr]
        value = float(early_stopping.best)  # type: ignore[union-attr, arg-type]
        checkpointer.when_saved(step, functools.partial(mark_best, save_dir, step, metric,
                                                        value))

    while step < train_steps:
        if seed is not None:
            seed_step(seed, step)
        try:
            outputs = pipeline.progress(data_iter)
        except StopIteration:
            logger.info("the training data is used up after step %d", step)
            break
        step += 1
        interval_steps += 1
        train_state.step = step
        train_state.batches_consumed += 1
        train_state.wall_time = wall_base + time.perf_counter() - wall_start
        if scheduler is not None:
            scheduler.step()
        losses.append(outputs["loss"].detach())
        if bar is not None:
            bar.update(1)
        if step % logging_interval == 0:
            check_finite(with_state=False)
            last_loss = log_interval()
            losses, interval_start, interval_steps = [], time.perf_counter(), 0
            losses_first_step = step + 1
        best = False
        if evaluate_fn is not None and eval_every_n and step % eval_every_n == 0 \
                and step < train_steps:
            eval_metrics = _evaluate(pipeline, evaluate_fn, step)
            evaluated_step = step
            best = after_evaluation(eval_metrics)
        if (step % checkpoint_frequency == 0 or best) and step < train_steps:
            check_finite(with_state=True)
            checkpoint = checkpointer.save(step, parts, checkpoint_extra)
            if best:
                keep_best()
        checkpointer.poll()
        maybe_crash(step)
        if stopped_early:
            break
    train_seconds = time.perf_counter() - wall_start
    data_iter.close()
    if bar is not None:
        bar.close()
    redirect.close()
    if losses:   # the steps after the last log line: recorded, not logged (as before)
        check_finite(with_state=False)
        last_loss = log_interval(log=False)

    model = pipeline.detach()
    if step > start_step:
        check_finite(with_state=True)
    best = False
    if evaluate_fn is not None and evaluated_step != step:
        eval_metrics = evaluate_fn(model, step)
        model.train()
        best = after_evaluation(eval_metrics)
    if step > start_step and checkpoint != os.path.join(save_dir, str(step)):
        checkpoint = checkpointer.save(step, parts, checkpoint_extra)
    if best and checkpoint == os.path.join(save_dir, str(step)):
        keep_best()
    checkpointer.wait()
    recorder.close()
    best_path = None
    if early_stopping is not None and early_stopping.best_step is not None:
        best_path = os.path.join(save_dir, str(early_stopping.best_step))
    return TrainResult(start_step, step, last_loss, checkpoint, eval_metrics, resumed_from,
                       train_seconds, stopped_early, best_path)


def _global_batch_size(global_batch_size: int | None, worker_batch_size: int | None) -> int:
    """`global_batch_size`, or the deprecated `worker_batch_size` (same meaning)."""
    if worker_batch_size is not None:
        warnings.warn("train(worker_batch_size=...) is deprecated: it is the global batch "
                      "(examples per step over all workers); pass global_batch_size",
                      DeprecationWarning, stacklevel=3)
        if global_batch_size is not None and global_batch_size != worker_batch_size:
            raise TypeError(f"train() got global_batch_size={global_batch_size} and "
                            f"worker_batch_size={worker_batch_size}; pass global_batch_size "
                            "only")
        return worker_batch_size
    if global_batch_size is None:
        raise TypeError("train() missing required argument: 'global_batch_size'")
    return global_batch_size


def evaluate_checkpoints(
    model: torch.nn.Module,
    save_dir: str,
    evaluate_fn: Callable[[torch.nn.Module, int], dict[str, float]],
    until_step: int,
    poll_interval_s: float = 10.0,
    timeout_s: float | None = None,
    verify_checkpoint: Callable[[str], None] | None = None,
) -> dict[int, dict[str, float]]:
    """The `only_evaluate` mode: evaluate each new complete checkpoint in `save_dir` once.

    Runs beside a training job (its own workers, same model config). Every complete
    checkpoint without an `evaluation.json` is loaded (weights only) and evaluated; rank 0
    then writes the metrics to `<checkpoint>/evaluation.json`, which marks it evaluated, so a
    restarted evaluator skips it, and appends them to `save_dir/metrics.jsonl` (kind
    `checkpoint_eval`, with the checkpoint's training time; tml.core.run_records). Stops
    once a checkpoint at step >= `until_step` was evaluated (or found evaluated), or after
    `timeout_s` without a new checkpoint.
    `verify_checkpoint(path)` is called before each load (see `train`).
    Returns `{step: metrics}` of the checkpoints evaluated by this call.
    """
    results: dict[int, dict[str, float]] = {}
    last_new = time.monotonic()
    while True:
        pending, finished = _unevaluated_steps(save_dir, until_step)
        for step in pending:
            path = os.path.join(save_dir, str(step))
            try:
                if verify_checkpoint is not None:
                    verify_checkpoint(path)
                train_state = TrainState()
                parts: dict[str, Any] = {"model": model}
                if "train" in _saved_parts(path):   # the loop's checkpoints have it
                    parts["train"] = train_state
                load_checkpoint(path, parts)
            except CheckpointError:
                if not os.path.isdir(path):  # removed by the trainer's retention meanwhile
                    logger.warning("checkpoint %s went away before evaluation", path)
                    continue
                raise
            metrics = evaluate_fn(model, step)
            results[step] = metrics
            if not dist.is_initialized() or dist.get_rank() == 0:
                _write_json(os.path.join(path, EVALUATION_FILE),
                            {"step": step, "metrics": metrics})
            record_checkpoint_evaluation(save_dir, step, metrics,
                                         train_state.wall_time if "train" in parts else None)
            logger.info("evaluated checkpoint %s: %s", path, metrics)
            last_new = time.monotonic()
            finished = finished or step >= until_step
        if finished:
            logger.info("a checkpoint at step >= %d is evaluated; done", until_step)
            if dist.is_initialized():
                dist.barrier()
            return results
        if timeout_s is not None and time.monotonic() - last_new > timeout_s:
            logger.info("no new checkpoint in %s for %.0fs; stopping", save_dir, timeout_s)
            return results
        time.sleep(poll_interval_s)


def _unevaluated_steps(save_dir: str, until_step: int) -> tuple[list[int], bool]:
    """Steps to evaluate and whether the final one is already evaluated; rank 0 decides."""
    steps = checkpoint_steps(save_dir)
    done = [s for s in steps
            if os.path.isfile(os.path.join(save_dir, str(s), EVALUATION_FILE))]
    pending = [s for s in steps if s not in done]
    finished = any(s >= until_step for s in done)
    if dist.is_initialized():
        shared = [(pending, finished)]
        dist.broadcast_object_list(shared, src=0)
        pending, finished = shared[0]
    return pending, finished


def _write_json(path: str, data: dict) -> None:
    write_json_atomic(path, data, indent=1)


def _parts_in(path: str, parts: dict[str, Any]) -> dict[str, Any]:
    """`parts` without early stopping's state when the checkpoint has none (written before
    early stopping was configured): the rule then starts afresh."""
    if "early_stopping" not in parts or "early_stopping" in _saved_parts(path):
        return parts
    logger.warning("%s holds no early-stopping state: the rule starts afresh", path)
    return {name: part for name, part in parts.items() if name != "early_stopping"}


def _saved_parts(path: str) -> set[str]:
    """The names of the parts saved in the checkpoint at `path` (`model`, `train`, ...)."""
    return {key.split(".", 1)[0] for key in read_metadata(path).state_dict_metadata}


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


def _duration(seconds: float) -> str:
    """`1h02m03s`, `4m05s`, `6s`."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _evaluate(pipeline: OneWorkerTrainPipeline | Any, evaluate_fn: Callable, step: int) -> dict:
    model = pipeline.detach()
    try:
        return evaluate_fn(model, step)
    finally:
        model.train()
        pipeline.attach(model)
