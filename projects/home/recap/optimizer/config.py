"""The ranker's optimizer: Adam with one learning-rate schedule per tower and one for the
backbone (everything that is not a tower), or one schedule for all."""

from __future__ import annotations

from tml.core.config.base_config import BaseConfig, Field
from tml.optimizers.config import LearningRate


class RecapAdamConfig(BaseConfig):
    beta_1: float = Field(0.9, description="First-moment decay.")
    beta_2: float = Field(0.999, description="Second-moment decay.")
    epsilon: float = Field(1e-7, description="Added to the denominator.")


class MultiTaskLearningRates(BaseConfig):
    tower_learning_rates: dict[str, LearningRate] = Field(
        ..., description="Per task: the schedule of its tower.")
    backbone_learning_rate: LearningRate | None = Field(
        None, description="Schedule of every parameter outside the towers.")


class RecapOptimizerConfig(BaseConfig):
    multi_task_learning_rates: MultiTaskLearningRates | None = Field(None, one_of="lr")
    single_task_learning_rate: LearningRate | None = Field(None, one_of="lr")
    adam: RecapAdamConfig = Field(..., description="Adam's constants.")
