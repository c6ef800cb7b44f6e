"""Train the Heavy Ranker.

    python projects/home/recap/main.py --config_yaml_path=projects/home/recap/config/local_prod.yaml \
        --save_dir=runs/recap [--nproc_per_node=2]

starts its own workers through `maybe_run_training` (tml.trainer.launch); the original launch
line

    torchrun --standalone --nnodes 1 --nproc_per_node 2 projects/home/recap/main.py \
        --config_yaml_path=... --save_dir=...

runs the same code in workers torchrun started. Everything but the ranker's parts (model,
data, tables, per-tower optimizer, metrics) is `tml.trainer`: sharding, the loop, evaluation
(per-task AUROC and RCE), checkpoints and resume. `--only_evaluate` follows the save_dir
beside a training job and evaluates each new checkpoint once (`<checkpoint>/evaluation.json`).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

# Run as a file (PEP 366): `python projects/.../x.py`, torchrun and Bazel run this module
# without a package; name it, and put the directory above the top package on the path (in
# place of the script's own directory, whose modules would shadow top-level ones).
if not __package__:
    import os as _os
    import sys as _sys

    _top, _names = _os.path.dirname(_os.path.abspath(__file__)), []
    while _os.path.isfile(_os.path.join(_top, "__init__.py")):
        _top, _name = _os.path.split(_top)
        _names.insert(0, _name)
    if _sys.path and _os.path.abspath(_sys.path[0] or ".") == _os.path.dirname(
            _os.path.abspath(__file__)):
        _sys.path[0] = _top
    elif _top not in _sys.path:
        _sys.path.insert(0, _top)
    __package__ = ".".join(_names)

import tml  # noqa: E402,F401  (logging set-up before torchrec is imported)
from tml.common.atomic_file import write_json_atomic  # noqa: E402
from tml.common.cli import run_cli  # noqa: E402
from tml.errors import ConfigError  # noqa: E402
from tml.trainer.entry import load_worker_config, read_run_request, run_summary  # noqa: E402

from .config import RecapConfig  # noqa: E402

if TYPE_CHECKING:
    import tml.core.custom_training_loop as ctl
    from tml.trainer import ProjectParts

logger = logging.getLogger(__name__)


def recap_parts(config: RecapConfig) -> ProjectParts:
    """What the trainer needs from the ranker."""
    from tml.optimizers.config import OptimizerConfig, SgdConfig
    from tml.trainer import ProjectParts

    from .data.dataset import RecapDataset, input_spec
    from .metrics import ValidationSets, make_evaluate
    from .model.embeddings import init_tables_from_exports, trainer_tables
    from .model.ranking import RankingModel, RankingModelAndLoss
    from .optimizer.optimizer import build_optimizer

    model_config = config.model
    tasks = list(model_config.tasks)
    shapes = input_spec(config.train_data, model_config).input_shapes()

    def train_data(rank: int, world_size: int, num_epochs: int) -> RecapDataset:
        del num_epochs    # the trainer stops at num_train_steps or num_epochs * len()
        return RecapDataset(config.train_data, model_config, rank, world_size, repeat=True)

    def validation_data(rank: int, world_size: int) -> ValidationSets:
        sets, reported = {}, {}
        for name, data in config.validation_data.items():
            source = f"validation_data.{name}"
            sets[name] = RecapDataset(data, model_config, rank, world_size, repeat=False,
                                      source=source)
            wanted = data.evaluation_tasks or tasks
            reported[name] = [tasks.index(t) for t in wanted if t in tasks]
            if not reported[name]:
                raise ConfigError(f"{source}.evaluation_tasks: none is a model task")
        return ValidationSets(sets, reported)

    def after_shard(model: object) -> None:
        if model_config.large_embeddings is not None:
            done = init_tables_from_exports(model, model_config.large_embeddings)  # type: ignore[arg-type]
            if done:
                logger.info("tables started from twhin exports: %s", ", ".join(done))

    return ProjectParts(
        model=lambda: RankingModelAndLoss(RankingModel(model_config, config.train_data,
                                                       shapes)),
        tables=trainer_tables(model_config.large_embeddings),
        dense_optimizer=OptimizerConfig(sgd=SgdConfig(lr=0.0)),   # replaced by `optimizer`
        train_data=train_data,
        batch_size=config.train_data.global_batch_size // int(os.environ.get("WORLD_SIZE", "1")),
        validation_data=validation_data if config.validation_data else None,
        evaluate=make_evaluate(tasks),  # type: ignore[arg-type]
        checkpoint_extra={"project": "home/recap", "tasks": tasks},
        tables_field="model.large_embeddings.tables",
        optimizer=lambda model: build_optimizer(model, config.optimizer, model_config),
        after_shard=after_shard,
    )


FINAL_METRICS = "final_metrics.json"


def write_json(path: str, data: dict) -> None:
    """Write `data` to `path` atomically (a reader never sees half a file)."""
    write_json_atomic(path, data, indent=1)


def run(config: RecapConfig, save_dir: str, only_evaluate: bool = False,
        evaluate_until_step: int | None = None) -> ctl.TrainResult:
    """Train (or evaluate) with `config` in this worker; what it did."""
    from tml.trainer import train

    # The trainer's per-worker batch: global_batch_size is split across the workers.
    return train(recap_parts(config), config.training, config.runtime, save_dir,
                 only_evaluate=only_evaluate, evaluate_until_step=evaluate_until_step)


def train_from_yaml(config_yaml_path: str, save_dir: str, only_evaluate: bool = False,
                    evaluate_until_step: int | None = None,
                    overrides: list[str] | None = None) -> dict:
    """Worker entry point: load the config and train (or evaluate); a summary of the run."""
    import torch.distributed as dist

    from tml.trainer.launch import finish_workers

    config = load_worker_config(RecapConfig, config_yaml_path, overrides)
    result = run(config, save_dir, only_evaluate, evaluate_until_step)
    if not only_evaluate and result.eval_metrics and dist.get_rank() == 0:
        # The run's record: the last evaluation, per task (AUROC, RCE), as JSON.
        write_json(os.path.join(save_dir, FINAL_METRICS),
                   {"step": result.final_step, "checkpoint": result.checkpoint,
                    "metrics": result.eval_metrics})
    finish_workers()
    return run_summary(result)


def main(argv: list[str] | None = None) -> None:
    """Check the flags, the config and the data, then start the workers (or be one)."""
    from tml.trainer.launch import launch

    from .data.dataset import RecapDataset

    request = read_run_request(RecapConfig, argv, prog="main.py",
                               description=__doc__.split("\n\n")[0])
    config = request.config
    workers = int(os.environ.get("WORLD_SIZE", request.nproc_per_node or 1))
    # Bad data fails here, once, as one line, before any worker starts.
    RecapDataset(config.train_data, config.model, 0, workers)
    for name, data in config.validation_data.items():
        RecapDataset(data, config.model, 0, workers, repeat=False,
                     source=f"validation_data.{name}")
    launch(train_from_yaml, __name__, config.training, nproc_per_node=request.nproc_per_node,
           **request.worker_kwargs())


if __name__ == "__main__":
    run_cli(main)
