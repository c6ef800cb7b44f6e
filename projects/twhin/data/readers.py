"""TwHIN's hook into the reader service (`tml.readers`): what a reader serves, what a
trainer receives.

A reader serves the training edges exactly as `create_dataset` reads them for a trainer
rank (same shares, batches, global negatives, epochs); the trainer decodes `EdgeBatch`es.
Validation and test data stay in the trainers (they are read once per evaluation).
"""

from __future__ import annotations

import functools
import logging

from projects.twhin.config import TwhinConfig
from projects.twhin.data.data import create_dataset
from projects.twhin.data.dataset import EdgesDataset
from projects.twhin.data.edges import EdgeBatch
from tml.readers.client import ReaderDataset
from tml.readers.roles import reader_addresses, reader_group, serve_reader

logger = logging.getLogger(__name__)


def _train_dataset(config: TwhinConfig, rank: int, world_size: int) -> EdgesDataset:
    return create_dataset(config.train_data, config.model, rank, world_size,
                          num_epochs=config.training.num_epochs)


def train_dataset_factory(config: TwhinConfig) -> functools.partial:
    """`factory(rank, world_size)`: rank's in-process training dataset (what readers serve)."""
    return functools.partial(_train_dataset, config)


def serve_train_data(config: TwhinConfig) -> None:
    """Run this process as a reader of `config`'s training data until stopped."""
    serve_reader(train_dataset_factory(config), config.readers)


def reader_train_dataset(config: TwhinConfig, rank: int,
                         world_size: int) -> ReaderDataset | None:
    """This trainer's training batches from its readers, or None when there are none."""
    addresses = reader_addresses(config.readers)
    if not addresses:
        if config.readers.num_readers:
            logger.warning("readers.num_readers=%d, but no readers were started for this "
                           "worker (torchrun or tml launch started it directly): reading "
                           "in-process (the same batches); start readers with "
                           "TML_ROLE=reader and list them in TML_READERS to use them",
                           config.readers.num_readers)
        return None
    return ReaderDataset(addresses, rank, world_size, EdgeBatch,
                         connect_timeout_s=config.readers.connect_timeout_s,
                         batch_timeout_s=config.readers.batch_timeout_s,
                         group=reader_group(rank, world_size))
