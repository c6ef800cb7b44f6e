"""The `readers` section of a run's config: serve the training data from reader processes."""

from __future__ import annotations

import pydantic

from tml.core.config.base_config import BaseConfig, Field


class ReadersConfig(BaseConfig):
    """Reader processes read, check and batch the training data and stream the batches to
    the trainers over Arrow Flight; each trainer gets exactly the batches, in the order,
    of reading in-process. Where the readers are: `TML_READERS` (host:port list), else the
    hosts of SLURM's second heterogeneous job component, else `addresses`, else
    `num_readers` (or `TML_NUM_READERS`, or the machines file's `num_dataset_workers`)
    processes started by the launcher beside the trainers. See docs/readers.md."""

    num_readers: pydantic.NonNegativeInt = Field(
        0, description="Readers the launcher starts beside the trainers (on several nodes: "
        "on each node, serving that node's trainers); 0: read in the trainers, unless reader "
        "addresses are given.")
    addresses: list[str] | None = Field(
        None, description="host:port of readers started on their own nodes, in reader order "
        "(start reader i with TML_ROLE=reader TML_READER_INDEX=i).")
    bind_host: str = Field("127.0.0.1", description="Interface a reader started beside the "
                           "trainers binds. A reader on its own node binds the host of its "
                           "own entry in the address list (or TML_READER_BIND); 0.0.0.0 only "
                           "if set so.")
    block_batches: pydantic.PositiveInt = Field(
        8, description="Consecutive batches a trainer takes from one reader before the next "
        "(with several readers per trainer).")
    start_timeout_s: pydantic.PositiveFloat = Field(
        300.0, description="How long the launcher waits for the readers it starts beside "
        "the trainers to serve (they import torch and check their data first).")
    connect_timeout_s: pydantic.PositiveFloat = Field(
        60.0, description="How long a trainer waits for a reader to answer before the run "
        "ends naming it.")
    batch_timeout_s: pydantic.PositiveFloat = Field(
        120.0, description="How long a trainer waits for a reader's next batch before the "
        "run ends naming it.")
