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

from projects.home.recap.data.config import RecapDataConfig
from projects.home.recap.model.config import ModelConfig
from projects.home.recap.optimizer.config import RecapOptimizerConfig
from tml.core.config.base_config import BaseConfig, Field


class TrainingConfig(BaseConfig):
    """The training loop (the original's fields plus tml's seed, checkpoint and restart
    options)."""

    save_dir: str | None = Field(None, description="Checkpoints; overridden by --save_dir.")
    num_train_steps: pydantic.PositiveInt = Field(1_000_000, description="Steps to train.")
    initial_checkpoint_dir: str | None = Field(None, at_most_one_of="initialization",
                                               description="Warm start (weights, step 0).")
    checkpoint_every_n: pydantic.PositiveInt = Field(1000, description="Save every N steps.")
    checkpoint_max_to_keep: pydantic.PositiveInt | None = Field(None, description="Keep the "
                                                                "newest N (default all).")
    train_log_every_n: pydantic.PositiveInt = Field(1000, description="Log every N steps.")
    num_eval_steps: int = Field(16384, description="Batches per evaluation per worker; < 0: "
                                "all the validation data.")
    eval_log_every_n: pydantic.PositiveInt = Field(5000, description="Evaluate every N steps.")
    eval_timeout_in_s: pydantic.PositiveFloat = Field(3600.0, description="Not used "
                                                      "(evaluation runs in the loop).")
    gradient_accumulation: pydantic.PositiveInt | None = Field(None, description="Step the "
                                                               "dense optimizer every N.")
    async_checkpoint: bool = Field(True, description="Write checkpoints in the background.")
    max_restarts: pydantic.NonNegativeInt | None = Field(None, description="torch elastic "
                                                         "restarts after a failure.")
    seed: int = Field(0, description="Initial weights and per-step random numbers.")


class JobMode(str, enum.Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    INFERENCE = "inference"


class RecapConfig(BaseConfig):
    training: TrainingConfig = Field(TrainingConfig())
    model: ModelConfig
    train_data: RecapDataConfig
    validation_data: dict[str, RecapDataConfig] = Field({}, description="Named validation "
                                                        "sets, each evaluated on its own.")
    optimizer: RecapOptimizerConfig
    which_metrics: str | None = Field(None, description="Not used.")

    @pydantic.model_validator(mode="after")
    def _tasks_have_labels(self) -> RecapConfig:
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
