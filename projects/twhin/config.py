"""The whole TwHIN configuration, as loaded from YAML (`projects/twhin/config/*.yaml`)."""

from __future__ import annotations

from projects.twhin.data.config import TwhinDataConfig
from projects.twhin.models.config import TwhinModelConfig
from tml.core.config.base_config import BaseConfig, Field
from tml.core.config.training import RuntimeConfig, TrainingConfig


class TwhinConfig(BaseConfig):
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    model: TwhinModelConfig
    train_data: TwhinDataConfig
    validation_data: TwhinDataConfig | None = None
