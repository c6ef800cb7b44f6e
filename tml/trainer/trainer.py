"""`train`: shard a project's model, build its optimizers and run the loop (or evaluate).

Reads like TorchRec's golden example: set up the device, build the tables on the meta
device with fused optimizers, shard, combine optimizers, train. Every setting comes from
`TrainingConfig` / `RuntimeConfig`; the project supplies only `ProjectParts`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

import tml.core.custom_training_loop as ctl
from tml.common.modules.embedding.vectors import load_table_vectors
from tml.common.sharding import shard_model
from tml.core.config.training import RuntimeConfig, TrainingConfig
from tml.core.early_stopping import EarlyStopping
from tml.errors import ConfigError
from tml.optimizers.combined import build_combined_optimizer
from tml.trainer.fused_tables import apply_table_optimizers, table_of_param, table_schedules
from tml.trainer.project import ProjectParts
from tml.trainer.runtime import seed_model_init, setup_runtime

logger = logging.getLogger(__name__)

# How metric names read in the log lines; others are shown as they are.
_SHOWN = {"auc": "AUC", "rce": "RCE", "nrce": "NRCE"}


def describe_metrics(metrics: dict[str, float]) -> str:
    """`held-out AUC 0.8123, loss 0.41234 (16 batches per worker)`."""
    parts = [f"{_SHOWN.get(name, name)} {value:.5f}" if name == "loss" else
             f"{_SHOWN.get(name, name)} {value:.4f}"
             for name, value in metrics.items() if name != "batches"]
    text = "held-out " + ", ".join(parts)
    if "batches" in metrics:
        text += f" ({int(metrics['batches'])} batches per worker)"
    return text


def train(parts: ProjectParts, training: TrainingConfig, runtime: RuntimeConfig,
          save_dir: str, only_evaluate: bool = False,
          evaluate_until_step: int | None = None) -> ctl.TrainResult:
    """Train (or, with `only_evaluate`, evaluate checkpoints) in this worker; what it did.

    Every rank calls it. With `only_evaluate`, follows `save_dir` and evaluates each new
    complete checkpoint once until the run's final step (or `evaluate_until_step`);
    `final_step` is then the last step evaluated.
    """
    device = setup_runtime(runtime)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    logger.info("training on %s with %d worker(s); checkpoints in %s", device, world_size,
                save_dir)

    train_dataset = parts.train_data(rank, world_size, training.num_epochs)
    validation_dataset = None
    if parts.validation_data is not None:
        validation_dataset = parts.validation_data(rank, world_size)
    # The run ends at num_train_steps or when num_epochs of data are read, whichever first.
    train_steps = min(training.num_train_steps, len(train_dataset) * training.num_epochs)
    logger.info("train data: %d batches of %d examples per worker per epoch, %d epoch(s): "
                "%d steps", len(train_dataset), parts.batch_size, training.num_epochs,
                train_steps)

    seed_model_init(training.seed)
    model = apply_table_optimizers(parts.model(), parts.tables, parts.tables_field)
    sharding_types = {t.name: t.sharding_type.value for t in parts.tables if t.sharding_type}
    # DTensor state: what dcp.async_save can stage (it cannot stage ShardedTensors).
    sharded = shard_model(
        model, device, sharding_types, output_dtensor=True,
        compute_kernels={t.name: t.compute_kernel.value for t in parts.tables
                         if t.compute_kernel},
        cache_load_factors={t.name: t.cache_load_factor for t in parts.tables
                            if t.cache_load_factor is not None})
    load_table_vectors(sharded, parts.tables, parts.tables_field)
    if parts.after_shard is not None:
        parts.after_shard(sharded)
    if parts.optimizer is not None:
        optimizer, scheduler = parts.optimizer(sharded)
    else:
        optimizer, scheduler = build_combined_optimizer(
            sharded, parts.dense_optimizer, table_schedules(parts.tables), table_of_param,
            dense_key=parts.dense_optimizer_key)
    logger.info("optimizer groups: %d (fused tables + dense), lr %s",
                len(optimizer.param_groups), [g["lr"] for g in optimizer.param_groups])

    evaluate_fn = _evaluate_fn(parts, validation_dataset, device, training.num_eval_steps)
    if only_evaluate:
        return _only_evaluate(sharded, save_dir, evaluate_fn,
                              evaluate_until_step or train_steps, parts.verify_checkpoint)

    result = ctl.train(
        model=sharded,
        optimizer=optimizer,
        device=device,
        save_dir=save_dir,
        logging_interval=training.train_log_every_n,
        train_steps=train_steps,
        checkpoint_frequency=training.checkpoint_every_n,
        dataset=train_dataset,
        global_batch_size=parts.batch_size * world_size,
        scheduler=scheduler,
        initial_checkpoint_dir=training.initial_checkpoint_dir,
        gradient_accumulation=training.gradient_accumulation,
        checkpoint_max_to_keep=training.checkpoint_max_to_keep,
        evaluate_fn=evaluate_fn,
        eval_every_n=training.eval_log_every_n,
        async_checkpoint=training.async_checkpoint,
        seed=training.seed,
        checkpoint_extra=dict(parts.checkpoint_extra or {}),
        verify_checkpoint=parts.verify_checkpoint,
        tensorboard=training.tensorboard,
        early_stopping=_early_stopping(training, evaluate_fn),
        verify_warm_start=parts.verify_warm_start,
    )
    if result.stopped_early:
        logger.info("stopped early at step %d; best checkpoint: %s", result.final_step,
                    result.best_checkpoint)
    if result.final_step > result.start_step:
        logger.info("done: step %d, final loss %s, held-out AUC %s; checkpoint: %s",
                    result.final_step, _fmt(result.last_loss),
                    _fmt(result.eval_metrics.get("auc")), result.checkpoint)
    return result


def _early_stopping(training: TrainingConfig, evaluate_fn: object) -> EarlyStopping | None:
    if training.early_stopping is None:
        return None
    if evaluate_fn is None:
        raise ConfigError("training.early_stopping needs validation data (none is configured, "
                          "or it is empty)")
    return EarlyStopping(training.early_stopping)


def _evaluate_fn(parts: ProjectParts, dataset: object, device: torch.device,
                 num_steps: int) -> Callable[[torch.nn.Module, int], dict] | None:
    if dataset is None or not len(dataset):  # type: ignore[arg-type]
        return None
    evaluate = parts.evaluate
    if evaluate is None:
        from tml.metrics.evaluation import evaluate

    def evaluate_fn(model: torch.nn.Module, step: int) -> dict[str, float]:
        metrics = evaluate(model, dataset, device, num_steps)  # type: ignore[misc]
        logger.info("step %d: %s", step, describe_metrics(metrics))
        return metrics

    return evaluate_fn


def _only_evaluate(model: torch.nn.Module, save_dir: str, evaluate_fn: object,
                   until_step: int,
                   verify_checkpoint: Callable[[str], None] | None) -> ctl.TrainResult:
    if evaluate_fn is None:
        raise ConfigError("--only_evaluate needs validation_data in the config")
    logger.info("only evaluating: following %s until step %d", save_dir, until_step)
    evaluated = ctl.evaluate_checkpoints(model, save_dir, evaluate_fn,  # type: ignore[arg-type]
                                         until_step, poll_interval_s=2.0,
                                         verify_checkpoint=verify_checkpoint)
    last = max(evaluated, default=0)
    return ctl.TrainResult(0, last, None, None, evaluated.get(last, {}), None)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
