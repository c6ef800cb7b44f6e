"""Embedding tables' optimizers, fused into backward by TorchRec, and their schedules.

TorchRec fuses a table's optimizer into its lookup kernel when the table's weight carries
one attached by `apply_optimizer_in_backward` before sharding. Any project with tables
needs the same set-up and the same checks, so they live here (they were TwHIN's).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from tml.common.modules.embedding.config import EmbeddingBagConfig
from tml.errors import ConfigError
from tml.optimizers.config import LearningRate, OptimizerConfig, SgdConfig, learning_rate_of
from tml.optimizers.optimizer import get_optimizer_class, optimizer_kwargs

_TABLE_PARAM = re.compile(r"embedding_bags\.([^.]+)\.weight")


def table_of_param(name: str) -> str | None:
    """The table a parameter name belongs to (`...embedding_bags.<table>.weight`), or None.

    Holds for the unsharded model and for DMP's fused optimizer's parameter names.
    """
    match = _TABLE_PARAM.search(name)
    return match.group(1) if match else None


# What a frozen table is trained with: SGD keeps no state, and at learning rate 0 it
# writes w - 0 * g = w, the same bits (fused kernels have no "no optimizer" option).
FROZEN_OPTIMIZER = OptimizerConfig(sgd=SgdConfig(lr=0.0), learning_rate=LearningRate(constant=0.0))


def table_optimizer(table: EmbeddingBagConfig) -> OptimizerConfig:
    """The optimizer a table is trained with: its own, or `FROZEN_OPTIMIZER` when frozen."""
    return FROZEN_OPTIMIZER if table.frozen else table.optimizer


def table_schedules(tables: Sequence[EmbeddingBagConfig]) -> dict[str, LearningRate]:
    """Table name -> its learning-rate schedule (constant 0 for a frozen table)."""
    return {table.name: learning_rate_of(table_optimizer(table)) for table in tables}


def apply_table_optimizers(model: nn.Module, tables: Sequence[EmbeddingBagConfig],
                           tables_field: str = "model.embeddings.tables") -> nn.Module:
    """Attach each table's configured optimizer to its weight, to be fused by TorchRec.

    Refuses (ConfigError naming `tables_field` and the table) what fused kernels cannot do:
    SGD with momentum. A table of `tables` that no EmbeddingBagCollection of `model` holds
    is a programming error (ValueError).
    """
    bags = {name: bag for ebc in model.modules() if isinstance(ebc, EmbeddingBagCollection)
            for name, bag in ebc.embedding_bags.items()}
    for table in tables:
        optimizer = table_optimizer(table)
        if optimizer.sgd is not None and optimizer.sgd.momentum:
            raise ConfigError(f"{tables_field} '{table.name}': sgd momentum is not "
                              "supported by fused embedding optimizers; use adagrad or adam")
        if table.name not in bags:
            raise ValueError(f"table '{table.name}' is in no EmbeddingBagCollection of the model")
        weight = bags[table.name].weight
        apply_optimizer_in_backward(
            optimizer_class=get_optimizer_class(optimizer),
            params=[weight],
            optimizer_kwargs=optimizer_kwargs(optimizer),
        )
        # TorchRec hands these kwargs to fbgemm's fused kernel when it shards the table;
        # fbgemm spells Adam's `betas` as beta1 / beta2 (else: unexpected keyword 'betas').
        for kwargs in getattr(weight, "_optimizer_kwargs", []):
            if "betas" in kwargs:
                kwargs["beta1"], kwargs["beta2"] = kwargs.pop("betas")
    return model
