"""Train TwHIN embeddings.

    python projects/twhin/run.py --config_yaml_path=projects/twhin/config/local.yaml \
        --save_dir=runs/twhin [--nproc_per_node=2]

starts its own workers through `maybe_run_training`; the original launch line

    torchrun --standalone --nnodes 1 --nproc_per_node 2 projects/twhin/run.py \
        --config_yaml_path=projects/twhin/config/local.yaml --save_dir=/some/save/dir

runs the same code in workers torchrun started. Reads like TorchRec's golden example: set
up the device, build the tables on the meta device with fused optimizers, shard, combine
optimizers, train.

`--only_evaluate` runs an evaluator beside a training job instead: it follows the save_dir,
evaluates every new complete checkpoint once (held-out AUC) and writes the metrics to
`<checkpoint>/evaluation.json`; it stops once the checkpoint of the run's final step (or
`--evaluate_until_step`) is evaluated. See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

import tml  # noqa: F401  (logging set-up before torchrec is imported)
from projects.twhin.config import TwhinConfig
from tml.common.cli import StrictArgumentParser, run_cli
from tml.common.run_training import maybe_run_training
from tml.core.config import load_config_from_yaml
from tml.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    import tml.core.custom_training_loop as ctl

logger = logging.getLogger(__name__)


def run(all_config: TwhinConfig, save_dir: str | None = None, only_evaluate: bool = False,
        evaluate_until_step: int | None = None) -> ctl.TrainResult:
    """Train with `all_config` in this worker (one of WORLD_SIZE); returns what it did.

    With `only_evaluate`, evaluate the checkpoints in save_dir instead of training (see the
    module docstring); `final_step` is then the last step evaluated.
    """
    # Imported here, in the workers: the launcher process only validates the config and
    # starts them, and skipping torchrec and fbgemm there saves seconds on every launch.
    import torch
    import torch.distributed as dist

    import tml.core.custom_training_loop as ctl
    from projects.twhin.data.data import create_dataset
    from projects.twhin.data.readers import reader_train_dataset
    from projects.twhin.metrics import evaluate
    from projects.twhin.models.models import TwhinModel, TwhinModelAndLoss, apply_optimizers
    from projects.twhin.optimizer import build_optimizer
    from projects.twhin.preflight import require_save_dir
    from projects.twhin.signature import check_checkpoint_matches, checkpoint_extra
    from tml.common.device import setup_and_get_device
    from tml.common.sharding import maybe_shard_model

    device = setup_and_get_device()
    if all_config.runtime.enable_tensorfloat32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rank, world_size = dist.get_rank(), dist.get_world_size()
    save_dir = require_save_dir(save_dir, all_config, "the config")
    training = all_config.training
    logger.info("training on %s with %d worker(s); checkpoints in %s", device, world_size,
                save_dir)

    # From the reader processes when the run has them (tml.readers), else read here.
    train_dataset = reader_train_dataset(all_config, rank, world_size)
    if train_dataset is None:
        train_dataset = create_dataset(all_config.train_data, all_config.model, rank,
                                       world_size, num_epochs=training.num_epochs)
    validation_dataset = None
    if all_config.validation_data is not None:
        validation_dataset = create_dataset(all_config.validation_data, all_config.model,
                                            rank, world_size)
    # The run ends at num_train_steps or when num_epochs of data are read, whichever first.
    train_steps = min(training.num_train_steps, len(train_dataset) * training.num_epochs)
    logger.info("train data: %d batches of %d edges per worker per epoch, %d epoch(s): "
                "%d steps", len(train_dataset), all_config.train_data.per_replica_batch_size,
                training.num_epochs, train_steps)

    # Same initial weights in every run of this config: a crashed-and-resumed run can be
    # compared with an uninterrupted one.
    torch.manual_seed(training.seed)
    model = TwhinModel(all_config.model, all_config.train_data)
    apply_optimizers(model, all_config.model)
    model_and_loss = TwhinModelAndLoss(model)
    sharding_types = {t.name: t.sharding_type.value
                      for t in all_config.model.embeddings.tables if t.sharding_type}
    # DTensor state: what dcp.async_save can stage (it cannot stage ShardedTensors).
    sharded = maybe_shard_model(model_and_loss, device, sharding_types, output_dtensor=True)
    optimizer, scheduler = build_optimizer(sharded, all_config.model)

    evaluate_fn = None
    if validation_dataset is not None and len(validation_dataset) > 0:
        def evaluate_fn(m, step):  # noqa: ANN001, ANN202
            metrics = evaluate(m, validation_dataset, device, training.num_eval_steps)
            logger.info("step %d: held-out AUC %.4f, loss %.5f (%d batches per worker)",
                        step, metrics["auc"], metrics["loss"], metrics["batches"])
            return metrics

    # Every checkpoint records how this model scores (operators, tables), and one trained
    # as another model is refused before it is loaded (same shapes, wrong scores).
    def verify_checkpoint(path: str) -> None:
        check_checkpoint_matches(all_config, path)

    if only_evaluate:
        return _only_evaluate(sharded, save_dir, evaluate_fn,
                              evaluate_until_step or train_steps, verify_checkpoint)

    result = ctl.train(
        model=sharded,
        optimizer=optimizer,
        device=device,
        save_dir=save_dir,
        logging_interval=training.train_log_every_n,
        train_steps=train_steps,
        checkpoint_frequency=training.checkpoint_every_n,
        dataset=train_dataset,
        worker_batch_size=all_config.train_data.per_replica_batch_size * world_size,
        scheduler=scheduler,
        initial_checkpoint_dir=training.initial_checkpoint_dir,
        gradient_accumulation=training.gradient_accumulation,
        checkpoint_max_to_keep=training.checkpoint_max_to_keep,
        evaluate_fn=evaluate_fn,
        eval_every_n=training.eval_log_every_n,
        async_checkpoint=training.async_checkpoint,
        seed=training.seed,
        checkpoint_extra=checkpoint_extra(all_config),
        verify_checkpoint=verify_checkpoint,
    )
    if result.final_step > result.start_step:
        logger.info("done: step %d, final loss %s, held-out AUC %s; checkpoint: %s",
                    result.final_step, _fmt(result.last_loss), _fmt(result.eval_metrics.get("auc")),
                    result.checkpoint)
    return result


def _only_evaluate(model: torch.nn.Module, save_dir: str, evaluate_fn: object,
                   until_step: int,
                   verify_checkpoint: Callable[[str], None]) -> ctl.TrainResult:
    import tml.core.custom_training_loop as ctl

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


def train_from_yaml(config_yaml_path: str, save_dir: str | None = None,
                    only_evaluate: bool = False, evaluate_until_step: int | None = None) -> dict:
    """Worker entry point: load the config and train (or evaluate); a summary of the run."""
    import torch.distributed as dist

    config = load_config_from_yaml(TwhinConfig, config_yaml_path)
    result = run(config, save_dir=save_dir, only_evaluate=only_evaluate,
                 evaluate_until_step=evaluate_until_step)
    if dist.is_initialized():
        # Leave together: rank 0 may host the store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1),
        # and a rank still tearing down its process group when rank 0 exits aborts.
        dist.barrier()
        dist.destroy_process_group()
    return {"final_step": result.final_step, "checkpoint": result.checkpoint,
            **{f"eval_{k}": v for k, v in result.eval_metrics.items()}}


def serve_from_yaml(config_yaml_path: str, save_dir: str | None = None,
                    only_evaluate: bool = False, evaluate_until_step: int | None = None) -> None:
    """Reader entry point (`TML_ROLE=reader`): serve the training data until stopped.

    Takes the trainers' kwargs (the launcher forwards the same ones to both roles)."""
    from projects.twhin.data.readers import serve_train_data

    del save_dir, only_evaluate, evaluate_until_step
    serve_train_data(load_config_from_yaml(TwhinConfig, config_yaml_path))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; an unknown or misspelt one is a one-line error naming it (never ignored)."""
    parser = StrictArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_yaml_path", required=True, help="TwHIN YAML config.")
    parser.add_argument("--save_dir", default=None, help="Checkpoint directory (overrides "
                        "training.save_dir; one of the two is required).")
    parser.add_argument("--nproc_per_node", type=int, default=None,
                        help="Workers to start when not launched by torchrun.")
    # nargs="?": the self-launched workers receive it back as --only_evaluate=true.
    parser.add_argument("--only_evaluate", nargs="?", const=True, default=False,
                        type=lambda text: text.lower() in ("1", "true", "yes"),
                        help="Evaluate each new complete checkpoint in save_dir once, beside "
                        "a training job, instead of training.")
    parser.add_argument("--evaluate_until_step", type=int, default=None,
                        help="With --only_evaluate: stop after evaluating a checkpoint at "
                        "this step or later (default: the run's final step).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Check the flags, the config, the data, the memory and the save_dir, then train.

    Everything a user can get wrong fails here, once, before a worker starts (and in each
    torchrun-started worker before it builds a model), as one line.
    """
    from projects.twhin.preflight import preflight, require_save_dir

    args = parse_args(argv)
    source = args.config_yaml_path
    config = load_config_from_yaml(TwhinConfig, source)
    save_dir = require_save_dir(args.save_dir, config, source)
    from tml.readers.roles import is_reader

    if not args.only_evaluate and not is_reader():   # a reader checks its data itself
        workers = int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc_per_node or 1))
        preflight(config, source, save_dir, workers_per_node=workers)
    kwargs: dict[str, object] = {"config_yaml_path": args.config_yaml_path,
                                 "save_dir": save_dir}
    if args.only_evaluate:
        kwargs["only_evaluate"] = True
        if args.evaluate_until_step is not None:
            kwargs["evaluate_until_step"] = args.evaluate_until_step
    maybe_run_training(train_from_yaml, __name__, nproc_per_node=args.nproc_per_node,
                       max_restarts=config.training.max_restarts,
                       reader_fn=None if args.only_evaluate else serve_from_yaml,
                       readers=config.readers, **kwargs)


if __name__ == "__main__":
    run_cli(main)
