"""Train the tiny project (the doc's step 4: the parts and the entry point).

    python tests/data/tiny_project/run.py --config_yaml_path=CONFIG --save_dir=DIR \
        [--nproc_per_node=2]
"""

from __future__ import annotations

import argparse

from tests.data.tiny_project.config import TinyConfig
from tml.common.cli import StrictArgumentParser, run_cli
from tml.core.config import load_config_from_yaml
from tml.trainer import ProjectParts, train
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


def train_from_yaml(config_yaml_path: str, save_dir: str) -> dict:   # in each worker
    config = load_config_from_yaml(TinyConfig, config_yaml_path)
    result = train(tiny_parts(config), config.training, config.runtime, save_dir)
    finish_workers()
    return {"final_step": result.final_step}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StrictArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_yaml_path", required=True)
    parser.add_argument("--save_dir", required=True)
    parser.add_argument("--nproc_per_node", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:                     # in the launcher
    args = parse_args(argv)   # unknown flags refused
    config = load_config_from_yaml(TinyConfig, args.config_yaml_path)   # fail once, here
    launch(train_from_yaml, __name__, config.training, nproc_per_node=args.nproc_per_node,
           config_yaml_path=args.config_yaml_path, save_dir=args.save_dir)


if __name__ == "__main__":
    run_cli(main)             # user errors: one `error: ...` line, exit 2
