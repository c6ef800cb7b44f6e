"""`ProjectParts`: everything the trainer needs from a project, and nothing else.

The trainer calls the factories in the workers, in this order: the datasets, then (after
seeding torch with `training.seed`) `model`, so that every run of one config starts from the
same weights and a resumed run can be compared with an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from tml.common.modules.embedding.config import EmbeddingBagConfig
from tml.optimizers.config import OptimizerConfig

# evaluate(model, batches, device, num_steps) -> metrics (every rank calls it)
EvaluateFn = Callable[[torch.nn.Module, Iterable, torch.device, int], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class ProjectParts:
    """A project's model, data and tables, as factories the trainer calls in each worker.

    Attributes:
      model: builds the model-and-loss module (forward returns `(loss, outputs)`) with its
        embedding tables on the meta device; the trainer attaches the tables' fused
        optimizers (`tables`) and shards it.
      tables: the embedding tables' configs (optimizer, sharding type), by table name.
      dense_optimizer: the optimizer of every parameter that is not a table.
      dense_optimizer_key: that optimizer's name in checkpoints and run records (default
        `tml.optimizers.combined.DENSE_OPT_KEY`, "dense_opt"); keep it once checkpoints exist.
      train_data: `(rank, world_size, num_epochs) -> dataset` of this rank's batches; with
        `len()` (batches per epoch) and `state_dict` / `load_state_dict` of its position.
      batch_size: examples per batch per worker.
      validation_data: `(rank, world_size) -> dataset`, or None for no evaluation.
      evaluate: `(model, batches, device, num_steps) -> metrics`; default
        `tml.metrics.evaluation.evaluate` (AUROC, RCE and the loss of binary outputs).
      checkpoint_extra: JSON facts saved with every checkpoint (how the model scores).
      verify_checkpoint: raises a CheckpointError for a checkpoint this model cannot use.
      verify_warm_start: the same for the warm start (`training.initial_checkpoint_dir`),
        where tables may have grown since (default `verify_checkpoint`).
      tables_field: where `tables` sit in the project's config, for error messages.
      optimizer: `(sharded model) -> (optimizer, scheduler)` replacing the default (the
        tables' fused optimizers plus one `dense_optimizer` for the rest), for projects
        whose dense parameters need several groups (the ranker's per-tower schedules).
      after_shard: called with the sharded model before training or loading a checkpoint,
        e.g. to write initial vectors into this worker's table shards.
    """

    model: Callable[[], torch.nn.Module]
    tables: Sequence[EmbeddingBagConfig]
    dense_optimizer: OptimizerConfig
    train_data: Callable[[int, int, int], Any]
    batch_size: int
    validation_data: Callable[[int, int], Any] | None = None
    evaluate: EvaluateFn | None = None
    checkpoint_extra: Mapping[str, Any] | None = None
    verify_checkpoint: Callable[[str], None] | None = None
    tables_field: str = "model.embeddings.tables"
    optimizer: Callable[[torch.nn.Module], tuple[torch.optim.Optimizer, Any]] | None = None
    after_shard: Callable[[torch.nn.Module], None] | None = None
    verify_warm_start: Callable[[str], None] | None = None
    dense_optimizer_key: str = "dense_opt"   # tml.optimizers.combined.DENSE_OPT_KEY
