"""Train the tiny project (the doc's step 4: the parts and the entry point).

    python tests/data/tiny_project/run.py --config_yaml_path=CONFIG --save_dir=DIR \
        [--nproc_per_node=2]
"""

from __future__ import annotations

from tests.data.tiny_project.config import TinyConfig
from tml.common.cli import run_cli
from tml.trainer import ProjectParts, train
from tml.trainer.entry import load_worker_config, read_run_request, run_summary
from tml.trainer.launch import finish_workers, launch


def tiny_parts(config: TinyConfig) -> ProjectParts:
    from tests.data.tiny_project.data.dataset import PairDataset
    from tests.data.tiny_project.models.models import TinyModel, TinyModelAndLoss

    rows = {table.name: table.num_embeddings for table in config.model.embeddings.tables}
    return ProjectParts(
        model=lambda: TinyModelAndLoss(TinyModel(config.model)),   # called after seeding
        tables=config.model.embeddings.tables,                     # fused optimizers, sharding
        dense_optimizer=config.model.dense_optimizer,
        train_data=lambda rank, world, epochs: PairDataset(config.train_data, rows, rank,
                                                           world, epochs),
        batch_size=config.train_data.per_replica_batch_size,
        validation_data=lambda rank, world: PairDataset(config.validation_data, rows, rank,
                                                        world),
    )


def train_from_yaml(config_yaml_path: str, save_dir: str,       # in each worker
                    overrides: list[str] | None = None, only_evaluate: bool = False,
                    evaluate_until_step: int | None = None) -> dict:
    config = load_worker_config(TinyConfig, config_yaml_path, overrides)
    result = train(tiny_parts(config), config.training, config.runtime, save_dir,
                   only_evaluate=only_evaluate, evaluate_until_step=evaluate_until_step)
    finish_workers()
    return run_summary(result)


def main(argv: list[str] | None = None) -> None:                     # in the launcher
    # The flags every training script takes (unknown ones refused), the config read with
    # its overrides and the save_dir found: each mistake fails once, here, as one line.
    request = read_run_request(TinyConfig, argv, description=__doc__.split("\n\n")[0])
    launch(train_from_yaml, __name__, request.config.training,
           nproc_per_node=request.nproc_per_node, **request.worker_kwargs())


if __name__ == "__main__":
    run_cli(main)             # user errors: one `error: ...` line, exit 2
