"""TwHIN's optimizer: fused per-table optimizers plus the translation optimizer."""

from __future__ import annotations

import logging

from torch import nn
from torchrec.optim.keyed import CombinedOptimizer

from tml.optimizers.combined import FUSED_OPT_KEY, build_combined_optimizer
from tml.optimizers.optimizer import LRShim
from tml.trainer.fused_tables import table_of_param, table_schedules

from .models.config import TwhinModelConfig

logger = logging.getLogger(__name__)

# The translation vectors' optimizer, by the original TwHIN's name: its checkpoints hold
# `optim.operator_opt.…` and its run records `lr/operator_opt`.
TRANSLATION_OPT_KEY = "operator_opt"
__all__ = ["FUSED_OPT_KEY", "TRANSLATION_OPT_KEY", "build_optimizer"]

def build_optimizer(model: nn.Module, config: TwhinModelConfig) -> tuple[CombinedOptimizer, LRShim]:
    """The combined optimizer of a TwHIN model (wrapped in DMP or not) and its LR scheduler.

    Each table keeps its own configured schedule; the translation vectors follow
    `translation_optimizer`.
    """
    optimizer, scheduler = build_combined_optimizer(
        model, config.translation_optimizer, table_schedules(config.embeddings.tables),
        table_of_param, dense_key=TRANSLATION_OPT_KEY)
    logger.info("optimizer groups: %d (fused tables + translations), lr %s",
                len(optimizer.param_groups), [g["lr"] for g in optimizer.param_groups])
    return optimizer, scheduler
