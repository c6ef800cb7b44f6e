"""`RecapConfig`: the whole Heavy Ranker config, as the original `local_prod.yaml` writes it.

    config = load_config_from_yaml(RecapConfig, "projects/home/recap/config/local_prod.yaml")

Unlike the original (see its "DANGER" note), the model's tasks are checked against the
data's: every model task needs a label column, and the labels are picked by task name, not
by position, so a data config listing more tasks (or in another order) than the model is
read correctly.
"""

from __future__ import annotations

import enum

import pydantic

from tml.core.config import training as training_config
from tml.core.config.base_config import BaseConfig, Field
from tml.core.config.compat import compat_field

from .data.config import RecapDataConfig
from .model.config import ModelConfig
from .optimizer.config import RecapOptimizerConfig


class TrainingConfig(training_config.TrainingConfig):
    """tml's training loop settings (a superset of the original recap ones). The data repeats
    until num_train_steps, as the original's datasets do, unless num_epochs is set."""

    num_train_steps: pydantic.PositiveInt = Field(1_000_000, description="Steps to train.")
    num_epochs: pydantic.PositiveInt = Field(1_000_000_000, description="Passes over the "
                                             "training data (default: repeat until "
                                             "num_train_steps).")


class JobMode(str, enum.Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    INFERENCE = "inference"


class RecapConfig(BaseConfig):
    training: TrainingConfig = Field(TrainingConfig())
    runtime: training_config.RuntimeConfig = Field(training_config.RuntimeConfig())
    model: ModelConfig
    train_data: RecapDataConfig
    validation_data: dict[str, RecapDataConfig] = Field({}, description="Named validation "
                                                        "sets, each evaluated on its own.")
    optimizer: RecapOptimizerConfig
    which_metrics: str | None = compat_field(None, "evaluation reports the metrics of "
                                             "tml.metrics.evaluation")

    @pydantic.model_validator(mode="after")
    def _tasks_have_labels(self) -> RecapConfig:
        training_config.check_early_stopping_data(self.training, bool(self.validation_data))
        for name, data in [("train_data", self.train_data),
                           *((f"validation_data.{k}", v) for k, v in
                             self.validation_data.items())]:
            missing = [t for t in self.model.tasks if t not in data.tasks]
            if missing:
                raise ValueError(f"{name}.tasks lacks the model's task '{missing[0]}' (every "
                                 "model task needs its label)")
        rates = self.optimizer.multi_task_learning_rates
        if rates is not None:
            for task in self.model.tasks:
                if task not in rates.tower_learning_rates:
                    raise ValueError(f"optimizer.multi_task_learning_rates.tower_learning_rates "
                                     f"lacks task '{task}'")
            for task in rates.tower_learning_rates:
                if task not in self.model.tasks:
                    raise ValueError(f"optimizer.multi_task_learning_rates.tower_learning_rates "
                                     f"names '{task}', which is not a model task")
        return self
