"""TwHIN's hook into the reader service (`tml.readers`): what a reader serves, what a
trainer receives.

A reader serves the training edges exactly as `create_dataset` reads them for a trainer
rank (same shares, batches, global negatives, epochs), and the validation edges (when the
config has `validation_data`) as the trainers' evaluations read them; the trainer decodes
`EdgeBatch`es. An evaluator run with `--only_evaluate` reads in its own process.
"""

from __future__ import annotations

import functools
import logging

from tml.readers.client import ReaderDataset
from tml.readers.roles import reader_addresses, reader_group, serve_reader

from ..config import TwhinConfig
from .data import create_dataset
from .dataset import EdgesDataset
from .edges import EdgeBatch

logger = logging.getLogger(__name__)


def _train_dataset(config: TwhinConfig, rank: int, world_size: int) -> EdgesDataset:
    return create_dataset(config.train_data, config.model, rank, world_size,
                          num_epochs=config.training.num_epochs)


def _validation_dataset(config: TwhinConfig, rank: int, world_size: int) -> EdgesDataset:
    assert config.validation_data is not None
    return create_dataset(config.validation_data, config.model, rank, world_size)


def train_dataset_factory(config: TwhinConfig) -> functools.partial:
    """`factory(rank, world_size)`: rank's in-process training dataset (what readers serve)."""
    return functools.partial(_train_dataset, config)


def dataset_factories(config: TwhinConfig) -> dict[str, functools.partial]:
    """What a reader serves: the training data, and the validation data if there is any."""
    factories = {"train": train_dataset_factory(config)}
    if config.validation_data is not None:
        factories["validation"] = functools.partial(_validation_dataset, config)
    return factories


def serve_train_data(config: TwhinConfig) -> None:
    """Run this process as a reader of `config`'s training (and validation) data until
    stopped."""
    serve_reader(dataset_factories(config), config.readers)


def reader_train_dataset(config: TwhinConfig, rank: int, world_size: int,
                         dataset: int = 0) -> ReaderDataset | None:
    """This trainer's training batches (`dataset` 1: validation batches) from its readers,
    or None when there are none."""
    addresses = reader_addresses(config.readers)
    if not addresses:
        if config.readers.num_readers and dataset == 0:
            logger.warning("readers.num_readers=%d, but no readers were started for this "
                           "worker (torchrun or tml launch started it directly): reading "
                           "in-process (the same batches); start readers with "
                           "TML_ROLE=reader and list them in TML_READERS to use them",
                           config.readers.num_readers)
        return None
    return ReaderDataset(addresses, rank, world_size, EdgeBatch,
                         connect_timeout_s=config.readers.connect_timeout_s,
                         batch_timeout_s=config.readers.batch_timeout_s,
                         group=reader_group(rank, world_size), dataset=dataset)


def reader_validation_dataset(config: TwhinConfig, rank: int,
                              world_size: int) -> ReaderDataset | None:
    """This trainer's validation batches from its readers, or None when there are none."""
    return reader_train_dataset(config, rank, world_size, dataset=1)
