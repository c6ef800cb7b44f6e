"""TwHIN's optimizer: fused per-table optimizers plus the translation optimizer."""

from __future__ import annotations

import logging
import re

from torch import nn
from torchrec.optim.keyed import CombinedOptimizer

from projects.twhin.models.config import TwhinModelConfig
from tml.optimizers.combined import DENSE_OPT_KEY, FUSED_OPT_KEY, build_combined_optimizer
from tml.optimizers.config import learning_rate_of
from tml.optimizers.optimizer import LRShim

logger = logging.getLogger(__name__)

TRANSLATION_OPT_KEY = DENSE_OPT_KEY
__all__ = ["FUSED_OPT_KEY", "TRANSLATION_OPT_KEY", "build_optimizer"]

_TABLE_PARAM = re.compile(r"embedding_bags\.([^.]+)\.weight")


def _table_of_param(name: str) -> str | None:
    match = _TABLE_PARAM.search(name)
    return match.group(1) if match else None


def build_optimizer(model: nn.Module, config: TwhinModelConfig) -> tuple[CombinedOptimizer, LRShim]:
    """The combined optimizer of a TwHIN model (wrapped in DMP or not) and its LR scheduler.

    Each table keeps its own configured schedule; the translation vectors follow
    `translation_optimizer`.
    """
    schedules = {table.name: learning_rate_of(table.optimizer)
                 for table in config.embeddings.tables}
    optimizer, scheduler = build_combined_optimizer(model, config.translation_optimizer,
                                                    schedules, _table_of_param)
    logger.info("optimizer groups: %d (fused tables + translations), lr %s",
                len(optimizer.param_groups), [g["lr"] for g in optimizer.param_groups])
    return optimizer, scheduler
