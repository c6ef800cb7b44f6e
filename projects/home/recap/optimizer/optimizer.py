"""The ranker's optimizer: fused SGD in the large tables, Adam for everything else.

Adam's parameters are split into groups with their own learning-rate schedules: one group
per task tower (`multi_task_learning_rates.tower_learning_rates`) and one for the rest, the
backbone (`backbone_learning_rate`); or one group for all (`single_task_learning_rate`).
Each large table follows `large_embeddings.optimizer` (0 when frozen); its SGD is fused
into the table kernel (`tml.trainer.fused_tables.apply_table_optimizers`, before sharding).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from tml.errors import ConfigError
from tml.optimizers.combined import FUSED_OPT_KEY, fused_optimizer_of
from tml.optimizers.config import LearningRate
from tml.optimizers.optimizer import LRShim
from tml.trainer.fused_tables import table_schedules

from ..model.config import ModelConfig
from ..model.embeddings import trainer_tables
from ..model.ranking import sanitize
from .config import RecapOptimizerConfig

logger = logging.getLogger(__name__)

BACKBONE = "backbone"
# The Adam part's key in checkpoints (`optim.operator_opt.…`) and run records. The ranker
# took it over from tml's first dense key, which was TwHIN's name for its translations;
# it stays so that the ranker's existing checkpoints still load.
ADAM_OPT_KEY = "operator_opt"
_TABLE = re.compile(r"embedding_bags\.([^.]+)\.weight")


def _group_of(name: str, towers: dict[str, str]) -> str:
    match = re.search(r"(?:^|\.)towers\.([^.]+)\.", name)
    if match and match.group(1) in towers:
        return towers[match.group(1)]
    return BACKBONE


def build_optimizer(model: nn.Module, config: RecapOptimizerConfig,
                    model_config: ModelConfig) -> tuple[CombinedOptimizer, LRShim]:
    """The combined optimizer of a (DMP-wrapped or plain) ranking model and its schedule."""
    towers = {sanitize(task): task for task in model_config.tasks}
    schedules: dict[str, LearningRate] = {}
    if config.single_task_learning_rate is not None:
        schedules = {BACKBONE: config.single_task_learning_rate,
                     **{task: config.single_task_learning_rate for task in model_config.tasks}}
    else:
        rates = config.multi_task_learning_rates
        assert rates is not None
        schedules = dict(rates.tower_learning_rates)
        if rates.backbone_learning_rate is not None:
            schedules[BACKBONE] = rates.backbone_learning_rate
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    groups: dict[str, list[torch.Tensor]] = {}
    for name, param in dense.items():
        groups.setdefault(_group_of(name, towers), []).append(param)
    if BACKBONE in groups and BACKBONE not in schedules:
        raise ConfigError("optimizer.multi_task_learning_rates.backbone_learning_rate is "
                          "needed: the model has parameters outside the towers")
    order = sorted(groups, key=lambda g: (g != BACKBONE, g))
    group_of_param = {id(p): g for g in order for p in groups[g]}
    adam = config.adam

    def factory(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        by_group: dict[str, list[torch.Tensor]] = {g: [] for g in order}
        for param in params:
            by_group[group_of_param[id(param)]].append(param)
        return torch.optim.Adam([{"params": by_group[g], "name": g} for g in order
                                 if by_group[g]],
                                lr=0.0, betas=(adam.beta_1, adam.beta_2), eps=adam.epsilon)

    parts: list[tuple[str, KeyedOptimizer]] = [(FUSED_OPT_KEY, fused_optimizer_of(model))]
    if dense:
        parts.append((ADAM_OPT_KEY, KeyedOptimizerWrapper(dense, factory)))
    optimizer = CombinedOptimizer(parts)

    tables = table_schedules(trainer_tables(model_config.large_embeddings))
    names_by_param = {id(p): n for n, p in optimizer.params.items()}
    group_schedules: dict[int, LearningRate] = {}
    for index, group in enumerate(optimizer.param_groups):
        if "name" in group:
            group_schedules[index] = schedules[group["name"]]
            continue
        found = set()
        for param in group["params"]:
            match = _TABLE.search(names_by_param.get(id(param), ""))
            if match:
                found.add(match.group(1))
        kinds = {tables[t].model_dump_json() for t in found if t in tables}
        if len(kinds) > 1:
            raise ConfigError(f"large_embeddings tables {sorted(found)} share one fused "
                              "kernel but need different learning rates (a frozen table "
                              "beside a trained one); give each table its own kernel "
                              "(TML_ONE_KERNEL_PER_TABLE=1)")
        group_schedules[index] = tables[sorted(found)[0]] if found and found <= set(tables) \
            else LearningRate(constant=0.0)
    return optimizer, LRShim(optimizer, group_schedules)
