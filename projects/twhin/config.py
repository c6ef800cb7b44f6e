"""The whole TwHIN configuration, as loaded from YAML (`projects/twhin/config/*.yaml`)."""

from __future__ import annotations

import pydantic

from tml.core.config.base_config import BaseConfig, Field
from tml.core.config.training import RuntimeConfig, TrainingConfig, check_early_stopping_data
from tml.readers.config import ReadersConfig

from .data.config import TwhinDataConfig
from .models.config import TwhinModelConfig


class TwhinConfig(BaseConfig):
    """A TwHIN run: the sections of `projects/twhin/config/local.yaml`."""

    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Process-wide "
                                   "switches.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="The loop.")
    model: TwhinModelConfig = Field(..., description="Tables, relations, optimizers.")
    train_data: TwhinDataConfig = Field(..., description="Training edges.")
    validation_data: TwhinDataConfig | None = Field(None, description="Held-out edges, "
                                                    "evaluated every eval_log_every_n steps "
                                                    "and at the end (AUC, loss).")
    test_data: TwhinDataConfig | None = Field(None, description="Test edges, read only by "
                                              "`twhin evaluate --split test` (filtered "
                                              "link prediction); never used in training.")
    readers: ReadersConfig = Field(default_factory=ReadersConfig, description="Reader "
                                   "processes serving the training data (none by default: "
                                   "the trainers read it). See docs/readers.md.")

    @pydantic.model_validator(mode="after")
    def _early_stopping_has_data(self) -> TwhinConfig:
        check_early_stopping_data(self.training, self.validation_data is not None)
        return self
